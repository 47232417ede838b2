"""The development quality metric: an ImageNet MobileNet-v2 (TFLite, ../shared/models/) as the referee.

uint8 [N,64,64,3] images -> 1280-d pooled features (bilinear resize to 224, one image per invoke, dequantized) ->
`fid_mnv2` (Fréchet distance of the feature statistics) and `mem_mnv2` (Kaggle's memorization distance: mean over
generated images of the minimum cosine distance to any reference image). The reference is what Kaggle's public scorer
used: every whole training image squashed to 64x64 (`DogData.reference`); its statistics are cached in
tests/bench/.cache/ keyed by the data dir, the image count and the model's sha256.

These are development numbers for comparing runs with each other at equal sample counts. They are NOT Kaggle's score
and not Inception FID: never report them as "FID" alone. Benchmark-only: needs `pip install -r
tests/bench/requirements-bench.txt`; kernel.py never imports this file.
"""
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modules.run.metrics import frechet_distance, memorization_distance  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_PATH = Path(os.environ.get("MNV2_MODEL", ROOT.parent / "shared" / "models" / "mobilenet_v2_1.0_224_quant.tflite"))
CACHE_DIR = Path(__file__).resolve().parent / ".cache"  # git-ignored
POOL_TENSOR = "MobilenetV2/Logits/AvgPool"  # [1,1,1,1280] uint8
INPUT_SIZE = 224
MEM_THRESHOLDS = (0.10, 0.25)  # Kaggle's MiFID: a mem distance under the threshold divides the score by it


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class MobileNetV2Features:
    """uint8 [N,H,W,3] RGB -> float32 [N,1280] global-average-pool features of the quantized ImageNet MobileNet-v2."""

    dim = 1280

    def __init__(self, model_path=MODEL_PATH, threads=2):
        from ai_edge_litert.interpreter import Interpreter  # optional: benchmark-only dependency
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"MobileNet-v2 TFLite model not found at {self.model_path} (set MNV2_MODEL)")
        self.interp = Interpreter(model_path=str(self.model_path), experimental_preserve_all_tensors=True,
                                  num_threads=threads)
        self.interp.allocate_tensors()
        inp = self.interp.get_input_details()[0]
        assert tuple(inp["shape"]) == (1, INPUT_SIZE, INPUT_SIZE, 3) and inp["dtype"] == np.uint8, inp
        self.input_index = inp["index"]
        pool = [t for t in self.interp.get_tensor_details() if t["name"] == POOL_TENSOR]
        if not pool:
            raise RuntimeError(f"{self.model_path}: no tensor named {POOL_TENSOR}")
        self.pool_index = pool[0]["index"]
        self.scale, self.zero_point = pool[0]["quantization"]

    def __call__(self, images):
        images = np.asarray(images)
        assert images.ndim == 4 and images.shape[3] == 3 and images.dtype == np.uint8, (images.shape, images.dtype)
        out = np.empty((len(images), self.dim), np.float32)
        for i, im in enumerate(images):
            x = np.asarray(Image.fromarray(im, "RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR))
            self.interp.set_tensor(self.input_index, x[None])
            self.interp.invoke()
            q = self.interp.get_tensor(self.pool_index).reshape(-1).astype(np.float32)
            out[i] = (q - self.zero_point) * self.scale
        return out


def feature_stats(feats):
    """[n,D] -> (mean [D], covariance [D,D], symmetric square root of the covariance) in float64."""
    f = np.asarray(feats, np.float64)
    mu, sigma = f.mean(0), np.cov(f, rowvar=False)
    w, v = np.linalg.eigh(sigma)
    return mu, sigma, (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_mnv2(feats_a, feats_b=None, *, stats_b=None):
    """Fréchet distance between two feature sets (or a set and feature_stats(...)) in MobileNet-v2 space. Not Inception
    FID. Tr sqrtm(S_a S_b) is computed as the sum of sqrt(eigenvalues) of the symmetric R_b S_a R_b (R_b = S_b^1/2):
    the same number as scipy's sqrtm (see tests/test_mnv2.py), ~5x faster at 1280-d, and R_b is computed once."""
    mu_a, s_a, _ = feature_stats(feats_a)
    mu_b, s_b, r_b = stats_b if stats_b is not None else feature_stats(feats_b)
    eig = np.linalg.eigvalsh(r_b @ s_a @ r_b)
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2 * np.sqrt(np.clip(eig, 0, None)).sum())


def mem_mnv2(gen_feats, ref_feats):
    """Kaggle's memorization distance in MobileNet-v2 space: mean over generated rows of min over reference rows of
    1 - |cos|. 0 = every image is a copy of a reference image."""
    return memorization_distance(gen_feats, ref_feats)


def mem_penalty_note(mem):
    """What Kaggle's thresholds would do with this distance (MiFID = FID / d when d < threshold, else FID / 1)."""
    return ", ".join(f"<{t:.2f}: {'PENALISED (x%.1f)' % (1 / max(mem, 1e-15)) if mem < t else 'no penalty'}"
                     for t in MEM_THRESHOLDS)


def blur(images, size=16):
    """Down to size x size and back up (bilinear): a known, visible loss of detail for calibration."""
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)
                                .resize(im.shape[:2][::-1], Image.BILINEAR)) for im in images])


