"""The run: config -> checks (budget, faults, output path, --resume checkpoint, device) -> data -> output folder ->
models, measured finish and the TrainPlan -> training -> checkpoint, images.zip, report.json, then (time allowing) the
self-check and pictures.

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

import torch

from modules.checkpoint import (
    CHECKPOINT_ARCH_KEYS,
    describe_write_error,
    read_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from modules.config import config_to_json, parse_config, resolve_out_dir
from modules.data import KAGGLE_DATA_ROOTS, find_data_dir, load_dogs
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
from modules.finish import build_finish_settings, finish
from modules.loop import TrainSummary, train_loop
from modules.measure import measure_finish_seconds
from modules.memory import GIB, KAGGLE_IMAGES, build_memory_estimate, check_memory, device_available_bytes
from modules.pace import Pace, finish_reserve_s
from modules.plan import plan_training
from modules.report import RunReport
from modules.sample import build_sampler
from modules.speed import configure_backends, configure_threads, env_threads, pick_cpu_threads
from modules.submission import SubmissionError
from modules.train import build_trainer, describe_amp, describe_skips, resolve_amp
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
DEMO_IMAGES = 120  # make_demo_dataset's 6 breeds x 20 images: the demo's crop cache before it is made
EXIT_REJECTED = 1  # --evaluate: the submission would be rejected (its JSON is printed all the same)
KAGGLE_SESSION_S = 9 * 3600.0  # a Kaggle notebook session ends after 9 hours
DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk


def in_kaggle_session():
    """Inside a Kaggle notebook (its environment variable, or its working folder)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or os.path.isdir("/kaggle/working")


# output folder


def check_out_dir(out_dir):
    """What can be told of the output folder without creating it: a UsageError if a file stands in its place, if it
    cannot be created (a file on its path, an unwritable parent) or written. A probe file is made and removed in the
    folder, or in its nearest existing parent when the folder does not exist yet."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output folder {out_dir} is a file: pass another --out")
    zip_path = os.path.join(out_dir, "images.zip")
    if os.path.lexists(zip_path) and not os.path.isfile(zip_path):
        raise UsageError(f"{zip_path} exists and is not a file: move it away")
    exists, parent = os.path.isdir(out_dir), os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    what = "write to output folder" if exists else "create output folder"
    if not os.path.isdir(parent):
        raise UsageError(f"cannot {what} {out_dir}: {parent} is a file")
    probe = os.path.join(parent, f".out-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"cannot {what} {out_dir}: {exc.strerror or exc}") from None


def check_out_not_in_data(out_dir, data_dir):
    """The output folder must not be the data folder or inside it: samples.png and losses.png would land among the
    training images, and the next run on that folder would train on them. data_dir "" means Kaggle's input."""
    out = os.path.realpath(out_dir)
    for root in [data_dir] if data_dir else KAGGLE_DATA_ROOTS:
        root = os.path.realpath(os.path.expanduser(root))
        if os.path.isdir(root) and (out == root or out.startswith(root.rstrip(os.sep) + os.sep)):
            where = "is the data folder" if out == root else f"is inside the data folder {root}"
            raise UsageError(f"output folder {out_dir} {where}: its samples.png and losses.png would be read as "
                             "training images by the next run; pass another --out")


@contextlib.contextmanager
def removed_if_left_empty(out_dir):
    """Around the checks that follow the output folder's creation: if one fails (a UsageError), a folder this run
    created and left empty is removed again."""
    existed = os.path.isdir(out_dir)
    try:
        yield
    except UsageError:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only an empty folder
        raise


def remove_stale_temp_files(out_dir):
    """Remove what a killed run left while writing: images.zip.tmpPID and checkpoint.pt.tmpPID (atomic_file's names)
    whose process is gone, and the unnumbered names of earlier versions. Another live run's files are left alone: two
    runs sharing a folder each write their own temporary file (the later rename wins)."""
    for name in os.listdir(out_dir):
        for stem in ("images.zip.tmp", "checkpoint.pt.tmp"):
            suffix = name[len(stem):] if name.startswith(stem) else None
            if suffix is None or (suffix and not suffix.isdigit()):
                continue
            if suffix and int(suffix) != os.getpid():
                try:
                    os.kill(int(suffix), 0)
                    continue  # that process still runs
                except ProcessLookupError:
                    pass
                except (OSError, OverflowError):  # EPERM: another user's live process
                    continue
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


