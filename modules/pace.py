"""The run's pace: how fast training steps and the finish's generation run now against how fast they ran when measured,
and what that means for when training must stop and which part of the finish still fits. Every piece of the
finish-safety arithmetic (FINISH_SAFETY x measured estimates x slowdown) lives here: the plan (plan.py), the loop's stop
(`Pace.stop_at`), the collective timeout (main) and the finish's optional parts (`Pace.need`) all ask this module."""
import time

from modules.utils import format_duration, log, warn

FINISH_SAFETY = 1.25  # measured finish times x this: they are timed on ~1% of the work, and other load comes and goes
FINISH_EXIT_S = 2.0  # report, last log lines and interpreter exit after the zip
FINISH_PICTURES_S = 2.0  # samples.png and losses.png, plus G on 64 latents
SYNC_MAX_S = 10.0  # a host sync (finite check, step timing, upkeep) at least this often, whatever check_every says
SLOWDOWN_MAX = 3.0  # the finish reserve grows with the measured slowdown of the steps, up to this factor
FINISH_SLOWDOWN_MAX = 8.0  # ... or with the slowdown of a re-timed generation batch, up to this factor
PROBE_COST = 0.02  # near the end a generation batch is re-timed at most this fraction of the time (and every 1 s)


def finish_reserve_s(estimates):
    """The finish reserve of measured estimates ({part: seconds}): FINISH_SAFETY x their sum (margin not included)."""
    return FINISH_SAFETY * sum(estimates.values())