def calibration_rows(ref_images, ref_feats, extractor, *, seed=0):
    """Real-vs-real halves, blurred reals and uniform noise against the other half -> list of dict rows."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(ref_images))
    a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
    fa, fb = ref_feats[a], ref_feats[b]
    stats_b = feature_stats(fb)
    noise = rng.integers(0, 256, (len(a), *ref_images.shape[1:]), dtype=np.uint8)
    rows = [("real half A vs real half B", fa)]
    rows.append(("half A blurred 16x16 vs half B", extractor(blur(ref_images[a]))))
    rows.append(("uniform noise vs half B", extractor(noise)))
    rows.append(("half B itself (exact copies) vs half B", fb))
    return [{"case": name, "n": len(f), "n_ref": len(fb), "fid_mnv2": fid_mnv2(f, stats_b=stats_b),
             "mem_mnv2": mem_mnv2(f, fb)}
            for name, f in rows]


def format_calibration(rows):
    lines = ["| case | n vs n_ref | fid_mnv2 | mem_mnv2 |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['n']} vs {r['n_ref']} | {r['fid_mnv2']:.1f} | {r['mem_mnv2']:.4f} |" for r in rows]
    return "\n".join(lines)


def reference_features(data_dir, ref_images, extractor, *, cache_dir=CACHE_DIR, quiet=False):
    """Features of the whole training images squashed to 64x64, cached (npz) by data dir, count and model sha256.
    The first time (no cache), the calibration table is computed, printed and cached beside them."""
    key = hashlib.sha256(f"{Path(data_dir).resolve()}|{len(ref_images)}|{sha256_file(extractor.model_path)}"
                         .encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"mnv2-ref-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return z["feats"], json.loads(str(z["calibration"]))
    t0 = time.monotonic()
    feats = extractor(ref_images)
    sec = time.monotonic() - t0
    calib = calibration_rows(ref_images, feats, extractor)
    if not quiet:
        print(f"mnv2 reference: {len(ref_images)} whole images squashed to 64x64 from {data_dir}, "
              f"{len(ref_images) / sec:.0f} images/s; calibration (fid_mnv2 is not Kaggle's FID; small n inflates it):")
        print(format_calibration(calib), flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, feats=feats, calibration=json.dumps(calib))
    os.replace(tmp, path)
    return feats, calib


class Reference:
    """The reference features and their statistics (computed once)."""

    def __init__(self, feats):
        self.feats = feats
        self.stats = feature_stats(feats)


def score(gen_images, ref, extractor):
    """uint8 [N,64,64,3] generated images -> {"n", "fid_mnv2", "mem_mnv2", "seconds", "feats"} against a Reference."""
    t0 = time.monotonic()
    f = extractor(gen_images)
    return {"n": len(f), "fid_mnv2": fid_mnv2(f, stats_b=ref.stats), "mem_mnv2": mem_mnv2(f, ref.feats),
            "seconds": time.monotonic() - t0, "feats": f}
