"""Finishing a run: the images, the verified zip, then the self-check, samples.png, losses.png and breeds.png.
Whether an optional part still fits is the Pace's call (budget.py): no time arithmetic here."""
import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parametrize

from modules.recipe.sample import sampling_mode, to_uint8, truncated_z
from modules.recipe.utils import UsageError, format_duration, log, parse_faults, warn
from modules.run.evaluate import NO_FID, copy_check, evaluate_images
from modules.run.report import SHEET_PER_BREED, breeds_sheet, conditioned_on_breed, plot_losses, save_grid
from modules.run.submission import SubmissionError, encode_pngs, write_submission

SAMPLE_GRID_BREEDS = 8  # rows of samples.png: one breed per row


@dataclass(frozen=True)
class FinishSettings:
    """What the finish writes."""

    n_images: int  # images in the zip
    seed: int  # the images' seed (the same seed: the same images), also samples.png's latents
    workers: int  # threads encoding PNGs
    corrupt_zip: bool  # a test fault ("zipfail"): the first zip written is corrupted
    self_check: bool  # after the zip, time allowing: FID (with Inception weights) and the pixel copy check


def build_finish_settings(cfg):
    return FinishSettings(n_images=cfg.n_images, seed=cfg.seed, workers=cfg.data_workers,
                          corrupt_zip="zipfail" in parse_faults(cfg.fault), self_check=cfg.self_check)


@contextlib.contextmanager
def fast_inference(G, device):
    """Spectral norm's W / sigma computed once, not per batch, and on the CPU the channels-last layout (oneDNN: ~25-35%
    less time per image, tests/bench/bench_finish.py), restored after. Images change by float rounding only."""
    channels_last = device.type == "cpu"
    if channels_last:
        G.to(memory_format=torch.channels_last)
    try:
        with parametrize.cached():
            yield G
    finally:
        if channels_last:
            G.to(memory_format=torch.contiguous_format)


