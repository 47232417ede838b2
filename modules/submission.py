"""The submission: images.zip with exactly n PNGs `0.png … {n-1}.png`, 64x64 RGB, written to a temporary name,
re-opened and verified, and only then renamed over any earlier images.zip.
"""
import io
import os
import zipfile
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from modules.utils import UsageError, atomic_file

PNG_COMPRESS_LEVEL = 1  # zlib level: 1 encodes ~3x faster than PIL's default 6 for a few % more bytes; Kaggle has no size limit


class SubmissionError(Exception):
    """The zip on disk is not a valid submission (count, names, format or size)."""


def encode_png(image):
    """uint8 [H,W,3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def encode_pngs(images, workers=2):
    """uint8 [N,H,W,3] -> list of PNG bytes; zlib releases the GIL, so threads use every core."""
    if workers <= 1:
        return [encode_png(im) for im in images]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(encode_png, images, chunksize=64))


def verify_zip(path, *, n_expected, size=64):
    """Re-open the zip and check every entry: names 0.png…, PNG, size×size, RGB. Raises SubmissionError."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            expected = {f"{i}.png" for i in range(n_expected)}
            if len(names) != n_expected or set(names) != expected:
                raise SubmissionError(f"{path}: {len(names)} entries, expected exactly {n_expected} named 0.png…")
            for name in names:
                with Image.open(io.BytesIO(zf.read(name))) as im:
                    if im.format != "PNG" or im.size != (size, size) or im.mode != "RGB":
                        raise SubmissionError(f"{path}: {name} is {im.format} {im.mode} {im.size}, expected PNG RGB "
                                              f"{size}x{size}")
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{path}: cannot be read back ({exc})") from None


def write_submission(images, path, *, workers=2, corrupt=False):
    """Write uint8 [N,64,64,3] as a verified zip at path (atomic): encoded, written to path.tmp and flushed to the disk,
    re-opened and verified, and only then renamed over path, so an earlier zip at path stays until a valid one replaces
    it. Returns the path. A failed write is a UsageError naming the path; a zip that reads back wrong a
    SubmissionError.

    corrupt: for tests (fault=zipfail): truncate the written zip before verification, as a broken disk would.
    """
    n, h, w, c = images.shape
    assert c == 3 and h == w and images.dtype.name == "uint8", images.shape
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        pngs = encode_pngs(images, workers)
        with atomic_file(path, verify=lambda tmp: verify_zip(tmp, n_expected=n, size=h)) as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed already
                for i, data in enumerate(pngs):
                    zf.writestr(f"{i}.png", data)
            if corrupt:
                f.truncate(f.tell() // 2)
    except OSError as exc:  # the .tmp is gone already (atomic_file), any earlier zip at path is untouched
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
