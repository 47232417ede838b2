import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from modules.evaluate import evaluate_images, read_submission, self_check
from modules.features import build_feature_extractor
from modules.utils import UsageError


def images(n, seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def png_bytes(arr, mode=None):
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    (img.convert(mode) if mode else img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def proxy():
    return build_feature_extractor("proxy", seed=0)


# submission format

def test_read_submission_zip_reports_problems(tmp_path):
    good = images(10)
    path = tmp_path / "images.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for i, im in enumerate(good):
            zf.writestr(f"{i:05d}.png", png_bytes(im))
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

def test_evaluate_copies_of_reference_are_memorized(proxy):
    ref = images(40, seed=2)
    res = evaluate_images(ref[:20].copy(), ref, proxy)
    assert "fid" not in res and "mifid_public" not in res  # a proxy number is never called FID
    assert res["memorization_distance"] < 1e-5 and res["proxy_memorized_public"] and "memorization_note" in res
    assert "do not rank" in res["proxy_note"]  # the log and the JSON say the proxy does not rank runs
    assert res["proxy_fd"] > 0 and res["proxy_mifid_public"] > 1e3 * res["proxy_fd"]
    assert res["feature_space"] == proxy.name and res["n_generated"] == 20 and res["n_reference"] == 40
    assert "not Kaggle's score" in res["note"]


class TinyClassifierFeatures:
    """Stands in for Inception (whose 2048-d sqrtm is slow on CPU): not a proxy, has logits."""
    name, is_proxy, dim, n_classes, has_logits, device = "tiny (test)", False, 6, 4, True, "cpu"

    def features_and_logits(self, images_uint8, batch_size=200):
        x = images_uint8.reshape(len(images_uint8), -1)[:, :self.dim].astype(np.float32)
        return x, x[:, :self.n_classes] / 50.0


def test_evaluate_non_proxy_reports_fid_and_is_and_no_penalty():
    gen, ref = images(30, seed=5), images(20, seed=6)
    gen[:, 0, 1], ref[:, 0, 0] = 0, 0  # TinyClassifierFeatures: gen lives in dims 0-2, ref in dims 3-5
    gen[:, 0, 0] = np.maximum(gen[:, 0, 0], 1)
    res = evaluate_images(gen, ref, TinyClassifierFeatures())
    assert {"fid", "mifid_public", "mifid_private", "inception_score"} <= set(res)
    assert not any(k.startswith("proxy") for k in res) and res["inception_score"][0] >= 1.0
    assert res["memorization_distance"] == pytest.approx(1.0) and not res["memorized_private"]
    assert res["mifid_public"] == pytest.approx(res["fid"]) and res["mifid_private"] == pytest.approx(res["fid"])


def test_self_check_writes_nearest_png(proxy, tmp_path):
    crops = images(50, seed=7)
    gen = np.concatenate([crops[[3, 9]], images(10, seed=8)])
    out = tmp_path / "nearest.png"
    res = self_check(gen, images(20, seed=9), crops, proxy, out_png=out, n_show=4)
    with Image.open(out) as img:
        assert img.size == (4 * (130 + 8) + 8, 64 + 16)  # four [generated | gap | crop] pairs in one row
    assert [c["crop"] for c in res["closest"][:2]] == [3, 9] and res["closest"][0]["l2"] == 0.0
    assert res["n_near_copies"] == 2 and res["n_crops_searched"] == 50 and not res["crops_subsampled"]
    res = self_check(gen, None, crops, proxy, memorization=0.05)  # precomputed distance, no picture
    assert res["proxy_memorized_public"] and "nearest_png" not in res
