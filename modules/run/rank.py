"""One rank's run, the same on every rank: device -> trainer (restored from --resume) -> the TrainPlan (rank 0
measures the finish and plans; the others receive it) -> training -> rank 0 alone writes the checkpoint, zip, report.

Fault injection for tests (Config.fault) by a hook the loop calls before each step, so that the GAN step holds no
test code. zipfail is the finish's.
"""
import contextlib
import dataclasses
import os
import shutil
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from modules.recipe.device import describe_skips, env_threads, pick_cpu_threads
from modules.recipe.loop import TrainSummary, build_loop_settings, train_loop
from modules.recipe.sample import build_sampler
from modules.recipe.train import build_trainer
from modules.recipe.utils import UsageError, cpu_count, format_duration, is_out_of_memory, log, parse_faults, say, warn
from modules.run.budget import (Pace, finish_reserve_s, measure_finish_seconds, plan_training,
                                refuse_if_finish_cannot_fit, timed)
from modules.run.checkpoint import describe_write_error, save_checkpoint
from modules.run.distributed import (DistContext, end_group, failed_ranks, init_group, make_training_group,
                                     record_failure, stop_workers, training_timeout, watch_workers)
from modules.run.finish import build_finish_settings, finish
from modules.run.metrics import build_feature_extractor
from modules.run.setup import open_device, prepare_out_dir, removed_if_left_empty
from modules.run.submission import SubmissionError


STEP_FAULTS = ("raise", "oom", "slow", "kill", "slowgen", "nan")  # Config.fault kinds injected before a step


def fault_hook(fault_text, *, rank):
    """-> train_loop's before_step for Config.fault's step faults, or None without any. Each is one shot at its step
    (trainer.step_count before the step) unless said:
    raise@STEP   a RuntimeError, as any failure inside training
    oom@STEP     torch.cuda.OutOfMemoryError, what a GPU too small for the batch raises
    slow@S       every step sleeps S seconds first
    kill@STEP    rank 1 dies without a word (SIGKILL), as a crashed worker
    slowgen@S    from the first step on, every forward of G or its averages in eval mode (generation) sleeps S seconds
    nan@STEP     D's weights become NaN: that step's losses are non-finite, and the loop rolls back as for a divergence
    """
    f = {k: v for k, v in parse_faults(fault_text).items() if k in STEP_FAULTS}  # kind -> step or seconds
    if not f:
        return None

    def before_step(trainer):
        step = trainer.step_count
        if f.get("raise") == step:
            del f["raise"]
            raise RuntimeError(f"injected fault at step {step} (--set fault=...)")
        if f.get("oom") == step:
            del f["oom"]
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step "
                                              f"{step}, --set fault=oom@STEP)")
        if "slow" in f:
            time.sleep(f["slow"])
        if f.get("kill") == step and rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if "slowgen" in f:
            delay = f.pop("slowgen")
            for m in {id(m): m for m in (trainer.G, *trainer.shipped_models()[2:])}.values():
                m.register_forward_pre_hook(lambda module, args, d=delay: None if module.training else time.sleep(d))
        if f.get("nan") == step:
            del f["nan"]  # one shot: the steps after the roll-back pass
            with torch.no_grad():
                for p in trainer.D.parameters():
                    p.fill_(float("nan"))

    return before_step


EXIT_ZIP_FAILED = 1  # no valid images.zip could be written


@dataclass
class Rank:
    """What one rank trains and ships with (build_rank)."""
    ctx: DistContext
    cfg: object  # the Config
    trainer: object  # the Trainer
    sampler: object  # sample.Sampler: how the shipped G generates
    plan: object  # the TrainPlan, identical on every rank
    extractor: object  # rank 0 with the self-check and Inception weights: the FID network; else None
    checkpoint: object  # rank 0: checkpoint(train_seconds, plan_seconds, complete) -> bool; else None
    pace: object = None  # made by train(); the finish asks it what still fits


def run_rank(ctx, setup):
    """-> exit code."""
    device, cfg = setup.device, setup.cfg
    if device is None:  # a forked run: every rank opens its device after the fork
        device = open_device(cfg, ctx, report=setup.report)
    if ctx.distributed and not init_group(ctx, backend="nccl" if device.type == "cuda" else "gloo",
                                          remaining_s=setup.deadline.remaining()):
        ctx = DistContext()  # the workers could not start: one process, one device (warned)
        setup.report.warn("distributed start failed: ran one process")
    try:  # rank 0 creates the output folder (build_rank): a UsageError before training ships removes it again
        with removed_if_left_empty(setup.out_dir) if ctx.is_main else contextlib.nullcontext():
            rank = build_rank(ctx, cfg, device, setup)
            if rank is None:  # rank 0 stopped before training: it says why
                return 0
            stop_event = StopRequest()
            with signal_handlers(stop_event.handler, signal.SIGINT, signal.SIGTERM):
                summary = train(rank, setup, stop_event)
                if ctx.is_main:
                    return ship(rank, setup, summary, stop_event)
                if summary.reason == "crashed":  # the other ranks end here: rank 0 writes everything
                    record_failure(summary.error)
                    return 1
                return 0
    finally:
        if ctx.distributed and ctx.is_main:
            stop_workers(ctx)
            end_group(ctx)


