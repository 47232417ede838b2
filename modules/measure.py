"""Measuring what the finish will cost on this device before training: the finish reserve (plan.py) is built from
these times, so training stops early enough to write the zip."""
import io
import math
import time

import numpy as np
import torch
from PIL import Image

from modules.evaluate import MAX_CROPS_PIXEL_NN
from modules.metrics import frechet_distance, memorization_distance, nearest_pixel
from modules.submission import encode_pngs
from modules.utils import cpu_count, warn

SQRTM_PROBE_DIM = 512  # the Fréchet sqrtm is timed at this size and scaled by (dim / size)^3
SELF_CHECK_PROBE = 200  # images the self-check's parts are timed on, whatever the generation batch
CPU_GEN_BATCH_MAX = 64  # on the CPU the finish generates at most this many images at once: memory grows with the batch
# (~10 MB per image at full width: 4.8 GiB at 500), the time per image hardly drops past a few dozen


def _timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return time.monotonic() - t0, out


def measure_finish_seconds(sampler, *, n_images, workers, disk_bytes_per_s, checkpoint_state, self_check, extractor,
                           n_reference, crops, check=None):
    """Time each part of the finish on a sample and scale it to the whole run's finish:

    generate: two real batches (sampler.batch, at most n_images) after a warm-up one (the slower counts); a batch that
    does not fit is halved;
    zip: writing and re-reading at the measured disk speed, verification, and what PNG encoding takes beyond the
    generation it overlaps (all of it on one core);
    checkpoint: serialising the trainer's state (checkpoint_state) and writing it;
    self_check (if self_check): the pixel nearest-neighbour search against crops (uint8 [N,64,64,3]) and, with an
    Inception extractor (None: no FID), features, covariances, the Fréchet sqrtm (scaled by dim^3) and the
    memorization distance matrix against n_reference images.
    check: called with the parts estimated so far ({part: seconds}) after the first timed generation batch and after
    each part; it raises to stop measuring a finish that cannot fit the budget (None: not checked).
    -> ({part: seconds}, {"batch": generation batch that fits, "zip_bytes": ..., "checkpoint_bytes": ...,
    "encode_hidden_s": PNG encoding expected to run on other cores during generation, not in the zip's estimate})
    """
    check = check or (lambda partial: None)
    cap = CPU_GEN_BATCH_MAX if sampler.device.type == "cpu" else n_images
    times, imgs, batch = _time_generation(sampler.with_batch(min(sampler.batch, n_images, cap)),
                                          first=lambda dt, b: check({"generate": dt * math.ceil(n_images / b)}))
    est = {"generate": max(times) * math.ceil(n_images / batch)}
    check(est)
    scale = n_images / len(imgs)
    t_enc, pngs = _timed(encode_pngs, imgs, workers)
    zip_bytes = (sum(map(len, pngs)) + 100 * len(pngs)) * scale  # + zip headers
    t_verify, _ = _timed(lambda: [Image.open(io.BytesIO(b)).size for b in pngs])
    t_enc *= scale
    hidden = 0.0
    if sampler.device.type == "cuda" or cpu_count() > 1:  # encoded on other cores while generating: only the excess
        hidden = min(t_enc, est["generate"])
        t_enc -= hidden
    est["zip"] = (t_enc + t_verify * scale + 2 * zip_bytes / disk_bytes_per_s) * 1.2
    check(est)
    buf = io.BytesIO()
    t_ser, _ = _timed(torch.save, checkpoint_state, buf)
    est["checkpoint"] = (t_ser + buf.tell() / disk_bytes_per_s) * 1.2
    check(est)
    info = {"batch": batch, "zip_bytes": int(zip_bytes), "checkpoint_bytes": buf.tell(), "encode_hidden_s": hidden}
    if self_check:
        est["self_check"] = _self_check_seconds(imgs, extractor=extractor, device=sampler.device, n_images=n_images,
                                                n_reference=n_reference, crops=crops)
    return est, info


def _time_generation(sampler, first):
    """-> (seconds of two timed batches, the last batch's images, the batch that fits): a warm-up batch (cudnn
    autotune, allocator), then seeds 1 and 2; out of memory halves the batch (down to 8). first(seconds, batch): called
    after the first timed batch (it may raise: the second is not timed then)."""
    batch = sampler.batch
    while True:
        try:
            sampler(batch)  # warm-up
            times = []
            for seed in (1, 2):
                dt, imgs = _timed(sampler, batch, seed)
                times.append(dt)
                if seed == 1:
                    first(dt, batch)
            return times, imgs, batch
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            if batch <= 8:
                raise
            warn(f"generating {batch} images at once does not fit ({type(exc).__name__}): trying {batch // 2}")
            batch //= 2
            sampler = sampler.with_batch(batch)
            if sampler.device.type == "cuda":
                torch.cuda.empty_cache()


def _self_check_seconds(imgs, *, extractor, device, n_images, n_reference, crops):
    """The self-check's time, from its parts timed on SELF_CHECK_PROBE images (per-call overheads must not scale)."""
    k = SELF_CHECK_PROBE
    probe = np.resize(imgs, (k, *imgs.shape[1:]))
    nearest_pixel(probe[:8], crops[:8], device=device)  # warm-up: the first call sets up kernels and threads
    m_crops = min(len(crops), 1024)
    t_pix, _ = _timed(nearest_pixel, probe, crops[:m_crops], device=device)
    seconds = t_pix * n_images / k * min(len(crops), MAX_CROPS_PIXEL_NN) / m_crops
    if extractor is not None:  # FID: features of both sets, covariances, the sqrtm, the memorization distances
        rng, dim = np.random.default_rng(0), extractor.dim
        extractor.features_and_logits(probe[:8])  # warm-up
        t_feat, _ = _timed(extractor.features_and_logits, probe)
        feats = rng.random((k, dim))
        t_cov, _ = _timed(lambda: feats.T @ feats)  # RunningStats: float64 [D,D] per chunk
        m = min(dim, SQRTM_PROBE_DIM)
        a = rng.standard_normal((m, 2 * m))
        sigma = a @ a.T / (2 * m)
        t_sqrtm = _timed(frechet_distance, np.zeros(m), sigma, np.zeros(m), sigma)[0] * (dim / m) ** 3
        m_ref = max(min(n_reference, 2048), 1)
        t_mem, _ = _timed(memorization_distance, feats.astype(np.float32), rng.random((m_ref, dim)))
        seconds += ((t_feat + t_cov) * (n_images + n_reference) / k + t_sqrtm
                    + t_mem * n_images / k * n_reference / m_ref)
    return 1.3 * seconds
