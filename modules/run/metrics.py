"""Kaggle's MiFID and its parts as plain functions of arrays. Every number computed here is a local estimate, not
Kaggle's score: Kaggle divided the FID of Inception pool_3 features by the memorization distance (mean over generated
images of the smallest 1 - |cos| to any training image) when that is under a threshold (0.10 public, 0.25 private).
"""
import warnings

import numpy as np
import scipy.linalg
import torch

MEMORIZATION_THRESHOLDS = {"public": 0.10, "private": 0.25}  # Kaggle's cut-offs on the memorization distance


def feature_stats(feats):
    """[n,D] -> (mean [D], unbiased covariance [D,D]), both float64."""
    return np.mean(feats, axis=0, dtype=np.float64), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), as Kaggle's metric (and pytorch-fid) computes it: a singular
    product is retried with eps on both diagonals; an imaginary part above 1e-3 on sqrtm's diagonal raises ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    assert mu1.shape == mu2.shape and sigma1.shape == sigma2.shape == (mu1.shape[0],) * 2, "mismatched statistics"
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy >= 1.16 warns "Matrix is singular" where old scipy took disp=False
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _unit_nonzero_rows(feats):
    """[n,D] -> [n',D] float32 rows of unit norm; all-zero rows dropped (Kaggle dropped rows summing to 0: the same
    for ReLU features)."""
    x = np.asarray(feats, np.float64)
    x = x[np.any(x != 0, axis=1)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def memorization_distance(gen_feats, train_feats, chunk=1024):
    """Mean over generated rows of min over training rows of 1 - |cos|, `chunk` generated rows at a time. Each minimum
    is clipped at 0: float32 rounding can put |cos| a hair above 1, and a negative distance would flip MiFID's sign."""
    g, t = _unit_nonzero_rows(gen_feats), _unit_nonzero_rows(train_feats)
    if len(g) == 0 or len(t) == 0:
        raise ValueError(f"memorization distance: no non-zero feature rows ({len(g)} generated, {len(t)} training)")
    mins = np.concatenate([1.0 - np.abs(g[i:i + chunk] @ t.T).max(axis=1) for i in range(0, len(g), chunk)])
    return float(np.maximum(mins, 0.0).mean())


def mifid(fid, mem_distance, threshold):
    """Kaggle's MiFID: FID / (d + 1e-15), d the memorization distance when under the threshold, else 1 (no penalty)."""
    d = float(mem_distance)
    return float(fid) / ((d if np.isfinite(d) and d < threshold else 1.0) + 1e-15)


# pixel space

def nearest_pixel(gen_uint8, ref_uint8, chunk=1024, device="cpu"):
    """uint8 gen [N,H,W,3], ref [M,H,W,3] -> (indices [N] int64 into ref, L2 distances [N] float32 over pixels in
    [0,1]) of each generated image's nearest reference. The argmin comes from |r|^2 - 2 g.r in float32 blocks of
    `chunk` rows on `device`; the returned distance is recomputed directly from g - r."""
    assert gen_uint8.dtype == np.uint8 and ref_uint8.dtype == np.uint8, "nearest_pixel takes uint8 images"
    assert gen_uint8.shape[1:] == ref_uint8.shape[1:] and len(ref_uint8) > 0, "image shapes differ or no references"
    n, m = len(gen_uint8), len(ref_uint8)
    gen_flat, ref_flat = gen_uint8.reshape(n, -1), ref_uint8.reshape(m, -1)

    def centred(a):  # float32 centred on 0, so the squared norms (and their rounding) stay small
        return torch.from_numpy(a).to(device).float().div_(255.0).sub_(0.5)

    best = np.zeros(n, np.int64)
    dist = np.zeros(n, np.float32)
    with torch.inference_mode():
        ref_sq = torch.cat([centred(ref_flat[j:j + chunk]).square().sum(1) for j in range(0, m, chunk)])  # [M]
        for i in range(0, n, chunk):
            g = centred(gen_flat[i:i + chunk])
            d2 = torch.cat([ref_sq[j:j + chunk] - 2.0 * (g @ centred(ref_flat[j:j + chunk]).T)
                            for j in range(0, m, chunk)], dim=1)  # [chunk, M]; |g|^2 left out: the same per row
            best_j = d2.argmin(dim=1).cpu().numpy()
            best[i:i + len(g)] = best_j
            dist[i:i + len(g)] = (g - centred(ref_flat[best_j])).norm(dim=1).cpu().numpy()
    return best, dist
