"""The run's plan as data: how the time budget splits into start-up, training and the finish reserve, and how a resumed
run carries on the schedule of the run it continues. plan_training() computes it once; the loop, the final checkpoint
and report.json read it."""
from dataclasses import dataclass

from modules.pace import FINISH_SAFETY, finish_reserve_s
from modules.utils import UsageError, format_duration, log, warn

OPTIONAL_FINISH = "self_check"  # the one part of the finish a run can do without: the zip never waits for it


@dataclass(frozen=True)
class TrainPlan:
    """All times are seconds; `train_until` is counted on the Deadline's clock (from process start)."""

    budget_s: float  # the whole run's wall time
    estimates: dict  # the measured finish, {part: seconds}: generate, zip, checkpoint (+ self_check), before safety
    finish_s: float  # FINISH_SAFETY x the reserved parts of estimates: the finish reserve; the loop stretches it
    margin_s: float  # Config.reserve_margin_s, kept on top of finish_s
    train_until: float  # training stops here on the Deadline's clock: budget_s - hold_back_s - finish_s - margin_s
    prior_train_s: float  # training done by the run(s) this one resumes (0 for a fresh run)
    plan_s: float  # training time the schedule (LR, PGGAN growth) spans, prior_train_s included
    inherited: bool  # resumed an unfinished plan: plan_s is the earlier run's, not this budget's
    first_step_s: float  # the step-time margin before a step is measured: 10 generation batches' worth
    gen_batch: int  # images per generation batch that fits (the finish's batch)
    gen_batch_s: float  # seconds per generation batch as measured at start: the finish's pace, re-timed near the end
    self_check_reserved: bool = True  # False: the self-check is not in finish_s; it runs only if training ends early
    hold_back_s: float = 0.0  # several ranks: the training group's collective timeout; train_until is this much earlier
    encode_hidden_s: float = 0.0  # PNG encoding measured as hidden behind generation on other cores (not in finish_s)

    @property
    def reserve_s(self):
        return self.finish_s + self.margin_s

    def window(self, now):
        """This run's training seconds from `now` (Deadline clock): up to train_until, and no further than the plan."""
        return max(min(self.train_until - now, self.plan_s - self.prior_train_s), 0.0)

    def complete(self, *, reason, train_seconds_total):
        """Did training run to the end of its plan? A budget- or step-ended run is complete unless it carried on an
        inherited plan and stopped short of it."""
        return reason in ("budget", "steps") and (
            not self.inherited or train_seconds_total >= 0.99 * self.plan_s - 1.0)


def budget_too_small(budget_s, elapsed_s, reserve_s, *, budget_text="", left="", at_least=False):
    """The one line a budget that cannot hold training and the finish ends with (a UsageError, exit 2)."""
    return UsageError(f"--time-budget {budget_text or format_duration(budget_s)} is too small: start-up and loading "
                      f"took {format_duration(elapsed_s)} and writing the images needs "
                      f"{'at least ' if at_least else ''}{format_duration(reserve_s)}{left}")


def refuse_if_finish_cannot_fit(partial, *, budget_s, elapsed_s, margin_s, budget_text=""):
    """While the finish is still being measured: raise budget_too_small as soon as the parts measured so far
    (partial: {part: seconds}; the optional self-check does not count) leave no training time. The full measurement
    only adds parts and the clock only moves on, so plan_training would refuse this run too, minutes later."""
    reserve_s = finish_reserve_s({k: v for k, v in partial.items() if k != OPTIONAL_FINISH}) + margin_s
    if elapsed_s + reserve_s >= budget_s:
        log(f"finish reserve at least {format_duration(reserve_s)} (measured so far: " +
            ", ".join(f"{k} {format_duration(v)}" for k, v in partial.items()) +
            f", x{FINISH_SAFETY:g}, margin {format_duration(margin_s)}): more than the budget leaves, measuring stopped")
        raise budget_too_small(budget_s, elapsed_s, reserve_s, budget_text=budget_text, at_least=True,
                               left=" (measurement stopped early)")


