import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from modules.recipe.utils import UsageError
from modules.run.metrics import (FIDInceptionA, FIDInceptionE2, build_feature_extractor, fid_inception_v3,
                              tf1_resize_matrix)


def images(n, seed=0, size=64):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


# inception

@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("w") / "inception_v3_google-test.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_torchvision_weights_give_pool3(torchvision_weights):
    ext = build_feature_extractor(torchvision_weights, "cpu")
    assert ext.name == "inception-v3 (torchvision weights)" and ext.dim == 2048
    feats, logits = ext.features_and_logits(images(3), batch_size=2)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1000)
    assert np.isfinite(feats).all() and (feats >= 0).all()  # pool of ReLU outputs


def test_inception_fid_weights_load(tmp_path):
    torch.manual_seed(1)
    path = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(fid_inception_v3().state_dict(), path)
    ext = build_feature_extractor(path, "cpu")
    feats, logits = ext.features_and_logits(images(1))
    assert ext.name == "inception-v3 (pytorch-fid FID weights)" and feats.shape == (1, 2048) and logits.shape == (1, 1008)


def test_the_hub_cache_is_searched_and_without_weights_there_is_no_extractor(tmp_path, monkeypatch,
                                                                           torchvision_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert build_feature_extractor(None, "cpu") is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "inception_v3_google-0cc3c7bd.pth").symlink_to(torchvision_weights)
    assert build_feature_extractor(None, "cpu").name == "inception-v3 (torchvision weights)"


def test_missing_or_corrupt_weights_are_usage_errors(tmp_path, monkeypatch, torchvision_weights):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # a file in the hub cache does not stand in
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "inception_v3_google-0cc3c7bd.pth").symlink_to(torchvision_weights)
    with pytest.raises(UsageError, match="not found"):
        build_feature_extractor(tmp_path / "nope.pth", "cpu")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="cannot read"):
        build_feature_extractor(bad, "cpu")
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048)}, other)
    with pytest.raises(UsageError, match="not an Inception"):
        build_feature_extractor(other, "cpu")


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
