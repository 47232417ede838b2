"""The run: config -> output folder probe -> checkpoint check (--resume) -> GPU check -> data -> models -> measured
reserve -> training -> checkpoint, images.zip, report.json, then (time allowing) the self-check and pictures.

The only module with side effects. Nothing is lost: whatever ends training (the budget, divergence, an exception, an
interrupt), checkpoint.pt and the zip are written from the best generator the run has, the zip only by a rename after
verification; a problem the user can fix is found before training and ends with one line and exit code 2.
"""
import contextlib
import dataclasses
import io
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image

from modules.config import config_to_json, parse_config, resolve_out_dir
from modules.data import find_data_dir, load_dogs
from modules.demo import make_demo_dataset
from modules.evaluate import MAX_CROPS_PIXEL_NN, evaluate_images, read_submission, self_check
from modules.features import build_feature_extractor
from modules.metrics import frechet_distance, memorization_distance, nearest_pixel
from modules.report import plot_losses, save_grid, write_report
from modules.sample import generate_images, truncated_z
from modules.submission import SubmissionError, encode_pngs, write_submission
from modules.train import CHECKPOINT_ARCH_KEYS, build_trainer, read_checkpoint, save_checkpoint, train_loop
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
EXIT_ZIP_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # exit codes besides 0
FAULT_RE = re.compile(r"(nan|raise)@\d+|slow@\d+(\.\d*)?|zipfail")  # Config.fault items, comma-separated (tests only)
DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk
SQRTM_PROBE_DIM = 512  # the Fréchet sqrtm is timed at this size and scaled by (dim / size)^3
FINISH_SAFETY = 1.25  # measured finish times x this: they are timed on ~1% of the work, and other load comes and goes
FINISH_EXIT_S = 2.0  # report, last log lines and interpreter exit after the zip
FINISH_PICTURES_S = 2.0  # samples.png and losses.png, plus G on 64 latents


# output folder


def prepare_out_dir(out_dir, *, resume=""):
    """Create the output folder and prove it takes a file before any training (not after 9 hours): a DISK_PROBE_BYTES
    file is written, fsynced and removed. Leftovers of a killed run are removed. -> disk write speed in bytes/s."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output folder {out_dir} is a file: pass another --out")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    zip_path = os.path.join(out_dir, "images.zip")
    if os.path.lexists(zip_path) and not os.path.isfile(zip_path):
        raise UsageError(f"{zip_path} exists and is not a file: move it away")
    probe, data = os.path.join(out_dir, f".write-probe-{os.getpid()}"), os.urandom(DISK_PROBE_BYTES)
    t0 = time.monotonic()
    try:
        with open(probe, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    speed = DISK_PROBE_BYTES / max(time.monotonic() - t0, 1e-6)
    for name in ("images.zip.tmp", "checkpoint.pt.tmp"):  # a run killed while writing leaves these
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out_dir, name))
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(ckpt) and not (resume and os.path.exists(resume) and os.path.samefile(resume, ckpt)):
        warn(f"{ckpt} of an earlier run will be replaced by this run's checkpoints; to continue that run instead, "
             f"pass --resume {ckpt}")
    return speed


def check_fault(fault):
    for item in filter(None, (f.strip() for f in fault.split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={fault}: {item!r} is not nan@STEP, raise@STEP, slow@SECONDS or zipfail")


# finishing: generation, self-check, zip


def _finish_timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return time.monotonic() - t0, out


def measure_finish_seconds(G, *, n_images, z_dim, label_counts, truncation, batch_size, device, amp_dtype, workers,
                           disk_bytes_per_s, checkpoint_state, extractor=None, n_reference=0, crops=None):
    """Time each part of the finish on a sample and scale it to the whole run's finish:

    generate: two real batches after a warm-up one (the slower counts); a batch that does not fit is halved;
    zip: PNG encoding, writing and re-reading at the measured disk speed, and verification;
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
    est["zip"] = ((t_enc + t_verify) * scale + 2 * zip_bytes / disk_bytes_per_s) * 1.2
    buf = io.BytesIO()
    t_ser, _ = _finish_timed(torch.save, checkpoint_state, buf)
    est["checkpoint"] = (t_ser + buf.tell() / disk_bytes_per_s) * 1.2
    info = {"batch": batch, "zip_bytes": int(zip_bytes), "checkpoint_bytes": buf.tell()}
    if extractor is not None:
        k, n_all, dim = min(len(imgs), 200), n_images + n_reference, extractor.dim
        rng = np.random.default_rng(0)
        extractor(imgs[:8])  # warm-ups: the first call of each sets up kernels and threads
        nearest_pixel(imgs[:8], crops[:8], device=extractor.device)
        t_feat, _ = _finish_timed(extractor, imgs[:k])
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
        t_pix, _ = _finish_timed(nearest_pixel, imgs[:k], crops[:m_crops], device=extractor.device)
        est["self_check"] = 1.3 * ((t_feat + t_cov) * n_all / k + t_sqrtm + t_mem * n_images / k * n_reference / m_ref
                                   + t_pix * n_images / k * min(len(crops), MAX_CROPS_PIXEL_NN) / m_crops)
    return est, info


