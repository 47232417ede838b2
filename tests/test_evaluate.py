import io
import json
import os
import shutil
import struct
import subprocess
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from modules.data.demo import make_demo_dataset
from modules.data.dogs import load_dogs
from modules.recipe.config import Config
from modules.recipe.utils import UsageError
from modules.run.evaluate import NO_FID, copy_check, evaluate_images, read_submission
from modules.run.main import main
from modules.run.submission import SubmissionError, _zip_entry_count, verify_zip, write_submission
from test_checkpoint import unblock_fifo_later


def images(n, seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


# submission format

def test_read_submission_zip_reports_problems(tmp_path):
    good = images(10)
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, im in enumerate(good):
            zf.writestr(f"{i}.png", png_bytes(im))
        zf.writestr("big.png", png_bytes(images(1, seed=1, size=128)[0]))
        zf.writestr("gray.png", png_bytes(good[0], mode="L"))
        zf.writestr("broken.png", b"\x89PNG not really")
        zf.writestr("notes.txt", b"hello")
    arr, rep = read_submission(path, expected=13)
    assert arr.shape == (11, 64, 64, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[:10], good)  # entries come back in name order; lossless PNG
    assert rep["count"] == 13 and rep["n_loaded"] == 11 and not rep["ok"]
    assert rep["wrong_size"] == {"count": 1, "first": ["big.png (128x128)"]}
    assert rep["non_rgb"]["count"] == 1 and rep["unreadable"]["count"] == 1 and rep["non_png"]["first"] == ["notes.txt"]
    assert rep["bad_name"]["first"] == ["big.png", "broken.png", "gray.png"]


def test_read_submission_folder_ok(tmp_path):
    for i, im in enumerate(images(4)):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(im))
    arr, rep = read_submission(tmp_path, expected=4)
    assert rep["ok"] and arr.shape == (4, 64, 64, 3)
    _, rep = read_submission(tmp_path)  # Kaggle wants 10,000
    assert not rep["ok"] and rep["expected"] == 10000


def test_read_submission_bad_paths(tmp_path):
    with pytest.raises(UsageError):
        read_submission(tmp_path / "missing.zip")
    (tmp_path / "x.zip").write_bytes(b"not a zip")
    with pytest.raises(UsageError):
        read_submission(tmp_path / "x.zip")
    empty = tmp_path / "empty"
    empty.mkdir()
    arr, rep = read_submission(empty)
    assert arr is None and rep["count"] == 0 and not rep["ok"]


# scores

class TinyClassifierFeatures:
    """Stands in for Inception (whose 2048-d sqrtm is slow on CPU): 6-d features and 4 logits from the first pixels."""
    name, dim, n_classes, device = "tiny (test)", 6, 4, "cpu"

    def features_and_logits(self, images_uint8, batch_size=200):
        x = images_uint8.reshape(len(images_uint8), -1)[:, :self.dim].astype(np.float32)
        return x, x[:, :self.n_classes] / 50.0


def test_evaluate_copies_of_reference_are_memorized(capsys):
    ref = images(40, seed=2)
    res = evaluate_images(ref[:20].copy(), ref, TinyClassifierFeatures())
    assert res["memorization_distance"] < 1e-5 and res["memorized_public"] and res["memorized_private"]
    assert res["fid"] > 0 and res["mifid_public"] > 1e3 * res["fid"]
    assert res["feature_space"] == "tiny (test)" and res["n_generated"] == 20 and res["n_reference"] == 40
    assert "not Kaggle's score" in res["note"] and "!!! MEMORIZATION" in capsys.readouterr().out


def test_evaluate_reports_fid_and_no_penalty():
    gen, ref = images(30, seed=5), images(20, seed=6)
    gen[:, 0, 1], ref[:, 0, 0] = 0, 0  # TinyClassifierFeatures: gen lives in dims 0-2, ref in dims 3-5
    gen[:, 0, 0] = np.maximum(gen[:, 0, 0], 1)
    res = evaluate_images(gen, ref, TinyClassifierFeatures())
    assert {"fid", "mifid_public", "mifid_private"} <= set(res)
    assert res["memorization_distance"] == pytest.approx(1.0) and not res["memorized_private"]
    assert res["mifid_public"] == pytest.approx(res["fid"]) and res["mifid_private"] == pytest.approx(res["fid"])


