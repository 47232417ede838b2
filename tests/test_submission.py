import io
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from modules.recipe.utils import UsageError
from modules.run.submission import SubmissionError, verify_zip, write_submission


def _images(n, size=64):
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_zip_round_trip(tmp_path):
    imgs = _images(50)
    path = write_submission(imgs, str(tmp_path / "images.zip"))
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist(), key=lambda s: int(s[:-4])) == [f"{i}.png" for i in range(50)]
        back = np.asarray(Image.open(io.BytesIO(zf.read("7.png"))))
    assert np.array_equal(back, imgs[7])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_verify_catches_wrong_count(tmp_path):
    path = write_submission(_images(5), str(tmp_path / "a.zip"))
    with pytest.raises(SubmissionError, match="5 entries"):
        verify_zip(path, n_expected=6)


def test_verify_catches_wrong_size(tmp_path):
    path = tmp_path / "b.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray(_images(1, 32 if i == 2 else 64)[0]).save(buf, format="PNG")
            zf.writestr(f"{i}.png", buf.getvalue())
    with pytest.raises(SubmissionError, match="2.png"):
        verify_zip(path, n_expected=3)


def test_verify_catches_jpeg_and_garbage(tmp_path):
    path = tmp_path / "c.zip"
    buf = io.BytesIO()
    Image.fromarray(_images(1)[0]).save(buf, format="JPEG")
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0.png", buf.getvalue())
    with pytest.raises(SubmissionError):
        verify_zip(path, n_expected=1)
    (tmp_path / "d.zip").write_bytes(b"not a zip")
    with pytest.raises(SubmissionError):
        verify_zip(tmp_path / "d.zip", n_expected=1)


def test_existing_zip_replaced_only_by_verified(tmp_path):
    path = str(tmp_path / "images.zip")
    write_submission(_images(3), path)
    before = open(path, "rb").read()
    write_submission(_images(4), path)
    assert open(path, "rb").read() != before


def test_unwritable_path_is_clear_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")  # a file where a folder should be: fails even as root
    with pytest.raises(UsageError, match="cannot write"):
        write_submission(_images(2), str(blocker / "images.zip"))


def test_encoded_pngs_are_lossless_and_valid_for_pil():
    """encode_png writes PNGs itself (Up filter + zlib): PIL must read every kind of image back exactly."""
    from modules.run.submission import encode_png
    rng = np.random.default_rng(1)
    smooth = np.clip(np.cumsum(rng.normal(0, 6, (64, 64, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
    cases = [_images(1)[0], smooth, np.zeros((64, 64, 3), np.uint8), np.full((64, 64, 3), 255, np.uint8),
             _images(1)[0][::-1, ::2].repeat(2, axis=1)]  # a non-contiguous view
    for image in cases:
        data = encode_png(image)
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk CRCs and structure
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (64, 64)
            assert np.array_equal(np.asarray(im), image)
