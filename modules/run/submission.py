"""The submission: images.zip with exactly n PNGs `0.png … {n-1}.png`, 64x64 RGB, written to a temporary name,
re-opened and verified, and only then renamed over any earlier images.zip. scan_submission is the one definition of a
valid submission, for the kernel's own zip and for --evaluate.
"""
import dataclasses
import io
import os
import stat
import struct
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from modules.recipe.utils import UsageError, atomic_file

PNG_COMPRESS_LEVEL = 1  # zlib: ~3x faster than PIL's default 6 for a few % more bytes; Kaggle has no size limit
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUBMISSION_MAX_ENTRY_BYTES = 1 << 20  # a 64x64 RGB PNG is ~12 KB even stored: larger ones are refused unread
SUBMISSION_MAX_RATIO = 100  # an entry's uncompressed / compressed size: PNG data barely compresses, a zip bomb's 1000x
SUBMISSION_PROBLEMS = ("bad_name", "missing", "non_png", "too_large", "wrong_size", "non_rgb", "unreadable", "too_many")


class SubmissionError(Exception):
    """The zip on disk is not a valid submission (count, names, format or size)."""


def _png_chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def encode_png(image):
    """uint8 [H,W,3] -> PNG bytes, every row "Up"-filtered (the first unfiltered), one zlib stream. Not PIL's encoder:
    ~2.3x less CPU (its adaptive filter choice is most of the cost) for ~5% more bytes (tests/bench/results/finish)."""
    h, w, c = image.shape
    assert c == 3 and image.dtype == np.uint8, (image.shape, image.dtype)
    flat = image.reshape(h, w * 3)
    rows = np.empty((h, 1 + w * 3), np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 0], rows[0, 1:] = 0, flat[0]  # nothing above the first row: unfiltered
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 wraps modulo 256, as PNG's filters do
    return b"".join((PNG_SIGNATURE, _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), PNG_COMPRESS_LEVEL)), _png_chunk(b"IEND", b"")))


def encode_pngs(images, workers=2):
    """uint8 [N,H,W,3] -> list of PNG bytes; zlib and numpy release the GIL, so threads use every core."""
    if workers <= 1:
        return [encode_png(im) for im in images]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(encode_png, images, chunksize=64))


@dataclasses.dataclass
class SubmissionScan:
    """What scan_submission found. Valid (`ok`): exactly the entries 0.png ... {n-1}.png at the top level, each a PNG
    of size x size 8-bit RGB that reads back whole."""
    count: int  # entries whose name ends in .png
    entries: int  # all file entries
    problems: dict  # kind (SUBMISSION_PROBLEMS) -> ["name (detail)", ...]
    images: list  # decode=True: uint8 [size,size,3] of every readable size x size PNG (non-RGB converted), name order

    @property
    def ok(self):
        return not any(self.problems.values())

    def summary(self, n_expected):
        """One line: the first problems of each kind."""
        parts = [f"{self.entries} entries ({self.count} .png), expected exactly {n_expected} named 0.png..."
                 f"{n_expected - 1}.png"] if self.problems["bad_name"] or self.problems["missing"] else []
        parts += [f"{kind}: {', '.join(names[:3])}" + (f" (+{len(names) - 3})" if len(names) > 3 else "")
                  for kind, names in self.problems.items() if names]
        return "; ".join(parts)


