"""Kaggle's MiFID and its parts as plain functions of arrays: no network, no disk, no GPU unless asked for.

Kaggle's public metric: FID between Inception pool_3 features of the 10,000 submitted images and of the training images,
divided by the memorization distance (mean over generated images of the smallest 1 - |cos| to any training image) when
that distance is under a threshold (0.10 public, 0.25 private), else divided by 1. Every number computed here is a local
estimate, not Kaggle's score.
"""
import warnings

import numpy as np
import scipy.linalg
import scipy.special
import torch

MEMORIZATION_THRESHOLDS = {"public": 0.10, "private": 0.25}  # Kaggle's cut-offs on the memorization distance
MIFID_EPS = 1e-15  # added to the thresholded distance before dividing, as in Kaggle's metric


# feature statistics

class RunningStats:
    """Mean and unbiased covariance of feature rows, accumulated batch by batch in float64.

    Batches are merged with Chan et al.'s pairwise update (mean and centred sum of squares), which stays accurate where
    the textbook E[xx^T] - mu mu^T loses digits.
    """

    def __init__(self):
        self.count = 0
        self._mean = None  # [D] float64
        self._m2 = None  # [D,D] float64: sum of outer products of deviations from the mean

    def update(self, feats):
        x = np.asarray(feats, dtype=np.float64)  # [n,D]
        assert x.ndim == 2, f"features must be [n,D], got shape {x.shape}"
        n = x.shape[0]
        if n == 0:
            return self
        mean_b = x.mean(axis=0)
        dev = x - mean_b
        m2_b = dev.T @ dev
        if self.count == 0:
            self._mean, self._m2 = mean_b, m2_b
        else:
            assert x.shape[1] == self._mean.shape[0], f"feature dim {x.shape[1]} != {self._mean.shape[0]}"
            total = self.count + n
            delta = mean_b - self._mean
            self._mean = self._mean + delta * (n / total)
            self._m2 = self._m2 + m2_b + np.outer(delta, delta) * (self.count * n / total)
        self.count += n
        return self

    @property
    def mean(self):
        if self.count == 0:
            raise ValueError("RunningStats is empty")
        return self._mean

    @property
    def cov(self):
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 rows, have {self.count}")
        return self._m2 / (self.count - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), computed as Kaggle's metric (and pytorch-fid) does.

    If sqrtm(S1 S2) is not finite (a singular product), retry with eps added to both diagonals. A complex square root
    whose diagonal has an imaginary part above 1e-3 raises ValueError; otherwise its real part is used.
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


# memorization

def _unit_nonzero_rows(feats):
    """Rows scaled to unit L2 norm, all-zero rows dropped. [n,D] -> [n',D] float32."""
    x = np.asarray(feats)
    assert x.ndim == 2, f"features must be [n,D], got shape {x.shape}"
    # Kaggle dropped rows whose *sum* is 0; for pooled ReLU features (all >= 0) that is the same as all-zero rows.
    x = x[np.any(x != 0, axis=1)].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def memorization_distance(gen_feats, train_feats, chunk=1024):
    """Mean over generated rows of min over training rows of 1 - |cos|, in chunks of `chunk` generated rows.

    Each minimum is clipped at 0: float32 rounding can put |cos| a hair above 1, and a negative distance would flip the
    sign of MiFID.
    """
    g, t = _unit_nonzero_rows(gen_feats), _unit_nonzero_rows(train_feats)
    if len(g) == 0 or len(t) == 0:
        raise ValueError(f"memorization distance: no non-zero feature rows ({len(g)} generated, {len(t)} training)")
    mins = np.empty(len(g), np.float64)
    for i in range(0, len(g), chunk):
        sims = np.abs(g[i:i + chunk] @ t.T)  # [chunk, n_train]
        mins[i:i + chunk] = 1.0 - sims.max(axis=1)
    return float(np.maximum(mins, 0.0).mean())


def threshold_memorization(d, threshold):
    """Kaggle's distance_thresholding: keep d when it is under the threshold, else 1 (no penalty)."""
    d = float(d)
    return d if np.isfinite(d) and d < threshold else 1.0


def mifid(fid, mem_distance, threshold):
    """FID / (thresholded memorization distance + 1e-15)."""
    return float(fid) / (threshold_memorization(mem_distance, threshold) + MIFID_EPS)


# inception score

def inception_score(probs, splits=10):
    """exp(mean_x KL(p(y|x) || p(y))) on each of `splits` parts of probs [N,C]; returns (mean, std) over the parts."""
    p = np.asarray(probs, np.float64)
    assert p.ndim == 2 and len(p) >= splits, f"need probs [N>={splits},C], got shape {p.shape}"
    assert (p >= 0).all() and np.allclose(p.sum(axis=1), 1.0, atol=1e-3), "rows of probs must be distributions"
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = scipy.special.xlogy(part, part) - scipy.special.xlogy(part, py)  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


# pixel space

def nearest_pixel(gen_uint8, ref_uint8, chunk=1024, device="cpu"):
    """Nearest reference image by L2 in pixel space for every generated image.

    gen_uint8 [N,H,W,3], ref_uint8 [M,H,W,3] uint8. Returns (indices [N] int64 into ref, distances [N] float32), the
    distances being L2 norms over pixels scaled to [0,1]. Works in float32 blocks of `chunk` x `chunk` on `device`;
    the argmin comes from |g|^2 + |r|^2 - 2 g.r, and the returned distance is recomputed directly from g - r.
    """
    assert gen_uint8.dtype == np.uint8 and ref_uint8.dtype == np.uint8, "nearest_pixel takes uint8 images"
    assert gen_uint8.shape[1:] == ref_uint8.shape[1:] and len(ref_uint8) > 0, "image shapes differ or no references"
    n, m = len(gen_uint8), len(ref_uint8)
    gen_flat, ref_flat = gen_uint8.reshape(n, -1), ref_uint8.reshape(m, -1)

    def block(a, i):  # [chunk,D] float32, centred on 0 so the squared norms (and their rounding) stay small
        return torch.from_numpy(a[i:i + chunk]).to(device).float().div_(255.0).sub_(0.5)

    best = np.zeros(n, np.int64)
    dist = np.zeros(n, np.float32)
    with torch.inference_mode():
        ref_sq = torch.cat([block(ref_flat, j).square().sum(1) for j in range(0, m, chunk)])  # [M]
        for i in range(0, n, chunk):
            g = block(gen_flat, i)
            best_d2 = torch.full((len(g),), float("inf"), device=g.device)
            best_j = torch.zeros(len(g), dtype=torch.int64, device=g.device)
            for j in range(0, m, chunk):
                r = block(ref_flat, j)
                d2 = ref_sq[j:j + chunk][None, :] - 2.0 * (g @ r.T)  # [chunk_g, chunk_r], |g|^2 left out: same per row
                d2_min, j_min = d2.min(dim=1)
                better = d2_min < best_d2
                best_d2 = torch.where(better, d2_min, best_d2)
                best_j = torch.where(better, j_min + j, best_j)
            nearest = torch.from_numpy(ref_flat[best_j.cpu().numpy()]).to(device).float().div_(255.0).sub_(0.5)
            best[i:i + len(g)] = best_j.cpu().numpy()
            dist[i:i + len(g)] = (g - nearest).norm(dim=1).cpu().numpy()
    return best, dist
