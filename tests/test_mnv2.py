"""tests/bench/mnv2.py: the MobileNet-v2 development metric (skips without ai-edge-litert or the model file)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

import mnv2  # noqa: E402


def _feats(n, d=64, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    return (np.abs(rng.normal(size=(n, d))) + shift).astype(np.float32)  # non-negative, like pooled ReLU features


def test_fid_of_identical_feature_sets_is_zero():
    f = _feats(300)
    assert abs(mnv2.fid_mnv2(f, f)) < 1e-6


def test_fid_of_shifted_set_is_positive_and_matches_scipy_sqrtm():
    a, b = _feats(300, seed=1), _feats(300, seed=2, shift=0.5)
    fid = mnv2.fid_mnv2(a, b)
    assert fid > 0.5 ** 2 * 64 * 0.9  # the mean shift alone contributes ~64 * 0.25
    mu_a, s_a, _ = mnv2.feature_stats(a)
    mu_b, s_b, _ = mnv2.feature_stats(b)
    ref = (mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a + s_b) - 2 * np.trace(scipy.linalg.sqrtm(s_a @ s_b).real)
    assert fid == pytest.approx(ref, rel=1e-6, abs=1e-6)
    assert mnv2.fid_mnv2(a, stats_b=mnv2.feature_stats(b)) == pytest.approx(fid)


def test_memorization_of_exact_copies_is_zero_and_of_other_images_is_not():
    ref = _feats(200, seed=3)
    assert mnv2.mem_mnv2(ref[:50], ref) < 1e-6
    assert mnv2.mem_mnv2(_feats(50, seed=4), ref) > 0.01
    assert "PENALISED" in mnv2.mem_penalty_note(0.05) and "no penalty" in mnv2.mem_penalty_note(0.3)


def test_extractor_returns_1280d_finite_features():
    pytest.importorskip("ai_edge_litert")
    if not mnv2.MODEL_PATH.is_file():
        pytest.skip(f"model not found at {mnv2.MODEL_PATH}")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    images[2] = 128  # a flat grey image
    f = mnv2.MobileNetV2Features(threads=1)(images)
    assert f.shape == (3, 1280) and f.dtype == np.float32 and np.isfinite(f).all()
    assert (f >= 0).all() and f[0].any()  # pooled ReLU6 features, not all zero
    assert not np.allclose(f[0], f[2])


def test_blur_keeps_shape():
    im = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = mnv2.blur(im)
    assert out.shape == im.shape and out.dtype == np.uint8