def _finish_generate(G, *, n, batch, gen_kw, device, report):
    """All n images; a failure (CUDA OOM) is retried once at a quarter of the batch."""
    try:
        return generate_images(G, n=n, batch_size=batch, **gen_kw)
    except Exception as exc:
        warn(f"generation failed ({type(exc).__name__}: {exc}); retrying at a smaller batch")
        report["warnings"].append(f"generation retried: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return generate_images(G, n=n, batch_size=max(1, batch // 4), **gen_kw)


def _finish_write_zip(images, zip_path, *, workers, corrupt, report, retry_s, deadline):
    """The verified zip. A UsageError (a full disk, a read-only folder) ends the run at once; another failure is retried
    single-threaded when the budget has retry_s seconds left, else, or when it fails again, raises SubmissionError.
    Either way any earlier zip at zip_path is left as it was."""
    try:
        return write_submission(images, zip_path, workers=workers, corrupt=corrupt)
    except UsageError:
        raise
    except Exception as exc:
        if deadline.remaining() < retry_s:
            raise SubmissionError(f"{exc} (no time left to retry)") from None
        warn(f"writing the zip failed ({type(exc).__name__}: {exc}); retrying single-threaded")
        report["warnings"].append(f"zip retried: {exc}")
    try:
        return write_submission(images, zip_path, workers=1, corrupt=corrupt)
    except (UsageError, SubmissionError):
        raise
    except Exception as exc:
        raise SubmissionError(f"{zip_path}: {type(exc).__name__}: {exc}") from None


def finish(trainer, *, data, out_dir, cfg, deadline, extractor, timer, report, estimates, batch, slowdown=1.0,
           stop_event=None):
    """Generate the images and write the verified zip (always), then report.json; then, while the budget allows and
    no interrupt came, the self-check (on the very images in the zip) and the pictures; report.json again at the end."""
    G = trainer.generator_to_ship()
    label_counts = np.bincount(data.labels, minlength=len(data.classes))
    gen_kw = dict(z_dim=cfg.z_dim, label_counts=label_counts, truncation=cfg.truncation, amp_dtype=trainer.amp_dtype,
                  device=trainer.device, seed=cfg.seed)
    with timer.phase("generate"):
        images = _finish_generate(G, n=cfg.n_images, batch=batch, gen_kw=gen_kw, device=trainer.device, report=report)
    zip_path = os.path.join(out_dir, "images.zip")
    with timer.phase("zip"):
        _finish_write_zip(images, zip_path, workers=cfg.data_workers, corrupt="zipfail" in cfg.fault, report=report,
                          retry_s=2 * estimates["zip"] * slowdown + FINISH_EXIT_S, deadline=deadline)  # 1 thread: 2x
    log(f"wrote {zip_path}: {len(images)} verified PNGs")
    report["zip"] = zip_path
    _finish_report(out_dir, report)  # a kill from here on still leaves the zip and a report

    interrupted = stop_event is not None and stop_event.is_set()
    if cfg.self_check and extractor is not None:
        need = FINISH_SAFETY * estimates.get("self_check", 0.0) * slowdown + FINISH_EXIT_S
        if interrupted or deadline.remaining() < need:
            why = "interrupted" if interrupted else (f"{format_duration(max(deadline.remaining(), 0))} left, it needs "
                                                     f"~{format_duration(need)}")
            warn(f"self-check skipped ({why}); the zip is written")
            report["warnings"].append(f"self-check skipped: {why}")
        else:
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
    late = deadline.remaining() < (FINISH_PICTURES_S + FINISH_EXIT_S) * slowdown
    if late or (stop_event is not None and stop_event.is_set()):
        report["warnings"].append("pictures skipped: no time left or interrupted")
        return images
    with timer.phase("pictures"):
        try:
            _save_pictures(G, trainer, data, out_dir, cfg, report)
        except Exception as exc:
            warn(f"pictures failed ({type(exc).__name__}: {exc})")
            report["warnings"].append(f"pictures failed: {exc}")
    return images


def _finish_report(out_dir, report):
    """report.json; a failure to write it is a warning: the zip is what counts."""
    try:
        write_report(os.path.join(out_dir, "report.json"), report)
    except Exception as exc:
        warn(f"report.json not written ({type(exc).__name__}: {exc})")


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


class StopRequest(threading.Event):
    """Set by the first SIGINT/SIGTERM (`why` = its name), or by a KeyboardInterrupt in training."""
    why = "KeyboardInterrupt"


def install_interrupt_handlers(stop_event):
    """First SIGINT/SIGTERM: set stop_event (training stops at the next step; the checkpoint and zip are written, the
    optional parts skipped). Second: exit at once. The handler does no buffered I/O: a print from a handler that
    interrupts a print in progress raises "reentrant call", which would land in the middle of training."""
    previous = {}

    def handler(signum, frame):
        if stop_event.is_set():
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        stop_event.why = signal.Signals(signum).name
        stop_event.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    return previous


def restore_handlers(previous):
    for sig, h in previous.items():
        signal.signal(sig, h)


# checkpoints


def restore_checkpoint(ckpt, path, trainer, *, classes):
    """Load a read_checkpoint() payload into the trainer. Another dataset's breeds or another model is a UsageError."""
    if ckpt["n_classes"] != len(classes):
        raise UsageError(f"--resume {path}: the checkpoint was trained on {ckpt['n_classes']} breeds, this data has "
                         f"{len(classes)}; resume with the same data")
    if list(ckpt["classes"]) != list(classes):
        warn(f"--resume {path}: the breed names differ from the checkpoint's; continuing with this data's")
    try:
        trainer.load_state_dict(ckpt["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise UsageError(f"--resume {path}: does not fit this model ({why[:200]})") from None


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
    check_fault(cfg.fault)
    timer = PhaseTimer()
    out_dir = resolve_out_dir(cfg.out)
    disk_speed = prepare_out_dir(out_dir, resume=cfg.resume)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    resumed = None
    if cfg.resume:  # checked before the data is read: a wrong file fails in seconds
        resumed = read_checkpoint(cfg.resume, arch={k: getattr(cfg, k) for k in CHECKPOINT_ARCH_KEYS})
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
        prior_train_s = 0.0
        if resumed is not None:
            restore_checkpoint(resumed, cfg.resume, trainer, classes=data.classes)
            prior_train_s = float(resumed["train_seconds"])
            report["history"] = {k: list(v) for k, v in resumed.get("history", {}).items()}
            report["resumed_from"] = {"path": cfg.resume, "step": trainer.step_count, "train_seconds": prior_train_s,
                                      "plan_seconds": resumed.get("plan_seconds", prior_train_s),
                                      "complete": resumed.get("complete", True)}
        label_counts = np.bincount(data.labels, minlength=len(data.classes))
        estimates, info = measure_finish_seconds(
            trainer.generator_to_ship(), n_images=cfg.n_images, z_dim=cfg.z_dim, label_counts=label_counts,
            truncation=cfg.truncation, batch_size=cfg.sample_batch, device=device, amp_dtype=trainer.amp_dtype,
            workers=cfg.data_workers, disk_bytes_per_s=disk_speed, checkpoint_state=trainer.state_dict(),
            extractor=extractor if cfg.self_check else None, n_reference=len(data.reference), crops=data.images)
    need = info["zip_bytes"] + 2 * info["checkpoint_bytes"]  # the new zip beside the old; checkpoint.pt.tmp beside it
    free = shutil.disk_usage(out_dir).free
    if free < 1.2 * need:
        raise UsageError(f"not enough disk space in {out_dir}: {free / 2**20:.0f} MiB free, the zip and checkpoint "
                         f"need about {1.2 * need / 2**20:.0f} MiB")
    finish_s = FINISH_SAFETY * sum(estimates.values())
    train_until = budget - finish_s - cfg.reserve_margin_s
    log(f"finish reserve {format_duration(finish_s + cfg.reserve_margin_s)} (measured: " +
        ", ".join(f"{k} {format_duration(v)}" for k, v in estimates.items()) +
        f", x{FINISH_SAFETY:g}, margin {format_duration(cfg.reserve_margin_s)}; disk {disk_speed / 2**20:.0f} MiB/s); "
        f"training until {format_duration(train_until)}")
    window = train_until - deadline.elapsed()
    if window <= 0:
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: loading took "
                         f"{format_duration(deadline.elapsed())} and writing the images needs "
                         f"{format_duration(finish_s + cfg.reserve_margin_s)}")
    report["reserve"] = {**estimates, "margin": cfg.reserve_margin_s, "disk_mib_s": disk_speed / 2**20}
    plan_s = prior_train_s + window
    if resumed is not None:
        step = trainer.step_count
        if resumed.get("complete", True):
            log(f"resumed from {cfg.resume} at step {step}: its training was complete "
                f"({format_duration(prior_train_s)}); training on for another {format_duration(window)}")
        else:
            plan_s = max(float(resumed.get("plan_seconds", 0.0)), prior_train_s)
            left = plan_s - prior_train_s
            log(f"resumed from {cfg.resume} at step {step}: {format_duration(prior_train_s)} of "
                f"{format_duration(plan_s)} planned training done; training the remaining {format_duration(left)}"
                + ("" if left <= window else f" (this budget allows {format_duration(window)})"))

    def checkpoint(train_seconds, plan_seconds, complete):
        try:
            save_checkpoint(ckpt_path, trainer, config=dataclasses.asdict(cfg), train_seconds=train_seconds,
                            n_classes=len(data.classes), classes=data.classes, plan_seconds=plan_seconds,
                            complete=complete, history=report["history"])
            return True
        except Exception as exc:  # a full disk must not end the run: the zip matters more
            warn(f"checkpoint not written ({type(exc).__name__}: {exc})")
            return False

    stop_event = StopRequest()
    handlers = install_interrupt_handlers(stop_event)
    log(f"training started at step {trainer.step_count} (SIGINT/SIGTERM: stop and write the zip; twice: exit now)")
    try:
        summary = {"steps": 0, "total_steps": trainer.step_count, "reason": "not started",
                   "train_seconds_total": prior_train_s, "plan_seconds": plan_s, "slowdown": 1.0, "error": None}
        with timer.phase("train"):
            try:
                summary = train_loop(
                    trainer, deadline=deadline, train_until=train_until, stop_event=stop_event, tick_s=cfg.tick_s,
                    check_every=cfg.check_every, snapshot_every=cfg.snapshot_every, max_rollbacks=cfg.max_rollbacks,
                    rollback_lr_factor=cfg.rollback_lr_factor, checkpoint_fn=checkpoint, checkpoint_s=cfg.checkpoint_s,
                    prior_train_s=prior_train_s, plan_s=plan_s, finish_s=finish_s, history=report["history"],
                    first_step_s=10 * estimates["generate"] / cfg.n_images * cfg.batch_size)
            except KeyboardInterrupt:  # train_loop handles its own; this one came between its parts
                stop_event.set()
                summary["reason"] = "interrupted"
            except Exception as exc:  # train_loop catches failures in training; this is a last resort
                summary.update(reason="crashed", error=f"{type(exc).__name__}: {exc}")
                warn(f"training failed ({summary['error']}); writing the zip from the averaged generator")
        if summary["reason"] in ("crashed", "diverged"):
            report["degraded"] = True
            report["warnings"].append(f"training {summary['reason']}" +
                                      (f": {summary['error']}" if summary.get("error") else ""))
        log(f"training stopped ({summary['reason']}"
            + (f": {stop_event.why}" if summary["reason"] == "interrupted" else "") + f") at step {trainer.step_count}"
            + (f", {summary['it_per_s']:.2f} it/s" if "it_per_s" in summary else ""))
        report["train"] = summary
        with timer.phase("checkpoint"):
            inherited = resumed is not None and not resumed.get("complete", True)  # a plan that is not this budget's
            complete = summary["reason"] == "budget" and (
                not inherited or summary["train_seconds_total"] >= 0.99 * summary["plan_seconds"] - 1.0)
            if checkpoint(summary["train_seconds_total"], summary["plan_seconds"], complete):
                log(f"wrote {ckpt_path} (step {trainer.step_count}; continue with --resume {ckpt_path})")
        zip_path = os.path.join(out_dir, "images.zip")
        try:
            finish(trainer, data=data, out_dir=out_dir, cfg=cfg, deadline=deadline, extractor=extractor, timer=timer,
                   report=report, estimates=estimates, batch=info["batch"], slowdown=summary["slowdown"],
                   stop_event=stop_event)
        except SubmissionError as exc:
            report.update(degraded=True, zip=None)
            report["warnings"].append(f"zip not written: {exc}")
            _finish_report(out_dir, report)
            print(f"error: no valid images.zip could be written ({exc}); any earlier {zip_path} is left as it was; "
                  f"the trained model is in {ckpt_path}", file=sys.stderr, flush=True)
            return EXIT_ZIP_FAILED
        report["phases"] = dict(timer.seconds)
        report["wall_seconds"] = deadline.elapsed()
        _finish_report(out_dir, report)
        log(f"done: {trainer.step_count} steps, {summary.get('images_per_s', 0):.0f} images/s; {timer.summary()}; "
            f"wall {format_duration(deadline.elapsed())} of {format_duration(budget)}"
            + ("; DEGRADED run, see report.json" if report["degraded"] else ""))
        return 0
    finally:
        restore_handlers(handlers)


def main(argv=None):
    """Entry point: returns the exit code (0 ok, also after a crash or interrupt that still wrote the zip; 1 no valid
    zip could be written; 2 usage error; 130 interrupted before the zip)."""
    try:
        return run(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    code = main()
    if code and "ipykernel" not in sys.modules:  # in a notebook, SystemExit would show a traceback
        sys.exit(code)
