"""The run: config -> GPU check -> data -> models -> measured reserve -> training -> images.zip, samples and report.

The only module with side effects. Whatever happens during training (divergence, an exception, an interrupt), the zip is
written from the best generator the run has; a problem the user can fix ends with one line and exit code 2.
"""
import dataclasses
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import torch

from modules.config import config_to_json, parse_config, resolve_out_dir
from modules.data import find_data_dir, load_dogs
from modules.demo import make_demo_dataset
from modules.evaluate import evaluate_images, read_submission, self_check
from modules.features import build_feature_extractor
from modules.report import plot_losses, save_grid, write_report
from modules.sample import generate_images, truncated_z
from modules.submission import encode_pngs, write_submission
from modules.train import build_trainer, save_checkpoint, train_loop
from modules.utils import (
    Deadline,
    PhaseTimer,
    UsageError,
    check_device,
    format_duration,
    log,
    parse_duration,
    process_start,
    seed_everything,
    warn,
)

MIN_BUDGET_S = 30.0  # below this no run can load data, train and write 10,000 images
SAMPLE_GRID_BREEDS = 8  # rows of samples.png: one breed per row


# finishing: generation, self-check, zip


def measure_finish_seconds(G, *, n_images, z_dim, label_counts, truncation, batch_size, device, amp_dtype, extractor,
                           n_reference, workers, do_self_check):
    """Time one real generation batch, its PNG encoding and (if on) its feature extraction; scale to the whole finish."""
    n = min(batch_size, n_images)
    generate_images(G, n=min(n, 8), z_dim=z_dim, label_counts=label_counts, truncation=truncation, batch_size=8,
                    device=device, amp_dtype=amp_dtype)  # warm-up (cudnn autotune, allocator)
    t0 = time.monotonic()
    imgs = generate_images(G, n=n, z_dim=z_dim, label_counts=label_counts, truncation=truncation, batch_size=n,
                           device=device, amp_dtype=amp_dtype)
    t_gen = (time.monotonic() - t0) * n_images / n
    t0 = time.monotonic()
    encode_pngs(imgs, workers)
    t_zip = (time.monotonic() - t0) * n_images / n * 1.5  # + writing, re-reading and verifying the zip
    t_feat = 0.0
    if do_self_check and extractor is not None:
        k = min(n, 200)
        t0 = time.monotonic()
        extractor(imgs[:k])
        t_feat = (time.monotonic() - t0) * (n_images + n_reference) / k * 1.3  # + distances and nearest.png
    return {"generate": t_gen, "zip": t_zip, "self_check": t_feat}


