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
import re
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
from modules.distributed import (
    DistContext,
    broadcast_object,
    end_group,
    failed_ranks,
    fork_workers,
    init_group,
    make_training_group,
    quiet_worker_output,
    rank_device,
    record_failure,
    resolve_world_size,
    split_batch,
    stop_workers,
    sync_buffers,
    torchrun_env,
    training_timeout,
)
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
    cpu_count,
    format_duration,
    log,
    parse_duration,
    process_start,
    seed_everything,
    warn,
)

MIN_BUDGET_S = 30.0  # below this no run can load data, train and write 10,000 images
EXIT_ZIP_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130  # exit codes besides 0
FAULT_RE = re.compile(r"(nan|raise|kill)@\d+|slow@\d+(\.\d*)?|zipfail")  # Config.fault items, comma-separated (tests only)
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


def check_fault(fault):
    for item in filter(None, (f.strip() for f in fault.split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={fault}: {item!r} is not nan@STEP, raise@STEP, kill@STEP (rank 1 dies), "
                             "slow@SECONDS or zipfail")


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
    check_fault(cfg.fault)
    ctx = torchrun_env() or DistContext()  # torchrun: this process is one of its ranks; else rank 0 of world
    world = ctx.world_size if ctx.launcher == "torchrun" else resolve_world_size(cfg.gpus, cfg.device)
    if world > 1:
        split_batch(cfg.batch_size, cfg.batch_per_gpu, world)  # fails early when the batch does not split
    if not ctx.is_main:
        quiet_worker_output(ctx.rank)
    timer = PhaseTimer()
    out_dir = resolve_out_dir(cfg.out)
    disk_speed = prepare_out_dir(out_dir, resume=cfg.resume) if ctx.is_main else 1.0  # only rank 0 writes
    resumed = None
    if cfg.resume:  # checked before the data is read: a wrong file fails in seconds (every rank loads it)
        resumed = read_checkpoint(cfg.resume, arch={k: getattr(cfg, k) for k in CHECKPOINT_ARCH_KEYS})
    log(f"preset {cfg.preset}, arch {cfg.arch}, loss {cfg.loss}, budget {format_duration(budget)}, out {out_dir}"
        + (f", {world} ranks ({ctx.launcher if ctx.launcher == 'torchrun' else 'forked here'})" if world > 1 else ""))
    fork = world > 1 and ctx.launcher != "torchrun"  # we start ranks 1..N-1: after the data, before CUDA
    device = None
    if not fork:
        device = check_device(rank_device(ctx, cfg.device))
        log(f"backends: {configure_backends(device)}")
    seed_everything(cfg.seed)
    report = {"config": dataclasses.asdict(cfg), "device": str(device), "torch": torch.__version__, "warnings": [],
              "degraded": False, "history": {}}

    with timer.phase("data"):
        data, demo_dir = load_training_data(cfg)  # demo_dir: the --demo data's temp dir, removed when run() returns
    report["data"] = data.stats
    run_kw = dict(cfg=cfg, deadline=deadline, budget=budget, timer=timer, out_dir=out_dir, disk_speed=disk_speed,
                  resumed=resumed, report=report, data=data, device=device)
    if fork:
        ctx = fork_workers(world, lambda wctx: worker_main(wctx, run_kw))
    return run_rank(ctx, **run_kw)


def worker_main(ctx, run_kw):
    """A forked rank (1..N-1): run_rank, then leave the process at once (never return into a notebook's loop)."""
    code = 1
    try:
        code = run_rank(ctx, **run_kw)
    except BaseException as exc:  # one line on stderr (prefixed with the rank), the reason in rank 0's store
        record_failure(f"{type(exc).__name__}: {exc}")
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    finally:
        os._exit(code)


def run_rank(ctx, *, cfg, deadline, budget, timer, out_dir, disk_speed, resumed, report, data, device):
    """The run from the device check (when not done yet) to the zip, on every rank; only rank 0 logs and writes."""
    if device is None:
        device = check_device(rank_device(ctx, cfg.device))
        log(f"backends: {configure_backends(device)}")
        report["device"] = str(device)
    if ctx.distributed:
        if not init_group(ctx, backend="nccl" if device.type == "cuda" else "gloo"):
            ctx = DistContext()  # the workers could not start: one process, one device (warned)
            report["warnings"].append("distributed start failed: ran one process")
    try:
        return _run_rank(ctx, cfg=cfg, deadline=deadline, budget=budget, timer=timer, out_dir=out_dir,
                         disk_speed=disk_speed, resumed=resumed, report=report, data=data, device=device)
    finally:
        if ctx.distributed and ctx.is_main:
            stop_workers(ctx)
            end_group(ctx)


def _run_rank(ctx, *, cfg, deadline, budget, timer, out_dir, disk_speed, resumed, report, data, device):
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if ctx.distributed:
        report["ranks"] = {"world_size": ctx.world_size, "launcher": ctx.launcher,
                           "batch_per_rank": split_batch(cfg.batch_size, cfg.batch_per_gpu, ctx.world_size)}
    extractor = None
    if cfg.self_check and ctx.is_main:
        extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device,
                                            seed=cfg.seed)

    with timer.phase("build"):
        trainer = build_trainer(cfg, data, device, rank=ctx.rank, world_size=ctx.world_size)
        prior_train_s = 0.0
        if resumed is not None:
            restore_checkpoint(resumed, cfg.resume, trainer, classes=data.classes)
            prior_train_s = float(resumed["train_seconds"])
            report["history"] = {k: list(v) for k, v in resumed.get("history", {}).items()}
            report["resumed_from"] = {"path": cfg.resume, "step": trainer.step_count, "train_seconds": prior_train_s,
                                      "plan_seconds": resumed.get("plan_seconds", prior_train_s),
                                      "complete": resumed.get("complete", True)}
    plan = None
    if ctx.is_main:
        try:
            plan = _plan_training(ctx, cfg=cfg, deadline=deadline, budget=budget, timer=timer, out_dir=out_dir,
                                  disk_speed=disk_speed, resumed=resumed, report=report, data=data, device=device, trainer=trainer,
                                  extractor=extractor, prior_train_s=prior_train_s)
        finally:  # the other ranks wait for the plan; None tells them rank 0 stopped (a usage error, a failure)
            if ctx.distributed:
                broadcast_object(ctx, plan)
    else:
        plan = broadcast_object(ctx, None)
        if plan is None:
            return 0
    estimates, info, finish_s, train_until, plan_s, dist_timeout = plan
    if ctx.distributed:  # the training group: DDP and the stop decisions, a collective timeout inside the reserve
        trainer.attach_group(make_training_group(ctx, dist_timeout))
        sync_buffers(ctx, (trainer.G, trainer.D))

    def checkpoint(train_seconds, plan_seconds, complete):
        try:
            save_checkpoint(ckpt_path, trainer, config=dataclasses.asdict(cfg), train_seconds=train_seconds,
                            n_classes=len(data.classes), classes=data.classes, plan_seconds=plan_seconds,
                            complete=complete, history=report["history"])
            return True
        except Exception as exc:  # a full disk must not end the run: the zip matters more
            warn(f"checkpoint not written ({type(exc).__name__}: {exc})")
            return False

    threads = torch.get_num_threads()
    if ctx.distributed and device.type == "cpu":  # N CPU ranks share the cores while training (rank 0 finishes on all)
        torch.set_num_threads(max(1, cpu_count() // ctx.world_size))
        log(f"{ctx.world_size} ranks on the CPU: {torch.get_num_threads()} threads each while training")
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
                    first_step_s=10 * estimates["generate"] / cfg.n_images * trainer.batch_size, max_steps=cfg.max_steps,
                    ctx=ctx)
            except KeyboardInterrupt:  # train_loop handles its own; this one came between its parts
                stop_event.set()
                summary["reason"] = "interrupted"
            except Exception as exc:  # train_loop catches failures in training; this is a last resort
                summary.update(reason="crashed", error=f"{type(exc).__name__}: {exc}")
                warn(f"training failed ({summary['error']}); writing the zip from the averaged generator")
                ctx.broken = ctx.broken or summary["error"]
        torch.set_num_threads(threads)
        if not ctx.is_main:  # the other ranks end here: rank 0 writes everything
            if summary["reason"] == "crashed":
                record_failure(summary["error"])
                return 1
            return 0
        if ctx.broken:  # a rank died or failed: say which and why, stop the forked ones, ship from rank 0's G
            failed = failed_ranks(ctx)
            stop_workers(ctx, wait_s=0.0)
            report["failed_ranks"] = {str(r): why for r, why in failed.items()}
            report["warnings"].append("ranks failed: " + ("; ".join(f"rank {r}: {w}" for r, w in failed.items())
                                                         or f"a collective failed ({ctx.broken})"))
            warn(f"{report['warnings'][-1]}; rank 0 ships the zip from its averaged generator")
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


def _plan_training(ctx, *, cfg, deadline, budget, timer, out_dir, disk_speed, resumed, report, data, device, trainer,
                   extractor, prior_train_s):
    """Rank 0: the measured finish reserve and the training window -> (estimates, info, finish_s, train_until, plan_s,
    the training group's collective timeout)."""
    label_counts = np.bincount(data.labels, minlength=len(data.classes))
    with timer.phase("build"):
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
    dist_timeout = 0.0
    if ctx.distributed:  # a collective that hangs (a dead rank) costs up to its timeout: train that much less
        dist_timeout = training_timeout(finish_s + cfg.reserve_margin_s, estimates["checkpoint"])
        train_until -= dist_timeout
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
    if ctx.distributed:
        log(f"{ctx.world_size} ranks, {split_batch(cfg.batch_size, cfg.batch_per_gpu, ctx.world_size)} images each per "
            f"step; collective timeout {format_duration(dist_timeout)}")
    return estimates, info, finish_s, train_until, plan_s, dist_timeout


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
