"""The training loop: steps until the Deadline's training window closes, an interrupt or divergence; does its upkeep
(finite check, step timing, roll-back snapshots, progress lines, checkpoints) once per check and per tick."""
import sys
import time
import traceback
from dataclasses import dataclass

import torch

from modules.distributed import agree, dead_workers, sync_buffers
from modules.memory import EARLY_OOM_STEPS, describe_early_oom, is_out_of_memory
from modules.pace import FINISH_SLOWDOWN_MAX, PROBE_COST, SLOWDOWN_MAX, SYNC_MAX_S
from modules.pggan import pggan_growth
from modules.sample import truncated_z
from modules.utils import UsageError, eval_mode, format_duration, log, warn



# the loop


@torch.no_grad()
def sample_spread(G, z):
    """Mean per-pixel std over a fixed batch of samples: near 0 means mode collapse."""
    y = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    with eval_mode(G):
        return float(G(z, y).float().std(0).mean())


@dataclass
class TrainSummary:
    """What train_loop did: report.json's "train" entry (dataclasses.asdict) and the final checkpoint's times."""

    steps: int = 0  # G steps made in this run
    total_steps: int = 0  # the trainer's step count (a resumed run's steps included)
    seconds: float = 0.0  # training seconds in this run
    reason: str = "not started"  # budget | steps | interrupted | diverged | crashed | not started
    rollbacks: int = 0
    it_per_s: float = 0.0
    images_per_s: float = 0.0
    train_seconds_total: float = 0.0  # prior runs' training + this run's
    plan_seconds: float = 0.0  # the training time the schedule spans (TrainPlan.plan_s)
    slowdown: float = 1.0  # the finish's slowdown at the end: steps or a re-timed generation batch, vs at start
    error: str = None  # the failure that ended training, for crashed
    peak_memory_bytes: int = None  # CUDA: torch.cuda.max_memory_allocated after the first 2 steps (issue 18)


