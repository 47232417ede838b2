"""Finishing a run: measuring what the finish will cost on this device (the watchdog's reserve), generating the
images, writing and verifying the zip, the self-check, samples.png and losses.png."""
import contextlib
import io
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from torch.nn.utils import parametrize

from modules.evaluate import MAX_CROPS_PIXEL_NN, evaluate_images, self_check
from modules.metrics import frechet_distance, memorization_distance, nearest_pixel
from modules.report import plot_losses, save_grid
from modules.sample import generate_images, prepare_for_sampling, sampling_mode, to_uint8, truncated_z
from modules.submission import SubmissionError, encode_pngs, write_submission
from modules.utils import UsageError, cpu_count, format_duration, log, warn

SAMPLE_GRID_BREEDS = 8  # rows of samples.png: one breed per row
SQRTM_PROBE_DIM = 512  # the Fréchet sqrtm is timed at this size and scaled by (dim / size)^3
FINISH_SAFETY = 1.25  # measured finish times x this: they are timed on ~1% of the work, and other load comes and goes
FINISH_EXIT_S = 2.0  # report, last log lines and interpreter exit after the zip
FINISH_PICTURES_S = 2.0  # samples.png and losses.png, plus G on 64 latents


# finishing: generation, self-check, zip


def _finish_timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return time.monotonic() - t0, out


def measure_finish_seconds(G, *, n_images, z_dim, label_counts, truncation, batch_size, device, amp_dtype, workers,
                           disk_bytes_per_s, checkpoint_state, extractor=None, n_reference=0, crops=None):
    """Time each part of the finish on a sample and scale it to the whole run's finish:

    generate: two real batches after a warm-up one (the slower counts); a batch that does not fit is halved;
    zip: writing and re-reading at the measured disk speed, verification, and what PNG encoding takes beyond the
    generation it overlaps (all of it on one core);
    checkpoint: serialising the trainer's state and writing it;
    self_check (with an extractor): features, covariances, the Fréchet sqrtm (scaled by dim^3, Inception only), the
    memorization distance matrix and the pixel nearest-neighbour search.
    -> ({part: seconds}, {"batch": generation batch that fits, "zip_bytes": ..., "checkpoint_bytes": ...})
    """
    batch = min(batch_size, n_images)
    gen_kw = dict(z_dim=z_dim, label_counts=label_counts, truncation=truncation, device=device, amp_dtype=amp_dtype)
    while True:
        try:
            generate_images(G, n=batch, batch_size=batch, **gen_kw)  # warm-up (cudnn autotune, allocator)
            times = []
            for seed in (1, 2):
                dt, imgs = _finish_timed(generate_images, G, n=batch, batch_size=batch, seed=seed, **gen_kw)
                times.append(dt)
            break
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            if batch <= 8:
                raise
            warn(f"generating {batch} images at once does not fit ({type(exc).__name__}): trying {batch // 2}")
            batch //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()
    est = {"generate": max(times) * math.ceil(n_images / batch)}
    scale = n_images / len(imgs)
    t_enc, pngs = _finish_timed(encode_pngs, imgs, workers)
    zip_bytes = (sum(map(len, pngs)) + 100 * len(pngs)) * scale  # + zip headers
    t_verify, _ = _finish_timed(lambda: [Image.open(io.BytesIO(b)).size for b in pngs])
    t_enc *= scale
    if device.type == "cuda" or cpu_count() > 1:  # encoded on other cores while generating: only the excess counts
        t_enc = max(0.0, t_enc - est["generate"])
    est["zip"] = (t_enc + t_verify * scale + 2 * zip_bytes / disk_bytes_per_s) * 1.2
    buf = io.BytesIO()
    t_ser, _ = _finish_timed(torch.save, checkpoint_state, buf)
    est["checkpoint"] = (t_ser + buf.tell() / disk_bytes_per_s) * 1.2
    info = {"batch": batch, "zip_bytes": int(zip_bytes), "checkpoint_bytes": buf.tell()}
    if extractor is not None:
        k, n_all, dim = 200, n_images + n_reference, extractor.dim
        probe = np.resize(imgs, (k, *imgs.shape[1:]))  # 200 images whatever the batch: per-call overheads must not scale
        rng = np.random.default_rng(0)
        extractor(probe[:8])  # warm-ups: the first call of each sets up kernels and threads
        nearest_pixel(probe[:8], crops[:8], device=extractor.device)
        t_feat, _ = _finish_timed(extractor, probe)
        feats = rng.random((k, dim))
        t_cov, _ = _finish_timed(lambda: feats.T @ feats)  # RunningStats: float64 [D,D] per chunk
        t_sqrtm = 0.0
        if not extractor.is_proxy:
            m = min(dim, SQRTM_PROBE_DIM)
            a = rng.standard_normal((m, 2 * m))
            sigma = a @ a.T / (2 * m)
            t_sqrtm = _finish_timed(frechet_distance, np.zeros(m), sigma, np.zeros(m), sigma)[0] * (dim / m) ** 3
        m_ref = max(min(n_reference, 2048), 1)
        t_mem, _ = _finish_timed(memorization_distance, feats.astype(np.float32), rng.random((m_ref, dim)))
        m_crops = min(len(crops), 1024)
        t_pix, _ = _finish_timed(nearest_pixel, probe, crops[:m_crops], device=extractor.device)
        est["self_check"] = 1.3 * ((t_feat + t_cov) * n_all / k + t_sqrtm + t_mem * n_images / k * n_reference / m_ref
                                   + t_pix * n_images / k * min(len(crops), MAX_CROPS_PIXEL_NN) / m_crops)
    return est, info