def prepare_out_dir(out_dir, *, resume):
    """Create the output folder and prove it takes a file before any training (not after 9 hours): a DISK_PROBE_BYTES
    file is written, fsynced and removed. Leftovers of a killed run are removed. -> disk write speed in bytes/s."""
    check_out_dir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
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
    remove_stale_temp_files(out_dir)
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
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers, limit=cfg.data_limit or None,
                     resize=cfg.crop_filter)
    return data, demo_dir


def check_setting_memory(cfg, device, *, world, data=None):
    """What the settings need (models, batch per rank, generation batch) against the memory free on the device (a CPU
    run: the host, shared by its CPU ranks), before training: -> (cfg with sample_batch lowered if only the generation
    batch did not fit (a warning), report.json's "memory"). Too much for the rest: a UsageError (one line, exit 2).
    Before the data is read (data=None) the crop cache is sized for Kaggle's 20,579 images (or data_limit, the demo's)."""
    per_rank = split_batch(cfg.batch_size, cfg.batch_per_gpu, world) if world > 1 else cfg.batch_size
    if data is not None:
        n_crops, n_classes = len(data.images), len(data.classes)
    else:
        images = DEMO_IMAGES if cfg.demo else (cfg.data_limit or KAGGLE_IMAGES)
        styles = len([s for s in cfg.crop_styles.split(",") if s.strip()]) + cfg.include_whole
        n_crops, n_classes = int(images * 1.25 * styles), 120
    est = build_memory_estimate(cfg, batch_per_rank=per_rank, n_classes=n_classes, n_crops=n_crops)
    available = device_available_bytes(device)
    where = str(device) if device.type == "cuda" else "the host"
    batch = check_memory(est, available=available, where=where, ranks=world if device.type == "cpu" else 1, world=world)
    info = {"where": where, "estimate_gib": est.peak / GIB, "available_gib": available and available / GIB,
            "state_gib": est.state / GIB, "train_gib": est.train / GIB, "generate_gib": est.generate / GIB,
            "params": est.params, "batch_per_rank": per_rank, "sample_batch": batch}
    if batch != cfg.sample_batch:
        info["sample_batch_asked"] = cfg.sample_batch
        cfg = dataclasses.replace(cfg, sample_batch=batch)
    return cfg, info


def evaluate_submission(cfg):
    """--evaluate: the format checks (the kernel's own definition of a valid submission, read first: a bad path fails
    before the data is loaded), then FID (or proxy), memorization and MiFID against the training data when at least
    two images are readable (FID needs two)."""
    images, fmt = read_submission(cfg.evaluate)
    result = {"format": fmt}
    if images is None or len(images) < 2:
        result["scores_skipped"] = f"{0 if images is None else len(images)} readable 64x64 images: scores need 2 or more"
        return result
    device = check_device(cfg.device)
    data, _demo_dir = load_training_data(cfg)
    extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device, seed=cfg.seed)
    result.update(evaluate_images(images, data.reference, extractor, crops_uint8=data.images))
    return result


def build_restored(cfg, data, device, *, ctx, resumed, report):
    """The trainer of this rank, restored from --resume (every rank loads it: Adam's state must match too)."""
    trainer = build_trainer(cfg, data, device, rank=ctx.rank, world_size=ctx.world_size)
    if resumed is not None:
        restore_checkpoint(resumed, cfg.resume, trainer, classes=data.classes)
        report.history = {k: list(v) for k, v in resumed.get("history", {}).items()}
        prior_s = float(resumed["train_seconds"])
        report.resumed_from = {"path": cfg.resume, "step": trainer.step_count, "train_seconds": prior_s,
                               "plan_seconds": resumed.get("plan_seconds", prior_s),
                               "complete": resumed.get("complete", True)}
    return trainer


