"""The training loop: one path for any number of ranks; its upkeep (finite check and roll-back, step timing,
snapshots, progress lines, checkpoints) happens at host syncs only, which every rank makes after the same step."""
import sys
import time
import traceback
from dataclasses import dataclass, fields

import torch

from modules.recipe.sample import truncated_z
from modules.recipe.utils import eval_mode, format_duration, is_out_of_memory, log, say, warn

EARLY_OOM_STEPS = 5  # an out-of-memory error before this many steps of a run: the setting does not fit (exit 2)


@dataclass(frozen=True)
class LoopSettings:
    """How the loop keeps watch (Config's "upkeep and robustness" fields and max_steps; build_loop_settings)."""

    tick_s: float  # seconds between progress lines
    check_every: int  # steps between host syncs (at most SYNC_MAX_S of steps, fewer near the stop)
    snapshot_every: int  # steps between the in-memory snapshots a divergence rolls back to
    max_rollbacks: int  # after this many roll-backs training stops ("diverged")
    rollback_lr_factor: float  # learning rates x this at each roll-back
    checkpoint_s: float  # seconds between checkpoints (0 = only the final one, written by main)
    max_steps: int  # stop at this G step (0 = no step limit)


def build_loop_settings(cfg):
    return LoopSettings(**{f.name: getattr(cfg, f.name) for f in fields(LoopSettings)})


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
    peak_memory_bytes: int = None  # CUDA: torch.cuda.max_memory_allocated after the first 2 steps