@contextlib.contextmanager
def fast_inference(G, device):
    """Around generation with G: spectral norm's W / sigma computed once, not per batch (parametrize.cached), and on the
    CPU the channels-last layout (oneDNN's faster convolutions: ~25-35% less time per image at smoke widths, measured
    by tests/bench/bench_finish.py); the layout is restored after. The images are the same up to float rounding (a
    uint8 value off by one in ~1e-5 of them)."""
    channels_last = device.type == "cpu"
    if channels_last:
        G.to(memory_format=torch.channels_last)
    try:
        with parametrize.cached():
            yield G
    finally:
        if channels_last:
            G.to(memory_format=torch.contiguous_format)


def _finish_generate(G, *, n, batch, gen_kw, device, report, workers=1):
    """All n images -> (uint8 [n,H,W,3], their PNG bytes or None), the PNGs encoded on `workers` threads while the
    next batches are generated. A failure (CUDA OOM) is retried once at a quarter of the batch, without the encoding."""
    try:
        with fast_inference(G, device), ThreadPoolExecutor(max(workers, 1)) as pool:
            encoded = []  # futures of each batch's PNG bytes, in order (zlib and torch release the GIL)
            images = generate_images(G, n=n, batch_size=batch, **gen_kw,
                                     on_batch=lambda b: encoded.append(pool.submit(encode_pngs, b, 1)))
            return images, [png for future in encoded for png in future.result()]
    except Exception as exc:
        warn(f"generation failed ({type(exc).__name__}: {exc}); retrying at a smaller batch")
        report.warn(f"generation retried: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return generate_images(G, n=n, batch_size=max(1, batch // 4), **gen_kw), None


def _finish_write_zip(images, zip_path, *, workers, corrupt, report, retry_s, deadline, pngs=None):
    """The verified zip (pngs: the images' PNG bytes, encoded already). A UsageError (a full disk, a read-only folder)
    ends the run at once; another failure is retried single-threaded, encoding afresh, when the budget has retry_s
    seconds left, else, or when it fails again, raises SubmissionError. Either way any earlier zip at zip_path is left
    as it was."""
    try:
        return write_submission(images, zip_path, workers=workers, corrupt=corrupt, pngs=pngs)
    except UsageError:
        raise
    except Exception as exc:
        if deadline.remaining() < retry_s:
            raise SubmissionError(f"{exc} (no time left to retry)") from None
        warn(f"writing the zip failed ({type(exc).__name__}: {exc}); retrying single-threaded")
        report.warn(f"zip retried: {exc}")
    try:
        return write_submission(images, zip_path, workers=1, corrupt=corrupt)
    except (UsageError, SubmissionError):
        raise
    except Exception as exc:
        raise SubmissionError(f"{zip_path}: {type(exc).__name__}: {exc}") from None


def finish(trainer, *, data, out_dir, n_images, z_dim, truncation, seed, workers, self_check_on, corrupt_zip, deadline,
           extractor, timer, report, estimates, batch, slowdown, stop_event):
    """Generate the images and write the verified zip (always), then report.json; then, while the budget allows and
    no interrupt came, the self-check (on the very images in the zip) and the pictures; report.json again at the end.

    report: the RunReport, filled in here (zip, metrics, self_check, samples_breeds, warnings). slowdown: how much
    slower the machine runs than when the estimates were measured (TrainSummary.slowdown). corrupt_zip: a test fault.
    """
    G = trainer.generator_to_ship()
    label_counts = np.bincount(data.labels, minlength=len(data.classes))
    gen_kw = dict(z_dim=z_dim, label_counts=label_counts, truncation=truncation, amp_dtype=trainer.amp_dtype,
                  device=trainer.device, seed=seed)
    with timer.phase("generate"):  # the PNGs are encoded meanwhile
        G = prepare_for_sampling(G, z_dim=z_dim, label_counts=label_counts, truncation=truncation, batch_size=batch,
                                 device=trainer.device, amp_dtype=trainer.amp_dtype)  # sample_bn standing: its copy
        images, pngs = _finish_generate(G, n=n_images, batch=batch, gen_kw=gen_kw, device=trainer.device,
                                        report=report, workers=workers)
    zip_path = os.path.join(out_dir, "images.zip")
    report_path = os.path.join(out_dir, "report.json")
    with timer.phase("zip"):
        _finish_write_zip(images, zip_path, workers=workers, corrupt=corrupt_zip, report=report, pngs=pngs,
                          retry_s=2 * estimates["zip"] * slowdown + FINISH_EXIT_S, deadline=deadline)  # 1 thread: 2x
    log(f"wrote {zip_path}: {len(images)} verified PNGs")
    report.zip = zip_path
    report.write(report_path)  # a kill from here on still leaves the zip and a report

    interrupted = stop_event is not None and stop_event.is_set()
    if self_check_on and extractor is not None:
        need = FINISH_SAFETY * estimates.get("self_check", 0.0) * slowdown + FINISH_EXIT_S
        if interrupted or deadline.remaining() < need:
            why = "interrupted" if interrupted else (f"{format_duration(max(deadline.remaining(), 0))} left, it needs "
                                                     f"~{format_duration(need)}")
            warn(f"self-check skipped ({why}); the zip is written")
            report.warn(f"self-check skipped: {why}")
        else:
            with timer.phase("self_check"):
                try:
                    report.metrics = evaluate_images(images, data.reference, extractor)
                    report.self_check = self_check(
                        images, data.reference, data.images, extractor, out_png=os.path.join(out_dir, "nearest.png"),
                        memorization=report.metrics["memorization_distance"], seed=seed)
                    log("local metrics (not Kaggle's score): " + json.dumps(report.metrics, default=str))
                except Exception as exc:
                    warn(f"self-check failed ({type(exc).__name__}: {exc}); the zip is written all the same")
                    report.warn(f"self-check failed: {exc}")
    late = deadline.remaining() < (FINISH_PICTURES_S + FINISH_EXIT_S) * slowdown
    if late or (stop_event is not None and stop_event.is_set()):
        report.warn("pictures skipped: no time left or interrupted")
        return images
    with timer.phase("pictures"):
        try:
            report.samples_breeds = save_pictures(G, classes=data.classes, history=report.history, out_dir=out_dir,
                                                  z_dim=z_dim, truncation=truncation, seed=seed, device=trainer.device)
        except Exception as exc:
            warn(f"pictures failed ({type(exc).__name__}: {exc})")
            report.warn(f"pictures failed: {exc}")
    return images


def save_pictures(G, *, classes, history, out_dir, z_dim, truncation, seed, device):
    """samples.png: fixed z, one row per breed for a handful of breeds; losses.png: the loss curves. -> the breeds
    shown, one per row."""
    n_breeds = min(SAMPLE_GRID_BREEDS, len(classes))
    per_row = 8
    breeds = np.linspace(0, len(classes) - 1, n_breeds).round().astype(int)
    z = truncated_z(per_row, z_dim, truncation, generator=torch.Generator().manual_seed(seed))
    z = z.repeat(n_breeds, 1).to(device)
    y = torch.as_tensor(np.repeat(breeds, per_row), dtype=torch.long, device=device)
    with sampling_mode(G), torch.no_grad():
        grid = to_uint8(G(z, y))
    save_grid(grid, os.path.join(out_dir, "samples.png"), nrow=per_row)
    plot_losses(history, os.path.join(out_dir, "losses.png"))
    return [classes[i] for i in breeds]