def build_and_plan(cfg, data, device, *, ctx, deadline, resumed, report, extractor, out_dir, disk_speed):
    """Rank 0: the trainer (restored from --resume), the finish measured on this device, the disk space checked, and
    the plan. Several ranks: training stops earlier by the training group's collective timeout (a hung rank costs up to
    that). -> (Trainer, its Sampler, TrainPlan, collective timeout or 0); fills report.history, resumed_from and
    reserve."""
    trainer = build_restored(cfg, data, device, ctx=ctx, resumed=resumed, report=report)
    sampler = build_sampler(cfg, trainer, data)
    if device.type == "cpu" and cfg.threads == 0 and not env_threads() and cpu_count() > 1 and not ctx.distributed:
        one = sampler.with_batch(min(cfg.sample_batch, 50))
        n, times = pick_cpu_threads(lambda: one(one.batch), candidates=sorted({1, max(cpu_count() - 1, 2)}))
        log(f"torch CPU threads {n} (a generation batch: " +
            ", ".join(f"{t:.3f}s at {k}" for k, t in times.items()) + ")")
    estimates, info = measure_finish_seconds(
        sampler, n_images=cfg.n_images, workers=cfg.data_workers, disk_bytes_per_s=disk_speed,
        checkpoint_state=trainer.state_dict(), extractor=extractor, n_reference=len(data.reference), crops=data.images)
    need = info["zip_bytes"] + 2 * info["checkpoint_bytes"]  # the new zip beside the old; checkpoint.pt.tmp beside it
    free = shutil.disk_usage(out_dir).free
    if free < 1.2 * need:
        raise UsageError(f"not enough disk space in {out_dir}: {free / 2**20:.0f} MiB free, the zip and checkpoint "
                         f"need about {1.2 * need / 2**20:.0f} MiB")
    timeout = 0.0
    if ctx.distributed:
        timeout = training_timeout(finish_reserve_s(estimates) + cfg.reserve_margin_s, estimates["checkpoint"])
    plan = plan_training(budget_s=deadline.budget_s - timeout, elapsed_s=deadline.elapsed(), estimates=estimates,
                         gen_batch=info["batch"], margin_s=cfg.reserve_margin_s, n_images=cfg.n_images,
                         batch_size=trainer.batch_size, resumed=resumed, budget_text=cfg.time_budget,
                         resume_path=cfg.resume, max_steps=cfg.max_steps)
    if ctx.distributed:
        plan = dataclasses.replace(plan, budget_s=deadline.budget_s)
        log(f"{ctx.world_size} ranks, {trainer.batch_size} images each per step; collective timeout "
            f"{format_duration(timeout)} (training stops that much earlier)")
    report.reserve = {**estimates, "margin": cfg.reserve_margin_s, "disk_mib_s": disk_speed / 2**20}
    if not plan.self_check_reserved:
        report.warn("self-check not in the finish reserve (it would have taken more time than training)")
    return trainer, sampler, plan, timeout


def make_checkpointer(path, trainer, *, config, classes, report):
    """-> checkpoint(train_seconds, plan_seconds, complete) -> bool: writes path; a failure (a full disk) is one
    warning, never the end of the run: the zip matters more."""

    def checkpoint(train_seconds, plan_seconds, complete):
        try:
            save_checkpoint(path, trainer, config=config, train_seconds=train_seconds, n_classes=len(classes),
                            classes=classes, plan_seconds=plan_seconds, complete=complete, history=report.history)
            return True
        except Exception as exc:
            warn(f"checkpoint not written: {describe_write_error(exc, path)}")
            return False

    return checkpoint


def make_finish_probe(sampler, plan):
    """-> probe() -> seconds to generate one finish batch now (the loop re-times the finish with it near the end)."""
    batch = sampler.with_batch(plan.gen_batch)

    def probe():
        t0 = time.monotonic()
        batch(plan.gen_batch, seed=1)
        return time.monotonic() - t0

    return probe