def train_loop(trainer, *, settings, pace, ctx, stop_event, checkpoint_fn, history, before_step):
    """Train until pace.stop_at(), the end of the plan, settings.max_steps, an interrupt, divergence or a failure.
    A failure inside training returns reason "crashed" (or "interrupted") so that the caller ships what there is; a
    failure before the first step completed, or an out-of-memory error in the first EARLY_OOM_STEPS, is re-raised.
    Rank 0's clock decides at each host sync and ctx.agree() hands every rank the stop, the progress and the steps to
    the next sync. checkpoint_fn(train_seconds, plan_seconds, complete) or None; history: {series: [(train s, value)]};
    before_step(trainer) or None: a test's fault hook (fault_hook). -> TrainSummary."""
    s, plan, deadline = settings, pace.plan, pace.deadline
    t_start, first = deadline.elapsed(), trainer.step_count
    guard = _Guard(trainer, settings)
    upkeep = _Upkeep(trainer, settings, pace, history, checkpoint_fn, t_start) if ctx.is_main else None
    reason, error, peak = "budget", None, None
    try:
        guard.snapshot()
        _reset_peak_memory(trainer.device)
        last_t, last_step = time.monotonic(), trainer.step_count
        while True:
            # decide: rank 0's clock, agreed by every rank
            done, trained = trainer.step_count - first, plan.prior_train_s + deadline.elapsed() - t_start
            interval = pace.sync_interval(check_every=s.check_every, done=done, step=trainer.step_count)
            if s.max_steps:
                interval = max(1, min(interval, s.max_steps - trainer.step_count))
            # the plan's end as well: a block ends there (within a step), not up to a sync interval past it
            interval = max(1, min(interval, int((plan.plan_s - trained) / max(pace.step_estimate(), 1e-9))))
            stop = _stop_reason(trainer, ctx, pace, s, stop_event, trained, interval) if ctx.is_main else ""
            stop, progress, interval = ctx.agree(stop=stop, progress=min(trained / plan.plan_s, 1.0), interval=interval,
                                                 device=trainer.device, interrupted=_is_set(stop_event))
            if stop:
                reason = stop
                if stop == "interrupted" and ctx.is_main:
                    log(f"{getattr(stop_event, 'why', 'interrupt')}: stopping training, writing the zip "
                        "(interrupt again to exit at once)")
                break
            # steps: no host sync until the last one
            trainer.set_progress(progress)
            for _ in range(interval):
                if before_step is not None:
                    before_step(trainer)
                trainer.step()
            # check, and roll back a divergence
            loss_d, loss_g, bad = trainer.read_stats()  # host sync
            done = trainer.step_count - first
            peak = peak or _peak_memory(trainer, done, say=ctx.is_main)
            pace.record(time.monotonic() - last_t, trainer.step_count - last_step, done=done)
            for name, value in (("loss_d", loss_d), ("loss_g", loss_g)):
                history.setdefault(name, []).append((plan.prior_train_s + deadline.elapsed() - t_start, value))
            if bad and not guard.roll_back(trainer.step_count):
                reason = "diverged"
                break
            if not bad:
                # upkeep per tick, on checked state only; its time is not step time
                ctx.sync_buffers((trainer.G, trainer.D))
                if trainer.step_count - guard.step >= s.snapshot_every:
                    guard.snapshot()
                if upkeep is not None:
                    upkeep.tick(loss_d, loss_g)
            last_t, last_step = time.monotonic(), trainer.step_count
    except KeyboardInterrupt:  # a notebook's interrupt, where no signal handler could be installed
        reason = "interrupted"  # it may have come mid-collective: the other ranks are stopped by rank 0
        trainer.group_broken = ctx.mark_broken("KeyboardInterrupt")
        if stop_event is not None:
            stop_event.set()
        warn(f"KeyboardInterrupt at step {trainer.step_count}: stopping training, writing the zip")
    except Exception as exc:  # CUDA OOM included: ship what there is
        if trainer.step_count == first or (is_out_of_memory(exc) and trainer.step_count - first < EARLY_OOM_STEPS):
            raise  # a setup problem, or a setting that does not fit: run.train names it in one line (exit 2), not
            # an untrained generator's noise
        reason, error = "crashed", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        trainer.group_broken = ctx.mark_broken(error)  # a dead rank: no collective after this
        warn(f"training crashed at step {trainer.step_count} ({error}); shipping the averaged generator")
        say(traceback.format_exc().rstrip("\n"), sys.stdout if ctx.is_main else sys.stderr)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
    if reason != "diverged":
        guard.check_last_steps()
    seconds, steps = deadline.elapsed() - t_start, trainer.step_count - first
    return TrainSummary(steps=steps, total_steps=trainer.step_count, seconds=seconds, reason=reason,
                        rollbacks=guard.rollbacks, it_per_s=steps / max(seconds, 1e-9),
                        images_per_s=steps * trainer.global_batch / max(seconds, 1e-9),
                        train_seconds_total=plan.prior_train_s + seconds, plan_seconds=plan.plan_s,
                        slowdown=pace.slowdown, error=error, peak_memory_bytes=peak)


def _is_set(event):
    return event is not None and event.is_set()


def _stop_reason(trainer, ctx, pace, settings, stop_event, trained, interval):
    """Rank 0, before the next `interval` steps: "interrupted", "budget", "steps" or "" to go on."""
    if _is_set(stop_event):
        return "interrupted"
    if not pace.steps_fit(interval) or trained >= pace.plan.plan_s:
        return "budget"
    if settings.max_steps and trainer.step_count >= settings.max_steps:
        return "steps"
    if dead := ctx.dead_workers():
        raise RuntimeError(f"rank(s) {dead} ended")
    return ""