def train_loop(trainer, *, plan, deadline, stop_event, tick_s, check_every, snapshot_every, max_rollbacks,
               rollback_lr_factor, checkpoint_fn, checkpoint_s, max_steps, history, finish_probe, ctx=None):
    """Train until the Deadline's clock reaches plan.train_until, an interrupt, divergence or a failure. Never raises
    for a failure inside training (an Exception, or a KeyboardInterrupt as a notebook delivers it): it returns with
    reason "crashed" or "interrupted", so that the caller ships what there is; except an out-of-memory error in the
    first EARLY_OOM_STEPS steps, a setting that does not fit: a UsageError naming the batch per rank and what to set. Every keyword is required: the values
    come from Config (build_* and main read it), never from defaults here.

    Time: a step starts only if it is predicted to end in time: 2x the measured step time (plan.first_step_s before one
    is measured). Other processes slow the finish too, so the stop moves earlier by plan.finish_s * (slowdown - 1),
    slowdown being how much slower the steps run now than at first, or (near the end, where it can still matter) how
    much slower a generation batch runs now than at start, re-timed with finish_probe() (-> seconds for one batch of
    plan.gen_batch images, or None not to re-time); the larger counts, capped at FINISH_SLOWDOWN_MAX.
    Schedule: progress = (plan.prior_train_s + seconds trained here) / plan.plan_s; training also stops where the plan
    ends (a resumed run trains what its plan has left), or at step max_steps (0 = no limit; the schedule still follows
    the time plan).
    Upkeep happens at host syncs only (every check_every steps or SYNC_MAX_S): the finite check and roll-back,
    snapshots, progress lines, and checkpoints, which so never hold unchecked state: checkpoint_fn(train_seconds,
    plan_seconds, complete) every checkpoint_s seconds (0 = never; checkpoint_fn may be None). The steps after the last
    sync are checked on the way out too. history: {series: [(train seconds, value)]}, appended to.
    Several ranks (ctx.distributed): rank 0's clock decides. The ranks stop, take the schedule's progress and the
    number of steps to the next host sync only from distributed.agree() at each host sync (rank 0's stop reason, with a
    margin for the steps to the next sync), so they all stop after the same step; the loss statistics are summed
    over the ranks, so roll-backs happen together. Only rank 0 logs, probes and checkpoints. A collective that fails
    (a dead rank) ends training with reason "crashed" and ctx.broken set: no collective is made after it.
    Returns a TrainSummary.
    """
    train_until, prior_train_s, plan_s, finish_s = plan.train_until, plan.prior_train_s, plan.plan_s, plan.finish_s
    t_start = deadline.elapsed()
    window = plan.window(t_start)  # this run's training time
    step_s = None  # seconds per step for the margin, measured at syncs (the first steps, with autotuning, weigh in)
    base_s = recent_s = None  # steady seconds per step: the first measured (per PGGAN level), and a running average
    slowdown, gen_slowdown, level = 1.0, 1.0, None
    last_probe, probes, said_gen = -float("inf"), [], 1.0
    last_sync_t, last_sync_step = time.monotonic(), trainer.step_count
    last_tick = last_ckpt = time.monotonic()
    ckpt_est = 0.0  # duration of the last checkpoint
    snapshot, snapshot_step, rollbacks = None, trainer.step_count, 0
    first_step = trainer.step_count
    reason, error, peak_memory = "budget", None, None
    loss_d = loss_g = float("nan")
    dist_on = ctx is not None and ctx.distributed
    main = ctx is None or ctx.is_main
    next_sync = trainer.step_count  # several ranks: the step at which the next agreed host sync happens

    def log_interrupt():
        log(f"{getattr(stop_event, 'why', 'interrupt')}: stopping training, writing the zip "
            "(interrupt again to exit at once)")

    def trained():
        return prior_train_s + deadline.elapsed() - t_start

    try:
        snapshot = trainer.snapshot()
        fixed_z = truncated_z(16, trainer.z_dim, 0, generator=torch.Generator().manual_seed(1)).to(trainer.device)
        while True:
            until = train_until - finish_s * (max(slowdown, gen_slowdown) - 1)
            margin = 2 * step_s if step_s is not None else plan.first_step_s  # the step we start + one queued on the GPU
            if dist_on and trainer.step_count < next_sync:  # between agreed syncs: only steps
                trainer.step()
                if trainer.step_count < next_sync:
                    continue
            elif dist_on:  # an agreed sync point (also before the first step): rank 0 decides, all follow
                step_est = step_s if step_s is not None else plan.first_step_s
                done = trainer.step_count - first_step
                interval = 1 if done < 2 else max(1, min(check_every, int(SYNC_MAX_S / max(step_est, 1e-9))))
                if max_steps:
                    interval = max(1, min(interval, max_steps - trainer.step_count))
                stop = ""
                if main:
                    if stop_event is not None and stop_event.is_set():
                        stop = "interrupted"
                    elif deadline.elapsed() + (interval + 1) * step_est >= until or trained() >= plan_s:
                        stop = "budget"
                    elif max_steps and trainer.step_count >= max_steps:
                        stop = "steps"
                    elif dead := dead_workers(ctx):
                        raise RuntimeError(f"rank(s) {dead} ended")
                stop, progress, interval = agree(
                    ctx, stop=stop, progress=min(trained() / plan_s, 1.0), interval=interval, device=trainer.device,
                    interrupted=stop_event is not None and stop_event.is_set())
                if stop:
                    reason = stop
                    if stop == "interrupted" and main:
                        log_interrupt()
                    break
                trainer.set_progress(progress)
                next_sync = trainer.step_count + interval
                trainer.step()
                if trainer.step_count < next_sync:
                    continue
            else:
                if stop_event is not None and stop_event.is_set():
                    reason = "interrupted"
                    log_interrupt()
                    break
                if deadline.elapsed() + margin >= until or trained() >= plan_s:
                    break
                if max_steps and trainer.step_count >= max_steps:
                    reason = "steps"
                    break
                trainer.set_progress(trained() / plan_s)
                trainer.step()
                done = trainer.step_count - first_step
                if not (done <= 2 or trainer.step_count % check_every == 0
                        or time.monotonic() - last_sync_t >= SYNC_MAX_S):
                    continue
            done = trainer.step_count - first_step
            loss_d, loss_g, bad = trainer.read_stats()  # host sync
            if done == 2 and peak_memory is None and trainer.device.type == "cuda":  # what the batch really takes
                peak_memory = torch.cuda.max_memory_allocated(trainer.device)
                if main:
                    total = torch.cuda.get_device_properties(trainer.device).total_memory
                    log(f"memory: peak {peak_memory / 2**30:.2f} GiB allocated in the first 2 steps "
                        f"(torch.cuda.max_memory_allocated) of {total / 2**30:.1f} GiB on {trainer.device}")
            t = time.monotonic()
            measured = (t - last_sync_t) / max(trainer.step_count - last_sync_step, 1)
            if done <= 2:  # the first steps carry autotuning: they set the margin until steady steps are measured
                step_s = max(step_s or 0.0, measured)
            else:
                step_s = 0.7 * step_s + 0.3 * measured
                if trainer.progressive:  # each PGGAN level has its own step time: measure the slowdown within a level
                    new_level = pggan_growth(trainer.progress, fade_fraction=trainer.pg_fade)[0]
                    if new_level != level:
                        level, base_s = new_level, None
                if base_s is None:
                    base_s = recent_s = measured
                recent_s = 0.7 * recent_s + 0.3 * measured
                slowdown = min(max(recent_s / base_s, 1.0), SLOWDOWN_MAX)
            last_sync_t, last_sync_step = t, trainer.step_count
            history.setdefault("loss_d", []).append((trained(), loss_d))
            history.setdefault("loss_g", []).append((trained(), loss_g))
            if bad:
                rollbacks += 1
                if rollbacks > max_rollbacks:
                    warn(f"non-finite losses at step {trainer.step_count} after {max_rollbacks} roll-backs: "
                         "stopping training, shipping the last good averaged generator")
                    trainer.rollback(snapshot, 1.0)
                    reason = "diverged"
                    break
                trainer.rollback(snapshot, rollback_lr_factor)
                warn(f"non-finite losses by step {last_sync_step}: rolled back to step {snapshot_step}, "
                     f"learning rates x{trainer.lr_scale:g} (roll-back {rollbacks}/{max_rollbacks})")
                last_sync_t, last_sync_step = time.monotonic(), trainer.step_count
                next_sync = trainer.step_count  # several ranks: all rolled back alike; agree again before stepping
                continue
            # upkeep, on checked state only; its time is not step time
            if dist_on:
                sync_buffers(ctx, (trainer.G, trainer.D))
            if main and finish_probe is not None and deadline.elapsed() >= train_until - finish_s * (FINISH_SLOWDOWN_MAX - 1) \
                    and time.monotonic() - last_probe >= max(1.0, plan.gen_batch_s / PROBE_COST):
                last_probe = time.monotonic()
                try:
                    probes = (probes + [finish_probe() / max(plan.gen_batch_s, 1e-9)])[-2:]
                except Exception as exc:  # never worth a crash: train on without re-timing
                    warn(f"re-timing a generation batch failed ({type(exc).__name__}: {exc}); not re-timed again")
                    finish_probe, probes = None, probes or [1.0]
                gen_slowdown = min(max(min(probes), 1.0), FINISH_SLOWDOWN_MAX)  # the lesser of two: not one hiccup
                if gen_slowdown > 1.2 and gen_slowdown > 1.2 * said_gen:
                    said_gen = gen_slowdown
                    log(f"generation {gen_slowdown:.1f}x slower than measured at start: the finish reserve grows to "
                        f"{format_duration(finish_s * max(slowdown, gen_slowdown) + plan.margin_s)}")
            if trainer.step_count - snapshot_step >= snapshot_every:
                snapshot, snapshot_step = trainer.snapshot(), trainer.step_count
            now = time.monotonic()
            if main and now - last_tick >= tick_s:
                last_tick = now
                spread = sample_spread(trainer.generator_to_ship(), fixed_z)
                rate = (trainer.step_count - first_step) / max(deadline.elapsed() - t_start, 1e-9)
                log(f"step {trainer.step_count}  {rate:.2f} it/s  loss_d {loss_d:.4f}  loss_g {loss_g:.4f}  "
                    f"lr_g {trainer.opt_g.param_groups[0]['lr']:.2e}  spread {spread:.3f}  "
                    f"train {format_duration(deadline.elapsed() - t_start)}/{format_duration(window)}"
                    + (f"  steps {slowdown:.1f}x slower than at first" if slowdown > 1.1 else ""))
                history.setdefault("spread", []).append((trained(), spread))
                if spread < 0.02:
                    warn(f"samples of a fixed batch barely differ (spread {spread:.4f}): possible mode collapse")
            if (main and checkpoint_fn is not None and checkpoint_s > 0 and now - last_ckpt >= checkpoint_s
                    and deadline.elapsed() + 2 * ckpt_est + margin < until):  # never start one that would overrun
                t0 = time.monotonic()
                checkpoint_fn(trained(), plan_s, False)
                last_ckpt = time.monotonic()
                ckpt_est = last_ckpt - t0
            last_sync_t = time.monotonic()
    except KeyboardInterrupt:  # a notebook's interrupt, where no signal handler could be installed
        reason = "interrupted"
        if dist_on:  # it may have come mid-collective: the other ranks are stopped by rank 0, not by agreement
            ctx.broken = trainer.group_broken = "KeyboardInterrupt"
        if stop_event is not None:
            stop_event.set()
        warn(f"KeyboardInterrupt at step {trainer.step_count}: stopping training, writing the zip")
    except Exception as exc:  # CUDA OOM included: ship what there is
        if is_out_of_memory(exc) and trainer.step_count - first_step < EARLY_OOM_STEPS:  # the setting does not fit:
            raise UsageError(describe_early_oom(  # one line, exit 2 (not an untrained generator's noise, exit 0)
                exc, step=trainer.step_count + 1, batch_per_rank=trainer.batch_size, world_size=trainer.world_size,
                device=trainer.device)) from None
        reason = "crashed"
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        if dist_on:  # the group may be broken (a dead rank): no collective after this
            ctx.broken = trainer.group_broken = error
        warn(f"training crashed at step {trainer.step_count} ({error}); shipping the averaged generator")
        traceback.print_exc(file=sys.stdout if main else sys.stderr)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
    if reason != "diverged":  # the steps since the last sync are unchecked: check them before anything ships
        try:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            bad = trainer.read_stats()[2]
            if bad and snapshot is not None:
                warn(f"non-finite losses in the last steps: rolled back to step {snapshot_step}")
                trainer.rollback(snapshot, 1.0)
                rollbacks += 1
        except Exception as exc:
            warn(f"could not check the last steps ({type(exc).__name__}: {exc})")
    seconds = deadline.elapsed() - t_start
    steps = trainer.step_count - first_step
    return TrainSummary(steps=steps, total_steps=trainer.step_count, seconds=seconds, reason=reason, rollbacks=rollbacks,
                        it_per_s=steps / max(seconds, 1e-9), images_per_s=steps * trainer.global_batch / max(seconds, 1e-9),
                        train_seconds_total=prior_train_s + seconds, plan_seconds=plan_s,
                        slowdown=max(slowdown, gen_slowdown), error=error, peak_memory_bytes=peak_memory)