def train(cfg, trainer, plan, *, sampler, deadline, stop_event, checkpoint, report, ctx):
    """The training phase: the loop, with a last resort around it. -> TrainSummary; notes a crash in report."""
    log(f"training started at step {trainer.step_count} (SIGINT/SIGTERM: stop and write the zip; twice: exit now)")
    summary = TrainSummary(total_steps=trainer.step_count, train_seconds_total=plan.prior_train_s,
                           plan_seconds=plan.plan_s)
    try:
        summary = train_loop(
            trainer, plan=plan, deadline=deadline, stop_event=stop_event, tick_s=cfg.tick_s,
            check_every=cfg.check_every, snapshot_every=cfg.snapshot_every, max_rollbacks=cfg.max_rollbacks,
            rollback_lr_factor=cfg.rollback_lr_factor, checkpoint_fn=checkpoint, checkpoint_s=cfg.checkpoint_s,
            max_steps=cfg.max_steps, history=report.history,
            finish_probe=make_finish_probe(sampler, plan), ctx=ctx)
    except KeyboardInterrupt:  # train_loop handles its own; this one came between its parts
        stop_event.set()
        summary.reason = "interrupted"
    except UsageError:  # an out-of-memory error in the first steps (train_loop): exit 2, not a crashed run
        raise
    except Exception as exc:  # train_loop catches failures in training; this is a last resort
        summary.reason, summary.error = "crashed", f"{type(exc).__name__}: {exc}"
        warn(f"training failed ({summary.error}); writing the zip from the averaged generator")
        ctx.broken = ctx.broken or summary.error
    if summary.reason in ("crashed", "diverged"):
        report.degraded = True
        report.warn(f"training {summary.reason}" + (f": {summary.error}" if summary.error else ""))
    log(f"training stopped ({summary.reason}" + (f": {stop_event.why}" if summary.reason == "interrupted" else "")
        + f") at step {trainer.step_count}" + (f", {summary.it_per_s:.2f} it/s" if summary.steps else ""))
    report.train = dataclasses.asdict(summary)
    report.precision = trainer.precision_summary()  # fp16: "N of M steps skipped" by the GradScalers
    if describe_skips(report.precision):
        log(describe_skips(report.precision))
    return summary


def run(argv=None):
    """The steps of a run. -> exit code (see main). Several ranks: this process is rank 0 and forks the others after
    the data is read (or is one of torchrun's ranks); run_rank() is the rest of the run, on every rank."""
    cfg, print_config = parse_config(argv)
    if print_config:
        print(config_to_json(cfg))
        return 0
    if cfg.evaluate:  # stdout carries the JSON object alone; the log goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = evaluate_submission(cfg)
        print(json.dumps(result, indent=2, default=str))
        if not result["format"]["ok"]:
            print(f"error: {cfg.evaluate} would be rejected: see \"format\" above", file=sys.stderr, flush=True)
            return EXIT_REJECTED
        return 0
    deadline = Deadline(parse_duration(cfg.time_budget), start=process_start())  # the log's clock too
    if deadline.budget_s < MIN_BUDGET_S:
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: a run needs at least {MIN_BUDGET_S:.0f}s")
    if deadline.budget_s > KAGGLE_SESSION_S and in_kaggle_session():
        warn(f"--time-budget {cfg.time_budget} is more than a Kaggle session's {format_duration(KAGGLE_SESSION_S)}: "
             "Kaggle stops the session first, and the zip is written only at the budget's end")
    ctx = torchrun_env() or DistContext()  # torchrun: this process is one of its ranks; else rank 0
    world = ctx.world_size if ctx.launcher == "torchrun" else resolve_world_size(cfg.gpus, cfg.device)
    if world > 1:
        split_batch(cfg.batch_size, cfg.batch_per_gpu, world)  # fails early when the batch does not split
    if not ctx.is_main:
        quiet_worker_output(ctx.rank)
    out_dir = resolve_out_dir(cfg.out)
    if ctx.is_main:  # only rank 0 writes
        if not cfg.demo:
            check_out_not_in_data(out_dir, cfg.data_dir)
        check_out_dir(out_dir)  # created only after the data and every other check: a usage error leaves no empty folder
    resumed = None  # the --resume checkpoint, read before the data: a wrong file fails in seconds (every rank reads it)
    if cfg.resume:
        resumed = read_checkpoint(cfg.resume, arch={k: getattr(cfg, k) for k in CHECKPOINT_ARCH_KEYS})
    log(f"preset {cfg.preset}, arch {cfg.arch}, loss {cfg.loss}, budget {format_duration(deadline.budget_s)}, "
        f"out {out_dir}" + (f", {world} ranks ({ctx.launcher if ctx.launcher == 'torchrun' else 'forked here'})"
                            if world > 1 else ""))
    fork = world > 1 and ctx.launcher != "torchrun"  # we start ranks 1..N-1: after the data, before CUDA
    device = None
    if not fork:
        device = check_device(rank_device(ctx, cfg.device))
        log(f"backends: {configure_backends(device)}; {configure_threads(cfg.threads, device)}")
        log(f"precision: {describe_amp(resolve_amp(cfg.amp, device))} (amp={cfg.amp})")  # a forced amp torch lacks: exit 2
        cfg, memory = check_setting_memory(cfg, device, world=world)  # before the data: too much is exit 2
    seed_everything(cfg.seed)
    report = RunReport(config=dataclasses.asdict(cfg), device=str(device), torch=torch.__version__)
    if not fork:
        report.memory = memory
    timer = PhaseTimer()
    with timer.phase("data"):
        data, demo_dir = load_training_data(cfg)  # demo_dir: the --demo data's temp dir, removed when run() returns
    report.data = data.stats
    run_kw = dict(cfg=cfg, deadline=deadline, timer=timer, out_dir=out_dir, resumed=resumed, report=report, data=data,
                  device=device)
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