def _finish_generate(sampler, *, n, seed, report, workers):
    """-> (uint8 [n,H,W,3], their PNG bytes or None), encoded on `workers` threads while the next batches generate.
    A failure (CUDA OOM) is retried once at a quarter of the batch, without the encoding."""
    try:
        with fast_inference(sampler.model(), sampler.device), ThreadPoolExecutor(max(workers, 1)) as pool:
            encoded = []  # futures of each batch's PNG bytes, in order (zlib and torch release the GIL)
            images = sampler(n, seed, on_batch=lambda b: encoded.append(pool.submit(encode_pngs, b, 1)))
            return images, [png for future in encoded for png in future.result()]
    except Exception as exc:
        warn(f"generation failed ({type(exc).__name__}: {exc}); retrying at a smaller batch")
        report.warn(f"generation retried: {exc}")
        if sampler.device.type == "cuda":
            torch.cuda.empty_cache()
        return sampler.with_batch(max(1, sampler.batch // 4))(n, seed), None


def _finish_write_zip(images, zip_path, *, workers, corrupt, report, pace, pngs):
    """The verified zip. A UsageError (a full disk, a read-only folder) ends the run at once; another failure is
    retried once, single-threaded and encoding afresh, when the budget allows, else raises SubmissionError."""
    try:
        return write_submission(images, zip_path, workers=workers, corrupt=corrupt, pngs=pngs)
    except UsageError:
        raise
    except Exception as exc:
        if pace.remaining() < pace.need("zip_retry"):
            raise SubmissionError(f"{exc} (no time left to retry)") from None
        warn(f"writing the zip failed ({type(exc).__name__}: {exc}); retrying single-threaded")
        report.warn(f"zip retried: {exc}")
    try:
        return write_submission(images, zip_path, workers=1, corrupt=corrupt)
    except (UsageError, SubmissionError):
        raise
    except Exception as exc:
        raise SubmissionError(f"{zip_path}: {type(exc).__name__}: {exc}") from None


def finish(sampler, *, data, out_dir, settings, extractor, pace, timer, report, stop_event):
    """The images and the verified zip (always), then report.json; then, while the budget allows and no interrupt
    came, the self-check (on the very images in the zip) and the pictures. extractor: None for no FID (no weights);
    report: the RunReport, filled in here; stop_event: set by an interrupt (or None)."""
    with timer.phase("generate"):  # the PNGs are encoded meanwhile
        sampler = sampler.ready()  # sample_bn "standing": its copy with standing statistics, for the pictures too
        images, pngs = _finish_generate(sampler, n=settings.n_images, seed=settings.seed, report=report,
                                        workers=settings.workers)
    zip_path = os.path.join(out_dir, "images.zip")
    report_path = os.path.join(out_dir, "report.json")
    with timer.phase("zip"):
        _finish_write_zip(images, zip_path, workers=settings.workers, corrupt=settings.corrupt_zip, report=report,
                          pace=pace, pngs=pngs)
    log(f"wrote {zip_path}: {len(images)} verified PNGs")
    report.zip = zip_path
    report.write(report_path)  # a kill from here on still leaves the zip and a report

    if settings.self_check:
        _finish_self_check(images, data=data, out_dir=out_dir, seed=settings.seed, extractor=extractor,
                           device=sampler.device, pace=pace, timer=timer, report=report,
                           interrupted=stop_event is not None and stop_event.is_set())
    sheet = SHEET_PER_BREED * len(data.classes) if conditioned_on_breed(sampler.model()) else 0  # breeds.png
    late = pace.remaining() < pace.need("pictures", images=sheet)
    if late or (stop_event is not None and stop_event.is_set()):
        report.warn("pictures skipped: no time left or interrupted")
        return images
    with timer.phase("pictures"):
        try:
            report.samples_breeds = save_pictures(sampler, classes=data.classes, history=report.history,
                                                  out_dir=out_dir, seed=settings.seed)
        except Exception as exc:
            warn(f"pictures failed ({type(exc).__name__}: {exc})")
            report.warn(f"pictures failed: {exc}")
    return images


def _finish_self_check(images, *, data, out_dir, seed, extractor, device, pace, timer, report, interrupted):
    """FID and MiFID with an extractor (report.metrics), and the pixel copy check (report.self_check, nearest.png); or
    a warning saying why it is skipped or failed."""
    need = pace.need("self_check")
    if interrupted or pace.remaining() < need:
        why = "interrupted" if interrupted else (f"{format_duration(max(pace.remaining(), 0))} left, it needs "
                                                 f"~{format_duration(need)}")
        warn(f"self-check skipped ({why}); the zip is written")
        report.warn(f"self-check skipped: {why}")
        return
    with timer.phase("self_check"):
        try:
            if extractor is None:
                log(NO_FID)
            else:
                report.metrics = evaluate_images(images, data.reference, extractor)
                log("local metrics (not Kaggle's score): " + json.dumps(report.metrics, default=str))
            report.self_check = copy_check(images, data.images, device=device,
                                           out_png=os.path.join(out_dir, "nearest.png"), seed=seed)
        except Exception as exc:
            warn(f"self-check failed ({type(exc).__name__}: {exc}); the zip is written all the same")
            report.warn(f"self-check failed: {exc}")


def save_pictures(sampler, *, classes, history, out_dir, seed):
    """samples.png (fixed z, one row per breed for a handful of breeds), losses.png and, for a conditional G,
    breeds.png (every breed, labelled) -> the breeds shown in samples.png."""
    G, device = sampler.model(), sampler.device
    n_breeds = min(SAMPLE_GRID_BREEDS, len(classes))
    per_row = 8
    breeds = np.linspace(0, len(classes) - 1, n_breeds).round().astype(int)
    z = truncated_z(per_row, sampler.z_dim, sampler.truncation, generator=torch.Generator().manual_seed(seed))
    z = z.repeat(n_breeds, 1).to(device)
    y = torch.as_tensor(np.repeat(breeds, per_row), dtype=torch.long, device=device)
    with sampling_mode(G, sampler.sample_bn), torch.no_grad():
        grid = to_uint8(G(z, y))
    save_grid(grid, os.path.join(out_dir, "samples.png"), nrow=per_row)
    plot_losses(history, os.path.join(out_dir, "losses.png"))
    if conditioned_on_breed(G):
        breeds_sheet(sampler, classes, seed=seed).save(os.path.join(out_dir, "breeds.png"), format="PNG")
    return [classes[i] for i in breeds]
