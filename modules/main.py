"""The run: config -> output folder probe -> checkpoint check (--resume) -> GPU check -> data -> models -> measured
reserve -> training -> checkpoint, images.zip, report.json, then (time allowing) the self-check and pictures.

The only module with side effects. Nothing is lost: whatever ends training (the budget, divergence, an exception, an
interrupt), checkpoint.pt and the zip are written from the best generator the run has, the zip only by a rename after
verification; a problem the user can fix is found before training and ends with one line and exit code 2.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
import torch

from modules.checkpoint import CHECKPOINT_ARCH_KEYS, read_checkpoint, restore_checkpoint, save_checkpoint
from modules.config import config_to_json, parse_config, resolve_out_dir
from modules.data import find_data_dir, load_dogs
from modules.demo import make_demo_dataset
from modules.evaluate import evaluate_images, read_submission
from modules.features import build_feature_extractor
from modules.finish import FINISH_SAFETY, finish, finish_report, measure_finish_seconds
from modules.loop import train_loop
from modules.speed import configure_backends
from modules.submission import SubmissionError
from modules.train import build_trainer
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
EXIT_ZIP_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # exit codes besides 0
DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk


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


# main


def load_training_data(cfg):
    """-> (DogData, the --demo temp dir or None: keep it referenced while the data is needed)."""
    data_dir, demo_dir = cfg.data_dir or None, None
    if cfg.demo:
        demo_dir = tempfile.TemporaryDirectory(prefix="dogs-demo-")
        data_dir = make_demo_dataset(os.path.join(demo_dir.name, "data"), seed=cfg.seed)
        log(f"demo: synthetic dataset in {data_dir}")
    images_dir, annotation_dir = find_data_dir(data_dir)
    data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                     crop_styles=tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip()),
                     include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers, limit=cfg.data_limit or None)
    return data, demo_dir


def evaluate_submission(cfg):
    """--evaluate: the format checks Kaggle ran, then FID (or proxy), memorization and MiFID against the training data."""
    device = check_device(cfg.device)
    data, _demo_dir = load_training_data(cfg)
    extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device, seed=cfg.seed)
    images, fmt = read_submission(cfg.evaluate)
    result = {"format": fmt}
    if images is not None and len(images):
        result.update(evaluate_images(images, data.reference, extractor, crops_uint8=data.images))
    return result


def run(argv=None):
    cfg, print_config = parse_config(argv)
    if print_config:
        print(config_to_json(cfg))
        return 0
    if cfg.evaluate:  # stdout carries the JSON object alone; the log goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate_submission(cfg)
        print(json.dumps(result, indent=2, default=str))
        return 0
    budget = parse_duration(cfg.time_budget)
    deadline = Deadline(budget, start=process_start())
    if budget < MIN_BUDGET_S:
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: a run needs at least {MIN_BUDGET_S:.0f}s")
    timer = PhaseTimer()
    out_dir = resolve_out_dir(cfg.out)
    disk_speed = prepare_out_dir(out_dir, resume=cfg.resume)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    resumed = None
    if cfg.resume:  # checked before the data is read: a wrong file fails in seconds
        resumed = read_checkpoint(cfg.resume, arch={k: getattr(cfg, k) for k in CHECKPOINT_ARCH_KEYS})
    log(f"preset {cfg.preset}, arch {cfg.arch}, loss {cfg.loss}, budget {format_duration(budget)}, out {out_dir}")
    device = check_device(cfg.device)
    log(f"backends: {configure_backends(device)}")
    seed_everything(cfg.seed)
    report = {"config": dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__, "warnings": [],
              "degraded": False, "history": {}}

    with timer.phase("data"):
        data, demo_dir = load_training_data(cfg)  # demo_dir: the --demo data's temp dir, removed when run() returns
    report["data"] = data.stats

    extractor = None
    if cfg.self_check:
        extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device,
                                            seed=cfg.seed)

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
                    first_step_s=10 * estimates["generate"] / cfg.n_images * cfg.batch_size, max_steps=cfg.max_steps)
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
            complete = summary["reason"] in ("budget", "steps") and (
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
            finish_report(out_dir, report)
            print(f"error: no valid images.zip could be written ({exc}); any earlier {zip_path} is left as it was; "
                  f"the trained model is in {ckpt_path}", file=sys.stderr, flush=True)
            return EXIT_ZIP_FAILED
        report["phases"] = dict(timer.seconds)
        report["wall_seconds"] = deadline.elapsed()
        finish_report(out_dir, report)
        log(f"done: {trainer.step_count} steps, {summary.get('images_per_s', 0):.0f} images/s; {timer.summary()}; "
            f"wall {format_duration(deadline.elapsed())} of {format_duration(budget)}"
            + ("; DEGRADED run, see report.json" if report["degraded"] else ""))
        return 0
    finally:
        restore_handlers(handlers)


class KernelExit(Exception):
    """A non-zero exit in a notebook. SystemExit there shows "An exception has occurred, use %tb ..." and a warning;
    this fails the cell the same way (nbclient and Kaggle see an error, later cells do not run) and IPython shows only
    the one line that _render_traceback_ returns, under the error line main() printed."""

    def __init__(self, code):
        self.code = code
        meaning = {EXIT_ZIP_FAILED: "no valid images.zip could be written", EXIT_INTERRUPTED: "interrupted before the zip",
                   EXIT_USAGE: "a problem you can fix, named in the error line above"}
        super().__init__(f"kernel.py stopped with exit code {code}: {meaning.get(code, 'see above')}")

    def _render_traceback_(self):  # IPython's hook: the lines shown instead of a traceback
        return [f"{type(self).__name__}: {self}"]


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
    if code and "ipykernel" in sys.modules:  # a notebook: fail the cell (Save & Run All must not "succeed" without a zip)
        raise KernelExit(code)
    if code:
        sys.exit(code)