def test_copy_check_writes_nearest_png(tmp_path):
    crops = images(50, seed=7)
    gen = np.concatenate([crops[[3, 9]], images(10, seed=8)])
    out = tmp_path / "nearest.png"
    res = copy_check(gen, crops, device="cpu", out_png=out, n_show=4)
    with Image.open(out) as img:
        assert img.size == (4 * (130 + 8) + 8, 64 + 16)  # four [generated | gap | crop] pairs in one row
    assert [c["crop"] for c in res["closest"][:2]] == [3, 9] and res["closest"][0]["l2"] == 0.0
    assert res["n_near_copies"] == 2 and res["n_crops_searched"] == 50 and not res["crops_subsampled"]
    assert "nearest_png" not in copy_check(gen, crops, device="cpu")  # no picture asked for


def test_evaluate_without_inception_weights_is_the_format_and_the_copy_check(tmp_path, capsys, monkeypatch):
    """No weights given or in the hub cache: the format checks, one line saying there is no FID, and the pixel copy
    check against the crops the kernel trains on; no number in any other feature space."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    data = make_demo_dataset(tmp_path / "demo")
    cfg = Config()  # the crops the kernel trains on (and --evaluate compares with): its default style and filter
    crops = load_dogs(data / "all-dogs", data / "Annotation", crop_styles=tuple(cfg.crop_styles.split(",")),
                      resize=cfg.crop_filter).images
    write_submission(np.concatenate([crops[:3], images(5, seed=3)]), str(tmp_path / "some.zip"))
    capsys.readouterr()
    code, out, err = _evaluate([tmp_path / "some.zip", "--data-dir", data], capsys)
    result = json.loads(out)
    assert code == 1 and result["format"]["count"] == 8 and not result["format"]["ok"]  # Kaggle wants 10,000
    assert set(result) == {"format", "self_check"} and result["self_check"]["n_near_copies"] == 3
    assert [line.split("] ", 1)[1] for line in err.splitlines() if "FID" in line] == [NO_FID]


# hostile submissions (issue 19)

def test_a_zip_bomb_is_refused_from_the_directory_without_decompressing(tmp_path):
    """A text entry and a .png entry of 64 MiB of zeros each (deflated to ~64 KB): neither is decompressed; memory
    stays far below their size."""
    path = tmp_path / "bomb.zip"
    zeros = bytes(64 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for i, im in enumerate(images(3)):
            zf.writestr(f"{i}.png", png_bytes(im))
        zf.writestr("zeros.txt", zeros)
        zf.writestr("3.png", zeros)
    del zeros
    tracemalloc.start()
    try:
        arr, rep = read_submission(path, expected=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB allocated"
    assert arr.shape == (3, 64, 64, 3) and not rep["ok"]
    assert rep["too_large"]["count"] == 1 and rep["too_large"]["first"][0].startswith("3.png (67108864 bytes")
    assert rep["non_png"]["first"] == ["zeros.txt"]
    with pytest.raises(SubmissionError, match="too_large: 3.png"):
        verify_zip(path, n_expected=4)


def _png_with_header(width, height):
    """A small PNG file whose header claims width x height (its data is one zlib'd row: not decodable)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(1 + 3 * 64))) + chunk(b"IEND", b""))


def test_huge_png_dimensions_are_refused_from_the_header_without_pil_warnings(tmp_path, capfd):
    path = tmp_path / "huge.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0.png", _png_with_header(30000, 30000))  # PIL: DecompressionBombWarning / Error
        zf.writestr("1.png", png_bytes(images(1)[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning (PIL's DecompressionBombWarning) fails the test
        arr, rep = read_submission(path, expected=2)
    assert rep["wrong_size"]["first"] == ["0.png (30000x30000)"] and arr.shape == (1, 64, 64, 3)
    assert "DecompressionBomb" not in "".join(capfd.readouterr())


def test_evaluate_and_the_writer_share_one_definition_of_valid(tmp_path):
    """Subfolders, ../ and absolute names, and zero-padded names are refused by --evaluate as by verify_zip."""
    for case, names in {"subfolder": [f"images/{i}.png" for i in range(3)],
                        "traversal": ["../0.png", "/1.png", "2.png"], "padded": ["0000.png", "1.png", "2.png"],
                        "duplicate": ["0.png", "1.png", "1.png"]}.items():
        path = tmp_path / f"{case}.zip"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
            with zipfile.ZipFile(path, "w") as zf:
                for name, im in zip(names, images(3)):
                    zf.writestr(name, png_bytes(im))
        _, rep = read_submission(path, expected=3)
        assert not rep["ok"] and rep["bad_name"]["count"] >= 1, (case, rep)
        with pytest.raises(SubmissionError, match="expected exactly 3 named 0.png"):
            verify_zip(path, n_expected=3)
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i, im in enumerate(images(3)):
        (folder / "sub" / f"{i}.png").write_bytes(png_bytes(im))
    _, rep = read_submission(folder, expected=3)
    assert not rep["ok"] and rep["bad_name"]["first"] == ["sub/0.png", "sub/1.png", "sub/2.png"]


def _evaluate(args, capsys):
    code = main(["--evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_exit_codes_and_a_single_image(tmp_path, capsys):
    """A rejected zip exits 1 with its JSON on stdout; a single image (FID needs two) is one such rejection, not an
    AssertionError; a FIFO or a non-zip is a usage error (2, one line), refused before the data is read."""
    path = tmp_path / "one.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("0.png", png_bytes(images(1)[0]))
    code, out, err = _evaluate([path], capsys)
    result = json.loads(out)
    assert code == 1 and not result["format"]["ok"] and "scores need 2" in result["scores_skipped"]
    assert err.strip().splitlines()[-1] == f"error: {path} would be rejected: see \"format\" above"
    os.mkfifo(tmp_path / "fifo.zip")
    unblock_fifo_later(tmp_path / "fifo.zip")
    code, out, err = _evaluate([tmp_path / "fifo.zip"], capsys)
    assert code == 2 and "is a FIFO" in err and len(err.strip().splitlines()) == 1 and not out
    (tmp_path / "junk.zip").write_bytes(b"junk")
    code, out, err = _evaluate([tmp_path / "junk.zip"], capsys)
    assert code == 2 and "neither a folder nor a readable zip" in err


def test_an_end_record_of_many_entries_is_refused_before_zipfile_reads_it(tmp_path):
    """The entry count comes from the end record before zipfile builds its directory in memory."""
    path = tmp_path / "many.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(150):
            zf.writestr(f"{i}.txt", b"")
    _, rep = read_submission(path, expected=4)  # at most 2 * 4 + 100 = 108 entries: none is looked at
    assert rep["too_many"]["first"] == ["150 entries"] and rep["non_png"]["count"] == 0 and not rep["ok"]
    _, rep = read_submission(path, expected=100)  # at most 300: all are looked at
    assert rep["non_png"]["count"] == 150 and rep["too_many"]["count"] == 0
    with zipfile.ZipFile(tmp_path / "z64.zip", "w") as zf:
        zf.writestr("0.png", png_bytes(images(1)[0]))
    data = bytearray((tmp_path / "z64.zip").read_bytes())
    at = data.rfind(b"PK\x05\x06")
    data[at + 8:at + 12] = b"\xff\xff\xff\xff"  # entry counts 0xFFFF and no ZIP64 record: 65535 entries
    (tmp_path / "z64.zip").write_bytes(bytes(data))
    _, rep = read_submission(tmp_path / "z64.zip", expected=1)
    assert not rep["ok"] and rep["too_many"]["count"] == 1


def _zip64_submission(tmp_path, monkeypatch, n):
    """A valid n-PNG submission whose directory ends in a ZIP64 end record (as `zip -fz` writes): zipfile writes one
    when the entry count passes ZIP_FILECOUNT_LIMIT, lowered here so that a tiny archive needs it."""
    path = tmp_path / "z64.zip"
    monkeypatch.setattr(zipfile, "ZIP_FILECOUNT_LIMIT", 1)
    with zipfile.ZipFile(path, "w") as zf:
        for i, img in enumerate(images(n)):
            zf.writestr(f"{i}.png", png_bytes(img))
    assert path.read_bytes().rfind(b"PK\x06\x06") > 0  # the ZIP64 end record is there
    return path


def test_a_valid_zip64_submission_is_valid(tmp_path, monkeypatch):
    """The ZIP64 end record's count is read, so a ZIP64 archive of the right PNGs passes the format check."""
    path = _zip64_submission(tmp_path, monkeypatch, 3)
    assert _zip_entry_count(path) == 3
    _, rep = read_submission(path, expected=3)
    assert rep["ok"] and rep["too_many"]["count"] == 0


def test_zip_fz_submission_is_valid(tmp_path):
    """The `zip -fz` command's ZIP64 archive of the kernel's PNGs (skipped where zip is not installed)."""
    if shutil.which("zip") is None:
        pytest.skip("zip is not installed")
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, img in enumerate(images(3)):
        (folder / f"{i}.png").write_bytes(png_bytes(img))
    subprocess.run(["zip", "-q", "-fz", "-j", str(tmp_path / "fz.zip")] + [str(folder / f"{i}.png") for i in range(3)],
                   check=True)
    assert _zip_entry_count(tmp_path / "fz.zip") == 3
    _, rep = read_submission(tmp_path / "fz.zip", expected=3)
    assert rep["ok"]