def run_rank(ctx, *, cfg, deadline, timer, out_dir, resumed, report, data, device):
    """The run from the device check (when not done yet) to the zip, on every rank; only rank 0 logs and writes."""
    if device is None:
        device = check_device(rank_device(ctx, cfg.device))
        log(f"backends: {configure_backends(device)}; {configure_threads(cfg.threads, device)}")
        log(f"precision: {describe_amp(resolve_amp(cfg.amp, device))} (amp={cfg.amp})")  # a forced amp torch lacks: exit 2
        report.device = str(device)
        cfg, report.memory = check_setting_memory(cfg, device, world=ctx.world_size, data=data)  # forked: after data
        report.config = dataclasses.asdict(cfg)
    if ctx.distributed and not init_group(ctx, backend="nccl" if device.type == "cuda" else "gloo"):
        ctx = DistContext()  # the workers could not start: one process, one device (warned)
        report.warn("distributed start failed: ran one process")
    try:
        return _run_rank(ctx, cfg=cfg, deadline=deadline, timer=timer, out_dir=out_dir, resumed=resumed, report=report,
                         data=data, device=device)
    finally:
        if ctx.distributed and ctx.is_main:
            stop_workers(ctx)
            end_group(ctx)


def _run_rank(ctx, *, cfg, deadline, timer, out_dir, resumed, report, data, device):
    if ctx.distributed:
        report.ranks = {"world_size": ctx.world_size, "launcher": ctx.launcher,
                        "batch_per_rank": split_batch(cfg.batch_size, cfg.batch_per_gpu, ctx.world_size)}
    extractor = None
    if cfg.self_check and ctx.is_main:
        extractor = build_feature_extractor("auto", weights_path=cfg.feature_weights or None, device=device,
                                            seed=cfg.seed)
    built = None
    if ctx.is_main:
        try:
            with removed_if_left_empty(out_dir):
                disk_speed = prepare_out_dir(out_dir, resume=cfg.resume)
                with timer.phase("build"):
                    built = build_and_plan(cfg, data, device, ctx=ctx, deadline=deadline, resumed=resumed,
                                           report=report, extractor=extractor, out_dir=out_dir, disk_speed=disk_speed)
        finally:  # the other ranks wait for the plan; None tells them rank 0 stopped (a usage error, a failure)
            if ctx.distributed:
                broadcast_object(ctx, None if built is None else built[2:])
        trainer, sampler, plan, timeout = built
    else:
        trainer = build_restored(cfg, data, device, ctx=ctx, resumed=resumed, report=report)
        sampler = build_sampler(cfg, trainer, data)
        got = broadcast_object(ctx, None)
        if got is None:
            return 0
        plan, timeout = got
    if ctx.distributed:  # the training group: DDP and the stop decisions, with a collective timeout
        trainer.attach_group(make_training_group(ctx, timeout))
        sync_buffers(ctx, (trainer.G, trainer.D))
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    checkpoint = make_checkpointer(ckpt_path, trainer, config=report.config, classes=data.classes, report=report)
    threads = torch.get_num_threads()
    if ctx.distributed and device.type == "cpu":  # N CPU ranks share the cores while training (rank 0 finishes on all)
        torch.set_num_threads(max(1, threads // ctx.world_size))
        log(f"{ctx.world_size} ranks on the CPU: {torch.get_num_threads()} threads each while training")
    stop_event = StopRequest()
    handlers = install_interrupt_handlers(stop_event)
    try:
        with timer.phase("train"):
            summary = train(cfg, trainer, plan, sampler=sampler, deadline=deadline, stop_event=stop_event,
                            checkpoint=checkpoint, report=report, ctx=ctx)
        torch.set_num_threads(threads)
        if not ctx.is_main:  # the other ranks end here: rank 0 writes everything
            if summary.reason == "crashed":
                record_failure(summary.error)
                return 1
            return 0
        if ctx.broken:  # a rank died or failed: say which and why, stop the forked ones, ship from rank 0's G
            failed = failed_ranks(ctx)
            stop_workers(ctx, wait_s=0.0)
            report.failed_ranks = {str(r): why for r, why in failed.items()}
            report.degraded = True
            report.warn("ranks failed: " + ("; ".join(f"rank {r}: {w}" for r, w in failed.items())
                                            or f"a collective failed ({ctx.broken})"))
            warn(f"{report.warnings[-1]}; rank 0 ships the zip from its averaged generator")
        with timer.phase("checkpoint"):
            complete = plan.complete(reason=summary.reason, train_seconds_total=summary.train_seconds_total)
            if checkpoint(summary.train_seconds_total, summary.plan_seconds, complete):
                log(f"wrote {ckpt_path} (step {trainer.step_count}; continue with --resume {ckpt_path})")
        report_path = os.path.join(out_dir, "report.json")
        try:
            pace = Pace(plan, deadline)  # for now built here; the loop will own it (issue 20)
            pace.step_slowdown = summary.slowdown  # the loop's final slowdown (steps or a re-timed generation batch)
            finish(sampler.with_batch(plan.gen_batch), data=data, out_dir=out_dir, settings=build_finish_settings(cfg),
                   extractor=extractor, pace=pace, timer=timer, report=report, stop_event=stop_event)
        except SubmissionError as exc:
            report.degraded, report.zip = True, None
            report.warn(f"zip not written: {exc}")
            report.write(report_path)
            print(f"error: no valid images.zip could be written ({exc}); any earlier "
                  f"{os.path.join(out_dir, 'images.zip')} is left as it was; the trained model is in {ckpt_path}",
                  file=sys.stderr, flush=True)
            return EXIT_ZIP_FAILED
        report.phases, report.wall_seconds = dict(timer.seconds), deadline.elapsed()
        report.write(report_path)
        log(f"done: {trainer.step_count} steps, {summary.images_per_s:.0f} images/s; {timer.summary()}; "
            f"wall {format_duration(deadline.elapsed())} of {format_duration(deadline.budget_s)}"
            + ("; DEGRADED run, see report.json" if report.degraded else ""))
        return 0
    finally:
        restore_handlers(handlers)


class KernelExit(Exception):
    """A non-zero exit in a notebook. SystemExit there shows "An exception has occurred, use %tb ..." and a warning;
    this fails the cell the same way (nbclient and Kaggle see an error, later cells do not run) and IPython shows only
    the one line that _render_traceback_ returns, under the error line main() printed."""

    def __init__(self, code):
        self.code = code
        meaning = {EXIT_ZIP_FAILED: "no valid images.zip could be written (--evaluate: the zip would be rejected)",
                   EXIT_INTERRUPTED: "interrupted before the zip",
                   EXIT_USAGE: "a problem you can fix, named in the error line above"}
        super().__init__(f"kernel.py stopped with exit code {code}: {meaning.get(code, 'see above')}")

    def _render_traceback_(self):  # IPython's hook: the lines shown instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def main(argv=None):
    """Entry point: returns the exit code (0 ok, also after a crash or interrupt that still wrote the zip; 1 no valid
    zip could be written, or with --evaluate the zip would be rejected; 2 usage error; 130 interrupted before the
    zip)."""
    try:
        return run(argv)
    except SystemExit as exc:  # argparse's --help: exit 0 as a return value (a notebook cell then ends without error)
        if exc.code in (0, None):
            return 0
        raise
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