def finish(trainer, *, data, out_dir, cfg, deadline, extractor, timer, report):
    """Generate the images, self-check them, write the zip (always), then the pictures and the report."""
    G = trainer.generator_to_ship()
    label_counts = np.bincount(data.labels, minlength=len(data.classes))
    gen_kw = dict(z_dim=cfg.z_dim, label_counts=label_counts, truncation=cfg.truncation, device=trainer.device,
                  amp_dtype=trainer.amp_dtype, seed=cfg.seed)
    with timer.phase("generate"):
        try:
            images = generate_images(G, n=cfg.n_images, batch_size=cfg.sample_batch, **gen_kw)
        except Exception as exc:  # e.g. CUDA OOM: once more at a quarter of the batch
            warn(f"generation failed ({type(exc).__name__}: {exc}); retrying at a smaller batch")
            report["warnings"].append(f"generation retried: {exc}")
            if trainer.device.type == "cuda":
                torch.cuda.empty_cache()
            images = generate_images(G, n=cfg.n_images, batch_size=max(1, cfg.sample_batch // 4), **gen_kw)
    if cfg.self_check and extractor is not None:
        with timer.phase("self_check"):
            try:
                report["metrics"] = evaluate_images(images, data.reference, extractor)
                report["self_check"] = self_check(
                    images, data.reference, data.images, extractor, out_png=os.path.join(out_dir, "nearest.png"),
                    memorization=report["metrics"]["memorization_distance"], seed=cfg.seed)
                log("local metrics (not Kaggle's score): " + json.dumps(report["metrics"], default=str))
            except Exception as exc:
                warn(f"self-check failed ({type(exc).__name__}: {exc}); the zip is written all the same")
                report["warnings"].append(f"self-check failed: {exc}")
    zip_path = os.path.join(out_dir, "images.zip")
    with timer.phase("zip"):
        try:
            write_submission(images, zip_path, workers=cfg.data_workers)
        except Exception as exc:
            if isinstance(exc, UsageError):
                raise
            warn(f"writing the zip failed ({type(exc).__name__}: {exc}); retrying single-threaded")
            write_submission(images, zip_path, workers=1)
    log(f"wrote {zip_path}: {len(images)} verified PNGs")
    report["zip"] = zip_path
    with timer.phase("pictures"):
        try:
            _save_pictures(G, trainer, data, out_dir, cfg, report)
        except Exception as exc:
            warn(f"pictures failed ({type(exc).__name__}: {exc})")
            report["warnings"].append(f"pictures failed: {exc}")
    return images


def _save_pictures(G, trainer, data, out_dir, cfg, report):
    """samples.png: fixed z, one row per breed for a handful of breeds; losses.png: the loss curves."""
    n_breeds = min(SAMPLE_GRID_BREEDS, len(data.classes))
    per_row = 8
    breeds = np.linspace(0, len(data.classes) - 1, n_breeds).round().astype(int)
    z = truncated_z(per_row, cfg.z_dim, cfg.truncation, generator=torch.Generator().manual_seed(cfg.seed))
    z = z.repeat(n_breeds, 1).to(trainer.device)
    y = torch.as_tensor(np.repeat(breeds, per_row), dtype=torch.long, device=trainer.device)
    was = G.training
    G.eval()
    with torch.no_grad():
        x = G(z, y).float().clamp(-1, 1)
    G.train(was)
    grid = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    save_grid(grid, os.path.join(out_dir, "samples.png"), nrow=per_row)
    report["samples_breeds"] = [data.classes[i] for i in breeds]
    plot_losses(report.get("history", {}), os.path.join(out_dir, "losses.png"))


# interrupts


def install_interrupt_handlers(stop_event):
    """First SIGINT/SIGTERM: stop training at the next step and ship the zip. Second: exit at once."""
    previous = {}

    def handler(signum, frame):
        if stop_event.is_set():
            log(f"second {signal.Signals(signum).name}: exiting now")
            os._exit(128 + signum)
        stop_event.set()
        log(f"{signal.Signals(signum).name} received: stopping training, writing the zip (interrupt again to exit)")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    return previous


def restore_handlers(previous):
    for sig, h in previous.items():
        signal.signal(sig, h)


# checkpoints


def load_checkpoint(path, trainer, cfg):
    """-> prior training seconds. A corrupt file or another architecture is a UsageError."""
    try:
        ckpt = torch.load(path, map_location=trainer.device, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume {path}: no such file") from None
    except Exception as exc:
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "dogs-gan-checkpoint-1":
        raise UsageError(f"--resume {path}: not a checkpoint written by this kernel")
    saved = ckpt.get("config", {})
    for key in ("arch", "z_dim", "g_ch", "d_ch", "shared_dim", "conditional", "attention", "spectral"):
        if saved.get(key) != getattr(cfg, key):
            raise UsageError(f"--resume {path}: checkpoint has {key}={saved.get(key)!r}, this run {getattr(cfg, key)!r};"
                             f" resume with the same preset/settings")
    try:
        trainer.load_state_dict(ckpt["trainer"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--resume {path}: does not fit this model ({str(exc).splitlines()[0][:120]})") from None
    log(f"resumed from {path}: step {trainer.step_count}, {format_duration(ckpt['train_seconds'])} trained before")
    return float(ckpt["train_seconds"])


# main


def run(argv=None):
    cfg, print_config = parse_config(argv)
    if print_config:
        print(config_to_json(cfg))
        return 0
    budget = parse_duration(cfg.time_budget)
    deadline = Deadline(budget, start=process_start())
    if budget < MIN_BUDGET_S:
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: a run needs at least {MIN_BUDGET_S:.0f}s")
    timer = PhaseTimer()
    out_dir = resolve_out_dir(cfg.out)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror}") from None
    log(f"preset {cfg.preset}, arch {cfg.arch}, loss {cfg.loss}, budget {format_duration(budget)}, out {out_dir}")
    device = check_device(cfg.device)
    seed_everything(cfg.seed)
    report = {"config": dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__, "warnings": [],
              "degraded": False, "history": {}}

    with timer.phase("data"):
        data_dir = cfg.data_dir or None
        if cfg.demo:
            data_dir = make_demo_dataset(os.path.join(tempfile.mkdtemp(prefix="dogs-demo-"), "data"), seed=cfg.seed)
            log(f"demo: synthetic dataset in {data_dir}")
        images_dir, annotation_dir = find_data_dir(data_dir)
        data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                         crop_styles=tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip()),
                         include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                         max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers,
                         limit=cfg.data_limit or None)
    report["data"] = data.stats

    extractor = None
    if cfg.self_check or cfg.evaluate:
        extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device,
                                            seed=cfg.seed)
    if cfg.evaluate:
        images, fmt = read_submission(cfg.evaluate)
        result = {"format": fmt}
        if images is not None and len(images):
            result.update(evaluate_images(images, data.reference, extractor))
        print(json.dumps(result, indent=2, default=str))
        return 0

    with timer.phase("build"):
        trainer = build_trainer(cfg, data, device)
        prior_train_s = load_checkpoint(cfg.resume, trainer, cfg) if cfg.resume else 0.0
        label_counts = np.bincount(data.labels, minlength=len(data.classes))
        finish_est = measure_finish_seconds(
            trainer.generator_to_ship(), n_images=cfg.n_images, z_dim=cfg.z_dim, label_counts=label_counts,
            truncation=cfg.truncation, batch_size=cfg.sample_batch, device=device, amp_dtype=trainer.amp_dtype,
            extractor=extractor, n_reference=len(data.reference), workers=cfg.data_workers,
            do_self_check=cfg.self_check)
    reserve = sum(finish_est.values()) + cfg.reserve_margin_s
    train_until = budget - reserve
    log(f"finish reserve {format_duration(reserve)} (measured: " +
        ", ".join(f"{k} {format_duration(v)}" for k, v in finish_est.items()) +
        f", margin {format_duration(cfg.reserve_margin_s)}); training until {format_duration(train_until)}")
    if train_until <= deadline.elapsed():
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: loading took "
                         f"{format_duration(deadline.elapsed())} and writing the images needs {format_duration(reserve)}")
    report["reserve"] = {**finish_est, "margin": cfg.reserve_margin_s}

    def checkpoint(train_seconds):
        try:
            save_checkpoint(os.path.join(out_dir, "checkpoint.pt"), trainer, config=dataclasses.asdict(cfg),
                            train_seconds=train_seconds, n_classes=len(data.classes), classes=data.classes)
        except Exception as exc:
            warn(f"checkpoint not written ({type(exc).__name__}: {exc})")

    stop_event = threading.Event()
    handlers = install_interrupt_handlers(stop_event)
    summary = {"steps": 0, "total_steps": trainer.step_count, "reason": "not started", "train_seconds_total": prior_train_s}
    try:
        with timer.phase("train"):
            summary = train_loop(
                trainer, deadline=deadline, train_until=train_until, stop_event=stop_event, tick_s=cfg.tick_s,
                check_every=cfg.check_every, snapshot_every=cfg.snapshot_every, max_rollbacks=cfg.max_rollbacks,
                rollback_lr_factor=cfg.rollback_lr_factor, checkpoint_fn=checkpoint, checkpoint_s=cfg.checkpoint_s,
                prior_train_s=prior_train_s, history=report["history"])
    except Exception as exc:  # CUDA OOM included: ship what we have
        report["degraded"] = True
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        report["warnings"].append(f"training crashed: {cause}")
        warn(f"training crashed at step {trainer.step_count} ({cause}); writing the zip from the averaged generator")
        traceback.print_exc(file=sys.stdout)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        summary["reason"] = "crashed"
        summary["total_steps"] = trainer.step_count
    finally:
        restore_handlers(handlers)
    if summary["reason"] == "diverged":
        report["degraded"] = True
    log(f"training stopped ({summary['reason']}) at step {trainer.step_count}"
        + (f", {summary['it_per_s']:.2f} it/s" if "it_per_s" in summary else ""))
    report["train"] = summary
    if cfg.checkpoint_s > 0 or cfg.resume:
        checkpoint(summary.get("train_seconds_total", prior_train_s))

    finish(trainer, data=data, out_dir=out_dir, cfg=cfg, deadline=deadline, extractor=extractor, timer=timer,
           report=report)
    report["phases"] = dict(timer.seconds)
    report["wall_seconds"] = deadline.elapsed()
    write_report(os.path.join(out_dir, "report.json"), report)
    log(f"done: {trainer.step_count} steps, {summary.get('images_per_s', 0):.0f} images/s; {timer.summary()}; "
        f"wall {format_duration(deadline.elapsed())} of {format_duration(budget)}"
        + ("; DEGRADED run, see report.json" if report["degraded"] else ""))
    return 0


def main(argv=None):
    """Entry point: returns the exit code (0 ok, 2 usage error, 130 interrupted)."""
    try:
        return run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    code = main()
    if code and "ipykernel" not in sys.modules:  # in a notebook, SystemExit would show a traceback
        sys.exit(code)