def build_rank(ctx, cfg, device, setup):
    """The trainer (every rank restores --resume: Adam's state must match too), its sampler and the plan: rank 0
    creates the output folder and plans, the others receive the plan (None: rank 0 stopped). -> Rank, or None."""
    report, data = setup.report, setup.data
    extractor = checkpoint = plan = None
    if cfg.self_check and ctx.is_main:
        extractor = build_feature_extractor(cfg.feature_weights or None, device)
    try:
        with setup.timer.phase("build"):
            trainer = build_trainer(cfg, data, device, rank=ctx.rank, world_size=ctx.world_size)
            if ctx.distributed:
                report.ranks = {"world_size": ctx.world_size, "launcher": ctx.launcher,
                                "batch_per_rank": trainer.batch_per_rank}
            resumed = setup.resumed
            if resumed is not None:
                resumed.restore(trainer, classes=data.classes)
                report.history = {k: list(v) for k, v in resumed.history.items()}
                report.resumed_from = {"path": resumed.path, "step": trainer.step_count,
                                       "train_seconds": resumed.train_seconds, "plan_seconds": resumed.plan_seconds,
                                       "complete": resumed.complete}
            sampler = build_sampler(cfg, trainer, data)
            if ctx.is_main:
                disk_speed = prepare_out_dir(setup.out_dir, resume=cfg.resume)
                plan = measure_and_plan(cfg, trainer, sampler, ctx=ctx, setup=setup, extractor=extractor,
                                        disk_speed=disk_speed)
                checkpoint = make_checkpointer(os.path.join(setup.out_dir, "checkpoint.pt"), trainer,
                                               config=report.config, classes=data.classes, report=report,
                                               label_counts=sampler.label_counts)
    except Exception as exc:  # out of memory before any step: the widths do not fit this device (one line, exit 2)
        if is_out_of_memory(exc):
            raise UsageError(describe_early_oom(exc, when="before training (building the models, measuring the finish)",
                                                device=device)) from None
        raise
    finally:  # the other ranks wait for the plan; None tells them rank 0 stopped
        plan = ctx.broadcast(plan)
    if plan is None:
        return None
    if ctx.distributed:  # the training group: DDP and the stop decisions, with a collective timeout
        trainer.attach_group(make_training_group(ctx, plan.hold_back_s))
        ctx.sync_buffers((trainer.G, trainer.D))
        watch_workers(ctx)  # rank 0 of a forked run: a dead worker aborts the groups (nothing elsewhere)
    return Rank(ctx=ctx, cfg=cfg, trainer=trainer, sampler=sampler, plan=plan, extractor=extractor,
                checkpoint=checkpoint)


def measure_and_plan(cfg, trainer, sampler, *, ctx, setup, extractor, disk_speed):
    """Rank 0: the CPU threads picked, the finish measured, the disk space checked -> the TrainPlan (several ranks:
    training stops a collective timeout earlier)."""
    device, data, out_dir = trainer.device, setup.data, setup.out_dir
    if device.type == "cpu" and cfg.threads == 0 and not env_threads() and cpu_count() > 1 and not ctx.distributed:
        probe = sampler.with_batch(min(cfg.sample_batch, 50))
        n, times = pick_cpu_threads(lambda: probe(probe.batch), candidates=sorted({1, max(cpu_count() - 1, 2)}))
        log(f"torch CPU threads {n} (a generation batch: " +
            ", ".join(f"{t:.3f}s at {k}" for k, t in times.items()) + ")")
    estimates, info = measure_finish_seconds(
        sampler, n_images=cfg.n_images, workers=cfg.data_workers, disk_bytes_per_s=disk_speed,
        checkpoint_state=trainer.state_dict(), self_check=cfg.self_check, extractor=extractor,
        n_reference=len(data.reference), crops=data.images,
        check=lambda partial: refuse_if_finish_cannot_fit(partial, budget_s=setup.deadline.budget_s,
                                                          elapsed_s=setup.deadline.elapsed(),
                                                          margin_s=cfg.reserve_margin_s, budget_text=cfg.time_budget))
    need = info["zip_bytes"] + 2 * info["checkpoint_bytes"]  # the new zip beside the old; checkpoint.pt.tmp beside it
    free = shutil.disk_usage(out_dir).free
    if free < 1.2 * need:
        raise UsageError(f"not enough disk space in {out_dir}: {free / 2**20:.0f} MiB free, the zip and checkpoint "
                         f"need about {1.2 * need / 2**20:.0f} MiB")
    timeout = (training_timeout(finish_reserve_s(estimates) + cfg.reserve_margin_s, estimates["checkpoint"])
               if ctx.distributed else 0.0)
    plan = plan_training(budget_s=setup.deadline.budget_s, elapsed_s=setup.deadline.elapsed(), estimates=estimates,
                         gen_batch=info["batch"], margin_s=cfg.reserve_margin_s, n_images=cfg.n_images,
                         batch_size=trainer.batch_per_rank, resumed=setup.resumed, budget_text=cfg.time_budget,
                         max_steps=cfg.max_steps, hold_back_s=timeout)
    if ctx.distributed:
        log(f"{ctx.world_size} ranks, {trainer.batch_per_rank} images each per step; collective timeout "
            f"{format_duration(timeout)} (training stops that much earlier)")
    setup.report.reserve = {**estimates, "margin": cfg.reserve_margin_s, "disk_mib_s": disk_speed / 2**20}
    if not plan.self_check_reserved:
        setup.report.warn("self-check not in the finish reserve (it would have taken more time than training)")
    return plan


