"""Score images the way Kaggle did, locally: submission format checks, FID/MiFID and memorization in Inception's
feature space (when its weights are there), and the pixel copy check against the training crops.
Takes uint8 images, not models. Every number is a local estimate ("local number, not Kaggle's score").
"""
import time
import zipfile
from pathlib import Path

import numpy as np

from modules.recipe.utils import UsageError, format_duration, log, require_regular_file, warn
from modules.run.metrics import (MEMORIZATION_THRESHOLDS, feature_stats, frechet_distance, memorization_distance, mifid,
                                 nearest_pixel)
from modules.run.report import save_grid
from modules.run.submission import scan_submission

EVAL_SUBMISSION_COUNT = 10000  # images Kaggle expected in the zip
LOCAL_NOTE = "local number, not Kaggle's score"
MAX_CROPS_PIXEL_NN = 20000  # the pixel nearest-neighbour search subsamples the crops above this
NO_FID = "no FID computed: no Inception weights (pass --feature-weights, or put them in torch's hub cache)"
NEAR_COPY_RMS = 0.01  # a generated image within this RMS pixel distance (0..1 scale) of a crop is called a near copy


def read_submission(path, expected=EVAL_SUBMISSION_COUNT):
    """A zip or folder of PNGs -> (uint8 [N,64,64,3] of the readable 64x64 images or None, format report), checked by
    the kernel's own scan_submission. The report gives per problem kind its count and first names; `ok` when none."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"submission {str(path)!r} not found")
    require_regular_file(str(path), "--evaluate", folder_ok=True)
    try:
        scan = scan_submission(str(path), n_expected=expected, decode=True)
    except (zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"{str(path)!r} is neither a folder nor a readable zip ({type(exc).__name__})") from None
    report = {"path": str(path), "count": scan.count, "entries": scan.entries, "expected": expected,
              "n_loaded": len(scan.images)}
    for key, names in scan.problems.items():
        report[key] = {"count": len(names), "first": names[:5]}
    report["ok"] = scan.ok
    return (np.stack(scan.images) if scan.images else None), report


def _check_eval_images(images, what):
    assert isinstance(images, np.ndarray) and images.dtype == np.uint8, f"{what}: want a uint8 numpy array"
    assert images.ndim == 4 and images.shape[-1] == 3 and len(images) >= 2, \
        f"{what}: want [N>=2,H,W,3], got {images.shape}"


def evaluate_images(gen_uint8, reference_uint8, extractor, crops_uint8=None):
    """FID, memorization distance and MiFID (public/private thresholds) of gen [N,H,W,3] against reference [M,H,W,3]
    (Kaggle: the whole training images) in the extractor's feature space; warns when Kaggle's MiFID would penalise.
    With crops_uint8 also `memorization_distance_crops`: copies of training crops are near 0 there, not against the
    whole images."""
    _check_eval_images(gen_uint8, "generated images")
    _check_eval_images(reference_uint8, "reference images")
    t0 = time.monotonic()
    gen_feats = extractor.features_and_logits(gen_uint8)[0]
    ref_feats = extractor.features_and_logits(reference_uint8)[0]
    fd = frechet_distance(*feature_stats(gen_feats), *feature_stats(ref_feats))
    mem = memorization_distance(gen_feats, ref_feats)
    result = {"fid": fd, "memorization_distance": mem}
    for board, threshold in MEMORIZATION_THRESHOLDS.items():
        result[f"mifid_{board}"] = mifid(fd, mem, threshold)
        result[f"memorized_{board}"] = mem < threshold  # True: Kaggle's MiFID divides by the distance (a penalty)
    if crops_uint8 is not None and len(crops_uint8):
        result["memorization_distance_crops"] = memorization_distance(
            gen_feats, extractor.features_and_logits(crops_uint8)[0])
    result.update(feature_space=extractor.name, n_generated=len(gen_uint8), n_reference=len(reference_uint8),
                  seconds=time.monotonic() - t0, note=LOCAL_NOTE)
    log(f"fid {fd:.3f}, memorization {mem:.4f}, mifid public {result['mifid_public']:.3f} / private "
        f"{result['mifid_private']:.3f} [{extractor.name}, {len(gen_uint8)} vs {len(reference_uint8)} images, "
        f"{format_duration(result['seconds'])}] ({LOCAL_NOTE})")
    pub, priv = MEMORIZATION_THRESHOLDS["public"], MEMORIZATION_THRESHOLDS["private"]
    if mem < pub:
        warn(f"!!! MEMORIZATION: distance {mem:.4f} < public threshold {pub} in {extractor.name}: Kaggle's "
             f"MiFID would divide FID by {mem:.4f} (x{1 / max(mem, 1e-15):.3g}). The generator is "
             "copying training images: look at the nearest-crop pairs !!!")
    elif mem < priv:
        warn(f"memorization distance {mem:.4f} < private threshold {priv} in {extractor.name}: the private "
             "MiFID would be penalised")
    return result


def copy_check(gen_uint8, crops_uint8, *, device, out_png=None, n_show=16, seed=0):
    """Is the generator copying? Each generated image's nearest training crop in pixels (a random MAX_CROPS_PIXEL_NN
    of the crops when there are more); warns about near copies; out_png: the n_show closest pairs (generated | crop).
    """
    _check_eval_images(gen_uint8, "generated images")
    _check_eval_images(crops_uint8, "training crops")
    crop_index = np.arange(len(crops_uint8))
    if len(crops_uint8) > MAX_CROPS_PIXEL_NN:
        crop_index = np.sort(np.random.default_rng(seed).choice(len(crops_uint8), MAX_CROPS_PIXEL_NN, replace=False))
    crops = crops_uint8[crop_index]
    nn_idx, l2 = nearest_pixel(gen_uint8, crops, device=device)
    rms = l2 / np.sqrt(crops[0].size)  # per-pixel RMS distance, pixels in [0,1]
    order = np.argsort(l2, kind="stable")[:n_show]
    n_near = int((rms < NEAR_COPY_RMS).sum())
    if n_near:
        warn(f"{n_near} generated images are near copies of training crops (RMS pixel distance < {NEAR_COPY_RMS})")
    result = {
        "pixel_nn_rms": {"min": float(rms.min()), "median": float(np.median(rms)), "mean": float(rms.mean())},
        "n_near_copies": n_near, "n_crops_searched": len(crops), "crops_subsampled": len(crops) < len(crops_uint8),
        "closest": [{"generated": int(i), "crop": int(crop_index[nn_idx[i]]), "l2": float(l2[i])} for i in order],
        "note": LOCAL_NOTE,
    }
    if out_png is not None:
        gap = np.full((gen_uint8.shape[1], 2, 3), 255, np.uint8)
        pairs = np.stack([np.concatenate([gen_uint8[i], gap, crops[nn_idx[i]]], axis=1) for i in order])
        result["nearest_png"] = str(save_grid(pairs, out_png, nrow=4, pad=8))  # closest pairs first
    log(f"self-check: nearest crop RMS min {rms.min():.4f} median {np.median(rms):.4f} over {len(crops)} crops, "
        f"{n_near} near copies")
    return result