def plan_training(*, budget_s, elapsed_s, estimates, gen_batch, margin_s, n_images, batch_size, resumed=None,
                  budget_text="", max_steps=0, hold_back_s=0.0, encode_hidden_s=0.0):
    """The plan, from the measured finish -> TrainPlan; logs the reserve and, when resuming, what is left to train.

    elapsed_s: the Deadline's clock now (start-up, data and measurement spent). resumed: the --resume checkpoint (a
    checkpoint.Resumed) or None. A window that cannot hold the first step (the loop's margin before a step is measured)
    is a UsageError: such a run would ship an untrained generator's noise. max_steps: the step limit (Config.max_steps,
    0 = none), named in the plan line. hold_back_s: training stops this much earlier still (several ranks: the
    training group's collective timeout, which a hung rank can cost); budget_s stays the whole run's.
    encode_hidden_s: the measurement's info["encode_hidden_s"], for the Pace (a loaded machine has no spare core).
    """
    first_step_s = 10 * estimates["generate"] / n_images * batch_size
    finish_s = finish_reserve_s(estimates)
    check_s = finish_reserve_s({OPTIONAL_FINISH: estimates.get(OPTIONAL_FINISH, 0.0)})
    usable_s = budget_s - hold_back_s
    window = usable_s - finish_s - margin_s - elapsed_s
    reserved = not (check_s > 0 and window < check_s)  # never more time for the self-check than for training
    if not reserved:
        finish_s -= check_s
        window += check_s
    train_until = usable_s - finish_s - margin_s
    log(f"finish reserve {format_duration(finish_s + margin_s)} (measured: " +
        ", ".join(f"{k} {format_duration(v)}" + ("" if reserved or k != OPTIONAL_FINISH else " not reserved")
                  for k, v in estimates.items()) +
        f", x{FINISH_SAFETY:g}, margin {format_duration(margin_s)}); training until {format_duration(train_until)}" +
        (f" or step {max_steps:,}, whichever comes first (max_steps; then the zip is written and the rest of the budget "
         f"is not used)" if max_steps else " (no step limit: max_steps 0)"))
    if window <= first_step_s:
        raise budget_too_small(budget_s, elapsed_s, finish_s + margin_s, budget_text=budget_text,
                               left=f", which leaves {format_duration(window)}: less than one training step "
                                    f"(~{format_duration(first_step_s)})" if window > 0 else "")
    if not reserved:
        warn(f"the self-check (~{format_duration(check_s)}) is left out of the finish reserve: it would leave "
             f"{format_duration(max(window - check_s, 0.0))} of training; it runs only if training ends early")
    prior_s = resumed.train_seconds if resumed is not None else 0.0
    plan_s, inherited = prior_s + window, False
    if resumed is not None:
        resume_path, step = resumed.path, resumed.step
        if resumed.complete:
            log(f"resumed from {resume_path} at step {step}: its training was complete "
                f"({format_duration(prior_s)}); training on for another {format_duration(window)}")
        else:
            plan_s, inherited = max(resumed.plan_seconds, prior_s), True
            left = plan_s - prior_s
            log(f"resumed from {resume_path} at step {step}: {format_duration(prior_s)} of "
                f"{format_duration(plan_s)} planned training done; training the remaining {format_duration(left)}"
                + ("" if left <= window else f" (this budget allows {format_duration(window)})"))
    batches = -(-n_images // gen_batch)
    return TrainPlan(budget_s=budget_s, estimates=dict(estimates), finish_s=finish_s, margin_s=margin_s,
                     train_until=train_until, prior_train_s=prior_s, plan_s=max(plan_s, 1e-6), inherited=inherited,
                     first_step_s=first_step_s, gen_batch=gen_batch,
                     gen_batch_s=estimates["generate"] / batches, self_check_reserved=reserved, hold_back_s=hold_back_s,
                     encode_hidden_s=encode_hidden_s)