def _zip_entry_count(path):
    """The entry count the zip's (or ZIP64) end record announces, read before zipfile builds its directory in memory
    (millions of tiny entries would take gigabytes there). None when not found: zipfile then says what is wrong."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - (1 << 16) - 22))  # the end record (22 bytes) and a comment of at most 64 KiB
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) < at + 22:
            return None
        total = struct.unpack("<H", tail[at + 10:at + 12])[0]
        if not (at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07"):  # no ZIP64 locator just before the end record
            return total
        f.seek(struct.unpack("<Q", tail[at - 12:at - 4])[0])  # the locator holds the ZIP64 end record's offset
        record = f.read(40)
    if len(record) < 40 or record[:4] != b"PK\x06\x06":
        return None
    return struct.unpack("<Q", record[32:40])[0]  # total entries in the central directory


def _submission_files(path, limit):
    """(name, size, compressed size, read(max_bytes) -> bytes) per file of a zip or a folder, in name order; read is
    None for a link or non-regular file. Past `limit` entries: ("", count, 0, None) and stop."""
    if os.path.isdir(path):
        names = []
        for root, _, files in os.walk(path):  # links to folders are not followed
            names += [os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/") for f in files]
            if len(names) > limit:
                yield "", len(names), 0, None
                return
        for name in sorted(names):
            try:
                st = os.lstat(os.path.join(path, name))
            except OSError:  # gone since the listing
                yield name, 0, 0, None
                continue

            def read(max_bytes, f=os.path.join(path, name)):
                with open(f, "rb") as fh:
                    return fh.read(max_bytes)
            yield name, st.st_size, st.st_size, read if stat.S_ISREG(st.st_mode) else None
        return
    n = _zip_entry_count(path)
    if n is not None and n > limit:
        yield "", n, 0, None
        return
    with zipfile.ZipFile(path) as zf:
        for info in sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename):
            def read(max_bytes, info=info):
                with zf.open(info) as fh:  # stops at the directory's size; a lie there fails the CRC check
                    return fh.read(max_bytes)
            yield info.filename, info.file_size, info.compress_size, read


def _png_entry(name, file_size, compress_size, read, *, size):
    """One .png entry -> (its bytes or None, None or its problem (kind, detail)); bytes when its header was checked."""
    if read is None:
        return None, ("unreadable", f"{name} (not a regular file)")
    if file_size > SUBMISSION_MAX_ENTRY_BYTES or (
            file_size > 4096 and file_size > SUBMISSION_MAX_RATIO * max(compress_size, 1)):
        return None, ("too_large", f"{name} ({file_size} bytes, {compress_size} compressed)")
    try:
        data = read(SUBMISSION_MAX_ENTRY_BYTES + 1)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        return None, ("unreadable", f"{name} ({type(exc).__name__})")  # CRC error, encrypted, bad method
    if len(data) > SUBMISSION_MAX_ENTRY_BYTES:
        return None, ("too_large", f"{name} (over {SUBMISSION_MAX_ENTRY_BYTES} bytes)")
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        damaged = data[:4] == PNG_SIGNATURE[:4]
        return None, ("unreadable", f"{name} (damaged PNG header)") if damaged else ("non_png", f"{name} (not a PNG)")
    (w, h), depth, colour = struct.unpack(">II", data[16:24]), data[24], data[25]
    if (w, h) != (size, size):
        return None, ("wrong_size", f"{name} ({w}x{h})")
    if (depth, colour) != (8, 2):
        return data, ("non_rgb", f"{name} (bit depth {depth}, colour type {colour})")
    return data, None


def scan_submission(path, *, n_expected, size=64, decode=False):
    """A zip (or a folder) -> SubmissionScan. Nothing is decompressed or decoded before it is known small: non-.png
    names are not read; sizes are checked on the directory and then read at most that far; the PNG header's before
    decoding (decode=True: --evaluate). Raises zipfile.BadZipFile or OSError for neither a readable zip nor a folder."""
    problems = {kind: [] for kind in SUBMISSION_PROBLEMS}
    expected = {f"{i}.png" for i in range(n_expected)}
    seen, images, count, entries = set(), [], 0, 0
    for name, file_size, compress_size, read in _submission_files(path, limit=2 * n_expected + 100):
        if not name:
            problems["too_many"].append(f"{file_size} entries")
            break
        entries += 1
        is_png_name = name.lower().endswith(".png")
        if name in expected and name not in seen:
            seen.add(name)
        elif is_png_name:
            problems["bad_name"].append(name)  # a subfolder, ../, an absolute path, 00001.png, a duplicate
        if not is_png_name:
            problems["non_png"].append(name)
            continue
        count += 1
        data, problem = _png_entry(name, file_size, compress_size, read, size=size)
        if problem:
            problems[problem[0]].append(problem[1])
        if decode and data is not None:
            try:  # the header said size x size: no decompression bomb
                with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
                    images.append(np.asarray(img.convert("RGB"), np.uint8))
            except Exception as exc:  # PIL raises several types for broken files
                problems["unreadable"].append(f"{name} ({type(exc).__name__})")
    problems["missing"] = sorted(expected - seen, key=lambda n: int(n[:-4]))
    return SubmissionScan(count=count, entries=entries, problems=problems, images=images)


def verify_zip(path, *, n_expected, size=64):
    """Re-open the zip and scan it (every entry read back and CRC-checked; pixels not decoded). Raises SubmissionError.
    """
    try:
        scan = scan_submission(path, n_expected=n_expected, size=size)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{path}: cannot be read back ({exc})") from None
    if not scan.ok:
        raise SubmissionError(f"{path}: {scan.summary(n_expected)}")


def write_submission(images, path, *, workers=2, corrupt=False, pngs=None):
    """uint8 [N,64,64,3] -> a verified zip at path, through atomic_file: an earlier zip stays until a valid one replaces
    it. A failed write is a UsageError naming the path; a zip that reads back wrong a SubmissionError. pngs: the PNG
    bytes when encoded already; corrupt (fault=zipfail): the zip truncated before verification, as a broken disk."""
    n, h, w, c = images.shape
    assert c == 3 and h == w and images.dtype.name == "uint8", images.shape
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if pngs is None:
            pngs = encode_pngs(images, workers)
        assert len(pngs) == n, (len(pngs), n)
        with atomic_file(path, verify=lambda tmp: verify_zip(tmp, n_expected=n, size=h)) as f:
            with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as zf:  # PNG is compressed already
                for i, data in enumerate(pngs):
                    zf.writestr(f"{i}.png", data)
            if corrupt:
                f.truncate(f.tell() // 2)
    except OSError as exc:  # the .tmp is gone already (atomic_file), any earlier zip at path is untouched
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path
