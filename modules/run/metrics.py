"""Kaggle's MiFID and its parts as plain functions of arrays. Every number computed here is a local estimate, not
Kaggle's score: Kaggle divided the FID of Inception pool_3 features by the memorization distance (mean over generated
images of the smallest 1 - |cos| to any training image) when that is under a threshold (0.10 public, 0.25 private).

The feature network for FID: Inception-v3 pool_3 from a local weights file (never downloaded); without one, no FID.
Two files are understood, told apart by `fc.weight`'s rows: torchvision's ImageNet weights (1000) and pytorch-fid's port
of TF's FID graph (1008), which needs the FID blocks below and gets TF's preprocessing (TF1 bilinear resize without
half-pixel centres, then (x - 128) / 128): closer to Kaggle's number than pytorch-fid's own, as torch-fidelity does.
"""
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.inception import InceptionA, InceptionC, InceptionE

from modules.recipe.utils import UsageError, log


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


INCEPTION_WEIGHT_GLOBS = ("pt_inception-2015-12-05-*.pth", "inception_v3_google-*.pth")  # preferred first
INCEPTION_CLASSES = {1000: "torchvision", 1008: "fid"}  # fc rows -> which weights file


# FID variants of the Inception blocks (pytorch-fid's FIDInceptionA/C/E_1/E_2): only the pool branch differs. TF's
# average pool ignores the zero padding, and the last block max-pools; the discarded torchvision pool branch costs one
# 1x1 conv per block, well under 1% of the network.

class _TFPoolBranch:
    pool = staticmethod(lambda x: F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False))

    def _forward(self, x):
        outputs = super()._forward(x)  # the pool branch last
        outputs[-1] = self.branch_pool(self.pool(x))
        return outputs


class FIDInceptionA(_TFPoolBranch, InceptionA):
    pass


class FIDInceptionC(_TFPoolBranch, InceptionC):
    pass


class FIDInceptionE1(_TFPoolBranch, InceptionE):
    pass


class FIDInceptionE2(_TFPoolBranch, InceptionE):
    pool = staticmethod(lambda x: F.max_pool2d(x, kernel_size=3, stride=1, padding=1))  # a quirk of the TF FID graph


def fid_inception_v3():
    """torchvision's Inception-v3 (1008 classes, no aux head) with the FID blocks: pytorch-fid's state-dict layout."""
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE1(1280)
    net.Mixed_7c = FIDInceptionE2(2048)
    return net


def tf1_resize_matrix(n_in, n_out):
    """[n_out, n_in] weights of TF1's ResizeBilinear: output pixel o samples source o * n_in / n_out (no half-pixel
    centres), between floor() and the next pixel (clamped at the edge)."""
    src = np.arange(n_out, dtype=np.float64) * (n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    a = np.zeros((n_out, n_in), np.float64)
    np.add.at(a, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(a, (np.arange(n_out), hi), frac)
    return torch.from_numpy(a).float()


# the network

class InceptionPool3(nn.Module):
    """Inception-v3 up to the 2048-d pool_3, plus its classifier: uint8 [B,H,W,3] -> (features [B,2048], logits [B,C]).
    """

    dim = 2048  # pool_3

    def __init__(self, net, *, tf_preprocess, name):
        super().__init__()
        self.net = net
        self.tf_preprocess = tf_preprocess  # True for the FID graph's weights
        self.name = name  # the feature space, printed next to every number computed in it

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float()  # [B,3,H,W] in [0,255]
        if self.tf_preprocess:
            rows = tf1_resize_matrix(x.shape[2], 299).to(x.device)
            cols = tf1_resize_matrix(x.shape[3], 299).to(x.device)
            x = (rows @ x @ cols.T - 128.0) / 128.0
        else:  # torchvision's weights see 2p - 1 (what its transform_input turns ImageNet-normalised input into)
            x = F.interpolate(x / 255.0, size=(299, 299), mode="bilinear", align_corners=False) * 2.0 - 1.0
        n = self.net
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1, n.Conv2d_4a_3x3,
                      n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        feats = n.avgpool(x).flatten(1)  # [B,2048] pool_3
        return feats, n.fc(feats)

    def features_and_logits(self, images_uint8, batch_size=200):
        """uint8 [N,H,W,3] numpy -> (features [N,2048] float32, logits [N,C] float32) numpy."""
        assert isinstance(images_uint8, np.ndarray) and images_uint8.dtype == np.uint8, "expects a uint8 numpy array"
        assert images_uint8.ndim == 4 and images_uint8.shape[-1] == 3, f"expects [N,H,W,3], got {images_uint8.shape}"
        device, n = self.net.fc.weight.device, len(images_uint8)
        feats, logits = np.empty((n, self.dim), np.float32), np.empty((n, self.net.fc.out_features), np.float32)
        # fp32 even inside a caller's autocast region: FID is sensitive to feature precision
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for i in range(0, n, batch_size):
                f, lg = self(torch.from_numpy(np.ascontiguousarray(images_uint8[i:i + batch_size])).to(device))
                feats[i:i + len(f)], logits[i:i + len(f)] = f.float().cpu().numpy(), lg.float().cpu().numpy()
        return feats, logits


def load_inception(weights_path, device):
    """Inception-v3 for whichever of the two weights files this is, loaded strictly."""
    path = Path(weights_path)
    if not path.is_file():
        raise UsageError(f"Inception weights file {str(path)!r} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"cannot read Inception weights {str(path)!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    fc = sd.get("fc.weight") if isinstance(sd, dict) else None
    n_classes = int(fc.shape[0]) if torch.is_tensor(fc) and fc.ndim == 2 else None
    if n_classes not in INCEPTION_CLASSES:
        raise UsageError(f"{str(path)!r} is not an Inception-v3 state dict (fc.weight: "
                         f"{None if fc is None else tuple(getattr(fc, 'shape', ()))}; want 1000 or 1008 rows)")
    flavour = INCEPTION_CLASSES[n_classes]
    net = fid_inception_v3() if flavour == "fid" else torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False)
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}  # the aux head is training-only
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # absent from some converted files
    if missing or unexpected:
        raise UsageError(f"{str(path)!r} does not fit Inception-v3 ({flavour}): missing {missing[:3]} "
                         f"({len(missing)}), unexpected {unexpected[:3]} ({len(unexpected)})")
    name = "inception-v3 (pytorch-fid FID weights)" if flavour == "fid" else "inception-v3 (torchvision weights)"
    extractor = InceptionPool3(net, tf_preprocess=flavour == "fid", name=name).to(device).eval().requires_grad_(False)
    log(f"features: {name} from {path}")
    return extractor


def build_feature_extractor(weights_path, device):
    """The Inception extractor from weights_path (it must exist and load), else from torch's hub cache (never
    downloaded); None: no weights, so no FID."""
    if weights_path is None:
        ckpt_dir = Path(torch.hub.get_dir()) / "checkpoints"
        found = [p for pattern in INCEPTION_WEIGHT_GLOBS for p in sorted(ckpt_dir.glob(pattern))]
        if not found:
            return None
        weights_path = found[0]
    return load_inception(weights_path, device)
