import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from modules.features import (FIDInceptionA, FIDInceptionE2, build_feature_extractor, fid_inception_v3,
                              tf1_resize_matrix)
from modules.utils import UsageError

ROOT = Path(__file__).resolve().parents[1]


def images(n, seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# proxy

def test_proxy_shapes_and_name():
    ext = build_feature_extractor("proxy", seed=3)
    assert ext.is_proxy and "proxy" in ext.name and not ext.has_logits
    feats = ext(images(5), batch_size=2)
    assert feats.shape == (5, ext.dim) and feats.dtype == np.float32 and np.isfinite(feats).all()
    assert ext(images(0)).shape == (0, ext.dim)
    with pytest.raises(ValueError):
        ext.logits(images(2))


def test_proxy_is_identical_across_processes(tmp_path):
    script = ("import sys, numpy as np; from modules.features import build_feature_extractor; "
              "x = np.random.default_rng(0).integers(0, 256, size=(6, 64, 64, 3), dtype=np.uint8); "
              "np.save(sys.argv[1], build_feature_extractor('proxy', seed=7)(x))")
    out = tmp_path / "feats.npy"
    subprocess.run([sys.executable, "-c", script, str(out)], cwd=ROOT, check=True, timeout=120)
    here = build_feature_extractor("proxy", seed=7)(images(6))
    np.testing.assert_array_equal(np.load(out), here)
    assert not np.allclose(build_feature_extractor("proxy", seed=8)(images(6)), here)


# inception

@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("w") / "inception_v3_google-test.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_torchvision_weights_give_pool3(torchvision_weights):
    ext = build_feature_extractor("inception", weights_path=torchvision_weights)
    assert ext.name == "inception-v3 (torchvision weights)" and not ext.is_proxy and ext.dim == 2048
    feats, logits = ext.features_and_logits(images(3), batch_size=2)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1000)
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool of ReLU outputs


def test_inception_fid_weights_load(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(fid_inception_v3().state_dict(), path)
    ext = build_feature_extractor("auto", weights_path=path)
    assert ext.name == "inception-v3 (pytorch-fid FID weights)" and ext.n_classes == 1008
    assert ext(images(1)).shape == (1, 2048)


def test_auto_finds_hub_cache_or_falls_back_to_proxy(tmp_path, monkeypatch, torchvision_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert build_feature_extractor("auto").is_proxy
    with pytest.raises(UsageError):
        build_feature_extractor("inception")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "inception_v3_google-0cc3c7bd.pth").symlink_to(torchvision_weights)
    assert build_feature_extractor("auto").name == "inception-v3 (torchvision weights)"


def test_missing_or_corrupt_weights_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        build_feature_extractor("inception", weights_path=tmp_path / "nope.pth")
    with pytest.raises(UsageError, match="not found"):
        build_feature_extractor("auto", weights_path=tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read"):
        build_feature_extractor("inception", weights_path=bad)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(UsageError, match="not an Inception"):
        build_feature_extractor("inception", weights_path=other)
    with pytest.raises(UsageError):
        build_feature_extractor("vgg")


def test_fid_blocks_change_only_the_pool_branch():
    torch.manual_seed(2)
    x = torch.randn(1, 192, 9, 9)
    tv = torchvision.models.inception.InceptionA(192, pool_features=32).eval()
    fid = FIDInceptionA(192, pool_features=32).eval()
    fid.load_state_dict(tv.state_dict())
    with torch.no_grad():
        a, b = tv._forward(x), fid._forward(x)
        for ta, tb in zip(a[:-1], b[:-1]):
            torch.testing.assert_close(ta, tb)
        pooled = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        torch.testing.assert_close(b[-1], fid.branch_pool(pooled))
        assert not torch.allclose(a[-1], b[-1])  # the borders differ
        e2 = FIDInceptionE2(2048).eval()
        y = torch.randn(1, 2048, 4, 4)
        torch.testing.assert_close(e2._forward(y)[-1], e2.branch_pool(F.max_pool2d(y, 3, stride=1, padding=1)))


def test_tf1_resize_matrix_is_tf_legacy_bilinear():
    a = tf1_resize_matrix(4, 6).numpy()  # src = dst * 4/6, clamped at the last pixel
    src = np.arange(6) * 4 / 6
    want = np.zeros((6, 4))
    for o, s in enumerate(src):
        lo = int(np.floor(s))
        want[o, lo] += 1 - (s - lo)
        want[o, min(lo + 1, 3)] += s - lo
    np.testing.assert_allclose(a, want, atol=1e-7)
    np.testing.assert_allclose(a.sum(1), 1, atol=1e-6)