def _reset_peak_memory(device):
    """CUDA: count the peak from here, so that it is the steps', not the finish measurement's before training."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_memory(trainer, done, *, say):
    """CUDA, after the first 2 steps: what the batch really takes (logged by rank 0) -> bytes, or None."""
    if done < 2 or trainer.device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(trainer.device)
    if say:
        total = torch.cuda.get_device_properties(trainer.device).total_memory
        log(f"memory: peak {peak / 2**30:.2f} GiB allocated in the first 2 steps (torch.cuda.max_memory_allocated) "
            f"of {total / 2**30:.1f} GiB on {trainer.device}")
    return peak


class _Guard:
    """Snapshots of the whole training state, and the roll-back to the last one when the losses turn non-finite."""

    def __init__(self, trainer, settings):
        self.trainer, self.settings = trainer, settings
        self.state, self.step, self.rollbacks = None, trainer.step_count, 0

    def snapshot(self):
        self.state, self.step = self.trainer.snapshot(), self.trainer.step_count

    def roll_back(self, by):
        """Non-finite losses by step `by`: back to the snapshot at lower learning rates -> True, or (past
        max_rollbacks) at the same rates -> False: stop training."""
        t, s = self.trainer, self.settings
        self.rollbacks += 1
        if self.rollbacks > s.max_rollbacks:
            warn(f"non-finite losses at step {t.step_count} after {s.max_rollbacks} roll-backs: "
                 "stopping training, shipping the last good averaged generator")
            t.rollback(self.state, 1.0)
            return False
        t.rollback(self.state, s.rollback_lr_factor)
        warn(f"non-finite losses by step {by}: rolled back to step {self.step}, "
             f"learning rates x{t.lr_scale:g} (roll-back {self.rollbacks}/{s.max_rollbacks})")
        return True

    def check_last_steps(self):
        """The steps after the last sync are unchecked: check them before anything ships."""
        t = self.trainer
        try:
            if t.device.type == "cuda":
                torch.cuda.synchronize(t.device)
            if t.read_stats()[2] and self.state is not None:
                warn(f"non-finite losses in the last steps: rolled back to step {self.step}")
                t.rollback(self.state, 1.0)
                self.rollbacks += 1
        except Exception as exc:
            warn(f"could not check the last steps ({type(exc).__name__}: {exc})")


@torch.no_grad()
def sample_spread(G, z):
    """Mean per-pixel std over a fixed batch of samples: near 0 means mode collapse."""
    y = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    with eval_mode(G):
        return float(G(z, y).float().std(0).mean())


class _Upkeep:
    """Rank 0's upkeep at host syncs: the finish re-timed, a progress line per tick, checkpoints that fit before the
    stop."""

    def __init__(self, trainer, settings, pace, history, checkpoint_fn, t_start):
        self.trainer, self.settings, self.pace, self.history = trainer, settings, pace, history
        self.checkpoint_fn, self.t_start, self.first = checkpoint_fn, t_start, trainer.step_count
        self.last_tick = self.last_ckpt = time.monotonic()
        self.ckpt_s = 0.0  # how long the last checkpoint took
        self.fixed_z = truncated_z(16, trainer.z_dim, 0, generator=torch.Generator().manual_seed(1)).to(trainer.device)

    def tick(self, loss_d, loss_g):
        t, s, pace, deadline = self.trainer, self.settings, self.pace, self.pace.deadline
        pace.retime()
        seconds = deadline.elapsed() - self.t_start
        trained = pace.plan.prior_train_s + seconds
        now = time.monotonic()
        if now - self.last_tick >= s.tick_s:
            self.last_tick = now
            spread = sample_spread(t.generator_to_ship(), self.fixed_z)
            window = pace.plan.window(self.t_start)
            log(f"step {t.step_count}  {(t.step_count - self.first) / max(seconds, 1e-9):.2f} it/s  "
                f"loss_d {loss_d:.4f}  loss_g {loss_g:.4f}  lr_g {t.opt_g.param_groups[0]['lr']:.2e}  "
                f"spread {spread:.3f}  train {format_duration(seconds)}/{format_duration(window)}"
                + (f"  steps {pace.step_slowdown:.1f}x slower than at first" if pace.step_slowdown > 1.1 else ""))
            self.history.setdefault("spread", []).append((trained, spread))
            if spread < 0.02:
                warn(f"samples of a fixed batch barely differ (spread {spread:.4f}): possible mode collapse")
        if (self.checkpoint_fn is not None and s.checkpoint_s > 0 and now - self.last_ckpt >= s.checkpoint_s
                and pace.checkpoint_fits(self.ckpt_s)):
            t0 = time.monotonic()
            self.checkpoint_fn(trained, pace.plan.plan_s, False)
            self.last_ckpt = time.monotonic()
            self.ckpt_s = self.last_ckpt - t0