def make_checkpointer(path, trainer, *, config, classes, report, label_counts=None):
    """-> checkpoint(train_seconds, plan_seconds, complete) -> bool; a failure (a full disk) is one warning: the zip
    matters more."""

    def checkpoint(train_seconds, plan_seconds, complete):
        try:
            save_checkpoint(path, trainer, config=config, train_seconds=train_seconds, n_classes=len(classes),
                            classes=classes, plan_seconds=plan_seconds, complete=complete, history=report.history,
                            label_counts=label_counts)
            return True
        except Exception as exc:
            warn(f"checkpoint not written: {describe_write_error(exc, path)}")
            return False

    return checkpoint


def finish_probe(sampler, batch):
    """-> probe() -> seconds to generate one finish batch now."""
    one = sampler.with_batch(batch)
    return lambda: timed(one, batch, seed=1)[0]


def train(rank, setup, stop_event):
    """The loop, with a last resort around it -> TrainSummary. Out of memory in the first steps, or any failure before
    a step completed, is a UsageError (exit 2, nothing shipped)."""
    ctx, trainer, plan, report = rank.ctx, rank.trainer, rank.plan, setup.report
    first = trainer.step_count
    threads = torch.get_num_threads()
    if ctx.distributed and trainer.device.type == "cpu":  # N CPU ranks share the cores while training
        torch.set_num_threads(max(1, threads // ctx.world_size))  # (rank 0 finishes on all)
        log(f"{ctx.world_size} ranks on the CPU: {torch.get_num_threads()} threads each while training")
    log(f"training started at step {trainer.step_count} (SIGINT/SIGTERM: stop and write the zip; twice: exit now)")
    rank.pace = Pace(plan, setup.deadline, probe=finish_probe(rank.sampler, plan.gen_batch) if ctx.is_main else None)
    summary = TrainSummary(total_steps=trainer.step_count, train_seconds_total=plan.prior_train_s,
                           plan_seconds=plan.plan_s)
    try:
        with setup.timer.phase("train"):
            summary = train_loop(trainer, settings=build_loop_settings(rank.cfg), pace=rank.pace, ctx=ctx,
                                 stop_event=stop_event, checkpoint_fn=rank.checkpoint, history=report.history,
                                 before_step=fault_hook(rank.cfg.fault, rank=ctx.rank))
    except KeyboardInterrupt:  # one between train_loop's parts
        stop_event.set()
        summary.reason = "interrupted"
    except Exception as exc:  # train_loop re-raises only failures in its first steps
        if is_out_of_memory(exc):
            raise UsageError(describe_early_oom(exc, when=f"in training step {trainer.step_count + 1}",
                                                device=trainer.device, batch_per_rank=trainer.batch_per_rank,
                                                world_size=trainer.world_size)) from None
        if trainer.step_count == first:
            raise UsageError(describe_early_failure(exc, step=first + 1)) from None
        summary.reason, summary.error = "crashed", f"{type(exc).__name__}: {exc}"
        warn(f"training failed ({summary.error}); writing the zip from the averaged generator")
        ctx.mark_broken(summary.error)
    torch.set_num_threads(threads)
    if summary.reason in ("crashed", "diverged"):
        report.degraded = True
        report.warn(f"training {summary.reason}" + (f": {summary.error}" if summary.error else ""))
    log(f"training stopped ({summary.reason}" + (f": {stop_event.why}" if summary.reason == "interrupted" else "")
        + f") at step {trainer.step_count}" + (f", {summary.it_per_s:.2f} it/s" if summary.steps else ""))
    report.train = dataclasses.asdict(summary)
    report.precision = trainer.precision_summary()  # fp16: "N of M steps skipped" by the GradScalers
    skips = describe_skips(report.precision)
    if skips:
        log(skips)
    return summary


def describe_early_oom(exc, *, when, device, batch_per_rank=None, world_size=1):
    """The one line for out of memory before or early in training: when, the peak (CUDA) and what to set (half the
    batch per rank; without batch_per_rank, before any step: the widths)."""
    seen = (f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated of "
            f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB on {device})"
            if device.type == "cuda" else " on the CPU")
    what = "lower g_ch / d_ch"
    if batch_per_rank is not None:
        half = max(batch_per_rank // 2, 2)
        when += f" at {batch_per_rank} images per rank" + (f" x {world_size} ranks" if world_size > 1 else "")
        what = (f"set --set batch_size={half * world_size}" + (f" (or batch_per_gpu={half})" if world_size > 1 else "")
                + f" or {what}")
    first = (str(exc).strip().splitlines() or [""])[0][:160]
    return f"out of memory {when}{seen}: {what} [{type(exc).__name__}: {first}]"


def describe_early_failure(exc, *, step):
    """The one line for a failure before any step completed: the error and where it was raised."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name}" if frames else ""
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    return (f"training failed in step {step}, before any step completed ({type(exc).__name__}: {first}){where}: "
            "nothing was trained, so nothing is shipped; fix the setting or environment it names and run again")


def ship(rank, setup, summary, stop_event):
    """Rank 0 after training: failed ranks named, the final checkpoint, the zip and report.json -> exit code."""
    ctx, trainer, report, timer, out_dir = rank.ctx, rank.trainer, setup.report, setup.timer, setup.out_dir
    if ctx.broken:  # a rank died or failed: ship from rank 0's G
        failed = failed_ranks(ctx)
        stop_workers(ctx, wait_s=0.0)
        report.failed_ranks = {str(r): why for r, why in failed.items()}
        report.degraded = True
        report.warn("ranks failed: " + ("; ".join(f"rank {r}: {w}" for r, w in failed.items())
                                        or f"a collective failed ({ctx.broken})"))
        warn(f"{report.warnings[-1]}; rank 0 ships the zip from its averaged generator")
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    with timer.phase("checkpoint"):
        complete = rank.plan.complete(reason=summary.reason, train_seconds_total=summary.train_seconds_total)
        if rank.checkpoint(summary.train_seconds_total, summary.plan_seconds, complete):
            log(f"wrote {ckpt_path} (step {trainer.step_count}; continue with --resume {ckpt_path})")
    report_path = os.path.join(out_dir, "report.json")
    try:
        finish(rank.sampler.with_batch(rank.plan.gen_batch), data=setup.data, out_dir=out_dir,
               settings=build_finish_settings(rank.cfg), extractor=rank.extractor, pace=rank.pace, timer=timer,
               report=report, stop_event=stop_event)
    except SubmissionError as exc:
        report.degraded, report.zip = True, None
        report.warn(f"zip not written: {exc}")
        report.write(report_path)
        say(f"error: no valid images.zip could be written ({exc}); any earlier "
            f"{os.path.join(out_dir, 'images.zip')} is left as it was; the trained model is in {ckpt_path}", sys.stderr)
        return EXIT_ZIP_FAILED
    report.phases, report.wall_seconds = dict(timer.seconds), setup.deadline.elapsed()
    report.write(report_path)
    log(f"done: {trainer.step_count} steps, {summary.images_per_s:.0f} images/s; {timer.summary()}; "
        f"wall {format_duration(setup.deadline.elapsed())} of {format_duration(setup.deadline.budget_s)}"
        + ("; DEGRADED run, see report.json" if report.degraded else ""))
    return 0


# interrupts


class StopRequest(threading.Event):
    """Set by the first SIGINT/SIGTERM (`why` = its name), or by a KeyboardInterrupt in training."""
    why = "KeyboardInterrupt"

    def handler(self, signum, frame):
        """First SIGINT/SIGTERM: set (training stops, the checkpoint and zip are written). Second: exit at once.
        No buffered I/O here: interrupting a print in progress would raise "reentrant call"."""
        if self.is_set():
            os.write(2, f"second {signal.Signals(signum).name}: exiting now\n".encode())
            os._exit(128 + signum)
        self.why = signal.Signals(signum).name
        self.set()


@contextlib.contextmanager
def signal_handlers(handler, *signals):
    """handler for signals while inside, the previous ones restored after (only the main thread may set them)."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