class Pace:
    """Step time and slowdown, measured at the loop's host syncs, and the finish's re-timing near the end.

    plan: the TrainPlan (train_until, finish_s, first_step_s, gen_batch_s, estimates); deadline: the run's Deadline;
    probe: () -> seconds for one generation batch of plan.gen_batch images now, or None not to re-time.
    slowdown = max(steps now vs their first steady measurement (per PGGAN level), a re-timed generation batch vs at
    start): the finish reserve is stretched by it, so training stops earlier when the machine got slower.
    """

    def __init__(self, plan, deadline, *, probe=None):
        self.plan, self.deadline, self.probe = plan, deadline, probe
        self.step_s = None  # seconds per step for the margin (the first steps, with autotuning, weigh in)
        self.base_s = self.recent_s = None  # steady seconds per step: the first measured (per level), a running average
        self.level = None  # PGGAN level the base was measured at
        self.step_slowdown, self.gen_slowdown = 1.0, 1.0
        self.last_probe, self.probes, self.said_gen = -float("inf"), [], 1.0

    @property
    def slowdown(self):
        return max(self.step_slowdown, self.gen_slowdown)

    def step_estimate(self):
        """Seconds per step: measured, or plan.first_step_s before the first measurement."""
        return self.step_s if self.step_s is not None else self.plan.first_step_s

    def stop_at(self):
        """Training must end by this time (Deadline clock): the plan's train_until, earlier by what the slowdown adds
        to the finish."""
        return self.plan.train_until - self.finish_stretch_s()

    def finish_stretch_s(self):
        """Seconds the slowdown adds to the finish reserve: every part slower by it, and the PNG encoding measured as
        hidden behind generation on another core counted too, in proportion as generation slowed (a re-timed batch
        twice as slow: the other cores are busy, all of it runs in the finish's time)."""
        lost = min(max(self.gen_slowdown - 1.0, 0.0), 1.0) * self.plan.encode_hidden_s
        return self.plan.finish_s * (self.slowdown - 1) + FINISH_SAFETY * lost * self.slowdown

    def steps_fit(self, steps):
        """Do `steps` more steps, plus one queued on the GPU, end before stop_at()?"""
        return self.deadline.elapsed() + (steps + 1) * self.step_estimate() < self.stop_at()

    def sync_interval(self, *, check_every, done, step):
        """Steps to the next host sync: 1 for the first two of this run (their time sets the margin), then to the next
        multiple of check_every (syncs at round step counts: 10, 20, ...), but no more than SYNC_MAX_S of steps.
        done: steps made in this run; step: the trainer's step count."""
        if done < 2:
            return 1
        return max(1, min(check_every - step % check_every, int(SYNC_MAX_S / max(self.step_estimate(), 1e-9))))

    def margin(self):
        """Time kept free before the stop: the step we start + one queued on the GPU (before a measurement: the plan's
        first-step margin)."""
        return 2 * self.step_s if self.step_s is not None else self.plan.first_step_s

    def record(self, seconds, steps, *, done, level=None):
        """At a host sync: `steps` steps took `seconds`; done = steps made in this run; level: the PGGAN level trained
        (each has its own step time: the slowdown is measured within one), None for other architectures."""
        measured = seconds / max(steps, 1)
        if done <= 2:  # the first steps carry autotuning: they set the margin until steady steps are measured
            self.step_s = max(self.step_s or 0.0, measured)
            return
        self.step_s = 0.7 * self.step_s + 0.3 * measured
        if level != self.level:
            self.level, self.base_s = level, None
        if self.base_s is None:
            self.base_s = self.recent_s = measured
        self.recent_s = 0.7 * self.recent_s + 0.3 * measured
        self.step_slowdown = min(max(self.recent_s / self.base_s, 1.0), SLOWDOWN_MAX)

    def checkpoint_fits(self, checkpoint_s):
        """Does a checkpoint that took checkpoint_s last time (twice that, to be safe) fit before stop_at()?"""
        return self.deadline.elapsed() + 2 * checkpoint_s + self.margin() < self.stop_at()

    def retime(self):
        """Near the end (where a slower finish can still move the stop), re-time a generation batch at most every
        max(1 s, its time / PROBE_COST); the lesser of the last two counts (not one hiccup). Never raises."""
        plan = self.plan
        if self.probe is None or self.deadline.elapsed() < plan.train_until - plan.finish_s * (FINISH_SLOWDOWN_MAX - 1):
            return
        if time.monotonic() - self.last_probe < max(1.0, plan.gen_batch_s / PROBE_COST):
            return
        self.last_probe = time.monotonic()
        try:
            self.probes = (self.probes + [self.probe() / max(plan.gen_batch_s, 1e-9)])[-2:]
        except Exception as exc:  # never worth a crash: train on without re-timing
            warn(f"re-timing a generation batch failed ({type(exc).__name__}: {exc}); not re-timed again")
            self.probe, self.probes = None, self.probes or [1.0]
        self.gen_slowdown = min(max(min(self.probes), 1.0), FINISH_SLOWDOWN_MAX)
        if self.gen_slowdown > 1.2 and self.gen_slowdown > 1.2 * self.said_gen:
            self.said_gen = self.gen_slowdown
            reserve, left = plan.finish_s + self.finish_stretch_s() + plan.margin_s, self.remaining()
            log(f"generation {self.gen_slowdown:.1f}x slower than measured at start: the finish reserve grows to "
                f"{format_duration(reserve)}" + ("" if reserve <= left else
                                                 f", more than the {format_duration(max(left, 0.0))} left: at this "
                                                 f"load the zip will be late"))

    # the finish

    def remaining(self):
        """Seconds left in the whole budget."""
        return self.deadline.remaining()

    def need(self, part):
        """Seconds that must be left to start an optional part of the finish now, at the measured slowdown:
        "zip_retry" (a second, single-threaded zip: twice the measured zip), "self_check", "pictures"."""
        est, s = self.plan.estimates, self.slowdown
        if part == "zip_retry":
            return 2 * est["zip"] * s + FINISH_EXIT_S
        if part == "self_check":
            return FINISH_SAFETY * est.get("self_check", 0.0) * s + FINISH_EXIT_S
        if part == "pictures":
            return (FINISH_PICTURES_S + FINISH_EXIT_S) * s
        raise ValueError(f"unknown finish part {part!r}")
