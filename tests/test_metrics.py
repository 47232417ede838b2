import numpy as np
import pytest
import scipy.linalg

from modules.run.metrics import (MEMORIZATION_THRESHOLDS, feature_stats, frechet_distance, memorization_distance, mifid,
                                nearest_pixel)


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


# frechet distance

def test_fd_one_dimensional_closed_form():
    m1, s1, m2, s2 = 0.3, 2.0, -1.2, 0.5  # s are variances
    want = (m1 - m2) ** 2 + s1 + s2 - 2 * np.sqrt(s1 * s2)
    assert frechet_distance([m1], [[s1]], [m2], [[s2]]) == pytest.approx(want, rel=1e-10)


def test_fd_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)


def test_fd_commuting_full_covariances():
    # S1 = Q D1 Q^T and S2 = Q D2 Q^T commute, so Tr sqrt(S1 S2) = sum sqrt(d1 d2)
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    d1, d2 = rng.uniform(0.2, 4, 6), rng.uniform(0.2, 4, 6)
    s1, s2 = q @ np.diag(d1) @ q.T, q @ np.diag(d2) @ q.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(d1) + np.sum(d2) - 2 * np.sum(np.sqrt(d1 * d2))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fd_general_full_covariances_match_definition():
    rng = np.random.default_rng(2)
    s1, s2 = random_spd(rng, 8), random_spd(rng, 8)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
    # Tr sqrt(S1 S2) = Tr sqrt(S1^1/2 S2 S1^1/2), which is symmetric PSD
    r1 = scipy.linalg.sqrtm(s1).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)


def test_fd_identical_statistics_is_zero():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fd_rank_deficient_covariances_are_finite():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(5, 32)), rng.normal(size=(5, 32))  # 5 samples in 32 dims: rank-4 covariances
    fd = frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    assert np.isfinite(fd) and fd > 0


def test_fd_non_finite_sqrtm_retries_with_eps(monkeypatch):
    real_sqrtm, calls = scipy.linalg.sqrtm, []

    def fake_sqrtm(a):
        calls.append(a)
        return np.full_like(a, np.inf) if len(calls) == 1 else real_sqrtm(a)

    monkeypatch.setattr(scipy.linalg, "sqrtm", fake_sqrtm)
    s1, s2 = np.diag([1.0, 2.0]), np.diag([3.0, 4.0])
    fd = frechet_distance([0, 0], s1, [0, 0], s2, eps=0.5)
    np.testing.assert_allclose(calls[1], (s1 + 0.5 * np.eye(2)) @ (s2 + 0.5 * np.eye(2)))
    assert fd == pytest.approx(10 - 2 * (np.sqrt(1.5 * 3.5) + np.sqrt(2.5 * 4.5)))


def test_fd_imaginary_sqrtm_raises(monkeypatch):
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda a: np.eye(2) + 0.1j * np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance([0, 0], np.eye(2), [0, 0], np.eye(2))


# feature statistics

def test_feature_stats_are_float64_mean_and_unbiased_covariance():
    rng = np.random.default_rng(5)
    x = (rng.normal(size=(1003, 12)) * rng.uniform(0.1, 5, 12) + 100.0).astype(np.float32)  # large offset on purpose
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)


# memorization

def brute_force_memorization(gen, train):
    gen = gen[np.any(gen != 0, axis=1)]
    train = train[np.any(train != 0, axis=1)]
    d = np.array([[1 - abs(g @ t) / (np.linalg.norm(g) * np.linalg.norm(t)) for t in train] for g in gen])
    return d.min(axis=1).mean()


def test_memorization_matches_brute_force_with_zero_rows():
    rng = np.random.default_rng(6)
    gen, train = rng.normal(size=(37, 10)), rng.normal(size=(53, 10))
    gen[[3, 20]] = 0
    train[[0, 7, 52]] = 0
    want = brute_force_memorization(gen, train)
    assert memorization_distance(gen, train, chunk=8) == pytest.approx(want, abs=1e-6)
    assert memorization_distance(gen, train, chunk=1024) == pytest.approx(want, abs=1e-6)


def test_memorization_is_zero_for_copies_and_sign_blind():
    rng = np.random.default_rng(7)
    train = rng.uniform(0, 1, size=(200, 64)).astype(np.float32)
    gen = np.concatenate([train[::3] * 2.5, -train[1::50]])  # scaled copies and negated copies: |cos| = 1
    d = memorization_distance(gen, train, chunk=16)
    assert 0 <= d < 1e-6


def test_memorization_without_nonzero_rows_raises():
    with pytest.raises(ValueError):
        memorization_distance(np.zeros((3, 4)), np.ones((3, 4)))


# thresholding and MiFID

def test_thresholds_are_kaggles():
    assert MEMORIZATION_THRESHOLDS == {"public": 0.10, "private": 0.25}


def test_mifid_thresholds_the_distance():
    assert mifid(1.0, 0.05, 0.10) == pytest.approx(1 / 0.05)
    assert mifid(1.0, 0.10, 0.10) == pytest.approx(1.0)  # strict <
    assert mifid(1.0, 0.2, 0.10) == pytest.approx(1.0)
    assert mifid(1.0, 0.2, 0.25) == pytest.approx(1 / 0.2)
    assert mifid(1.0, float("nan"), 0.10) == pytest.approx(1.0)


def test_mifid_formula():
    assert mifid(50.0, 0.3, 0.10) == pytest.approx(50.0)
    assert mifid(50.0, 0.05, 0.10) == pytest.approx(50.0 / (0.05 + 1e-15))
    assert mifid(50.0, 0.05, 0.25) == pytest.approx(1000.0)
    assert mifid(50.0, 0.0, 0.10) == pytest.approx(50.0 / 1e-15)


# pixel nearest neighbour

def test_nearest_pixel_matches_brute_force():
    rng = np.random.default_rng(8)
    ref = rng.integers(0, 256, size=(23, 8, 8, 3), dtype=np.uint8)
    gen = rng.integers(0, 256, size=(11, 8, 8, 3), dtype=np.uint8)
    gen[4] = ref[17]  # an exact copy
    d = np.linalg.norm((gen[:, None].astype(np.float64) - ref[None].astype(np.float64)).reshape(11, 23, -1) / 255,
                       axis=2)
    idx, dist = nearest_pixel(gen, ref, chunk=5)
    np.testing.assert_array_equal(idx, d.argmin(1))
    np.testing.assert_allclose(dist, d.min(1), rtol=1e-5, atol=1e-6)
    assert idx[4] == 17 and dist[4] == 0.0
