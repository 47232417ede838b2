"""The time budget: the finish measured on this device before training, the plan (TrainPlan), and the Pace that moves
the stop earlier when the machine gets slower. The finish reserve is the measured finish x FINISH_SAFETY (once) +
Config.reserve_margin_s, stretched by the slowdown of the steps or of a generation batch re-timed near the end."""
import io
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from modules.recipe.utils import UsageError, format_duration, log, warn
from modules.run.evaluate import MAX_CROPS_PIXEL_NN
from modules.run.metrics import frechet_distance, memorization_distance, nearest_pixel
from modules.run.submission import encode_pngs

FINISH_SAFETY = 1.25  # the measured finish x this: it is timed on ~1% of the work, and other load comes and goes
SLOWDOWN_MAX = 3.0  # the finish reserve grows with the measured slowdown of the steps, up to this factor
FINISH_SLOWDOWN_MAX = 8.0  # ... or with the slowdown of a re-timed generation batch, up to this factor
PROBE_COST = 0.02  # near the end a generation batch is re-timed every its time / this (2 % of the time) ...
PROBE_SHARE = 0.1  # ... or, nearer the stop, every this share of the time to it (at least 1 s apart; syncs too)
SYNC_MAX_S = 10.0  # a host sync (finite check, step timing, upkeep) at least this often, whatever check_every says
FINISH_EXIT_S = 2.0  # report, last log lines and interpreter exit after the zip
FINISH_PICTURES_S = 2.0  # samples.png and losses.png, plus G on 64 latents
OPTIONAL_FINISH = "self_check"  # the one part of the finish a run can do without: the zip never waits for it
SQRTM_PROBE_DIM = 512  # the Fréchet sqrtm is timed at this size and scaled by (dim / size)^3
SELF_CHECK_PROBE = 200  # images the self-check's parts are timed on, whatever the generation batch
CPU_GEN_BATCH_MAX = 64  # CPU generation batch cap: ~10 MB per image at full width, and no faster past a few dozen


# the finish, measured before training


def timed(fn, *args, **kw):
    t0 = time.monotonic()
    out = fn(*args, **kw)
    return time.monotonic() - t0, out


def measure_finish_seconds(sampler, *, n_images, workers, disk_bytes_per_s, checkpoint_state, self_check, extractor,
                           n_reference, crops, check=None):
    """Each part of the finish (generate, zip, checkpoint, self_check) timed on a sample and scaled to the whole,
    unpadded. The zip counts all of the PNG encoding: under load no core is free to overlap it with generation.
    crops: uint8 [N,64,64,3]. check({part: seconds} so far) may raise to stop measuring a finish that cannot fit.
    -> ({part: seconds}, {"batch": the generation batch that fits, "zip_bytes", "checkpoint_bytes"})"""
    check = check or (lambda partial: None)
    cap = CPU_GEN_BATCH_MAX if sampler.device.type == "cpu" else n_images
    t_gen, imgs, batch = _time_generation(sampler.with_batch(min(sampler.batch, n_images, cap)),
                                          first=lambda dt, b: check({"generate": dt * math.ceil(n_images / b)}))
    est = {"generate": t_gen * math.ceil(n_images / batch)}
    check(est)
    scale = n_images / len(imgs)
    t_enc, pngs = timed(encode_pngs, imgs, workers)
    zip_bytes = (sum(map(len, pngs)) + 100 * len(pngs)) * scale  # + zip headers
    t_verify, _ = timed(lambda: [Image.open(io.BytesIO(b)).size for b in pngs])
    est["zip"] = (t_enc + t_verify) * scale + 2 * zip_bytes / disk_bytes_per_s
    check(est)
    buf = io.BytesIO()
    t_ser, _ = timed(torch.save, checkpoint_state, buf)
    est["checkpoint"] = t_ser + buf.tell() / disk_bytes_per_s
    check(est)
    info = {"batch": batch, "zip_bytes": int(zip_bytes), "checkpoint_bytes": buf.tell()}
    if self_check:
        est["self_check"] = _self_check_seconds(imgs, extractor=extractor, device=sampler.device, n_images=n_images,
                                                n_reference=n_reference, crops=crops)
    return est, info


def _time_generation(sampler, first):
    """A warm-up batch (cudnn autotune, allocator), then two timed ones; out of memory halves the batch (down to 8).
    first(seconds, batch) after the first timed batch may raise. -> (the slower time, the last images, the batch)"""
    batch = sampler.batch
    while True:
        try:
            sampler(batch)  # warm-up
            t1, _ = timed(sampler, batch, 1)
            first(t1, batch)
            t2, imgs = timed(sampler, batch, 2)
            return max(t1, t2), imgs, batch
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            if batch <= 8:
                raise
            warn(f"generating {batch} images at once does not fit ({type(exc).__name__}): trying {batch // 2}")
            batch //= 2
            sampler = sampler.with_batch(batch)
            torch.cuda.empty_cache()  # a no-op without CUDA


def _self_check_seconds(imgs, *, extractor, device, n_images, n_reference, crops):
    """The self-check's time, from its parts timed on SELF_CHECK_PROBE images (per-call overheads must not scale)."""
    k = SELF_CHECK_PROBE
    probe = np.resize(imgs, (k, *imgs.shape[1:]))
    nearest_pixel(probe[:8], crops[:8], device=device)  # warm-up: the first call sets up kernels and threads
    m_crops = min(len(crops), 1024)
    t_pix, _ = timed(nearest_pixel, probe, crops[:m_crops], device=device)
    seconds = t_pix * n_images / k * min(len(crops), MAX_CROPS_PIXEL_NN) / m_crops
    if extractor is not None:  # FID: features of both sets, covariances, the sqrtm, the memorization distances
        rng, dim = np.random.default_rng(0), extractor.dim
        extractor.features_and_logits(probe[:8])  # warm-up
        t_feat, _ = timed(extractor.features_and_logits, probe)
        feats = rng.random((k, dim))
        t_cov, _ = timed(lambda: feats.T @ feats)  # feature_stats: np.cov, float64 [D,D]
        m = min(dim, SQRTM_PROBE_DIM)
        a = rng.standard_normal((m, 2 * m))
        sigma = a @ a.T / (2 * m)
        t_sqrtm = timed(frechet_distance, np.zeros(m), sigma, np.zeros(m), sigma)[0] * (dim / m) ** 3
        m_ref = max(min(n_reference, 2048), 1)
        t_mem, _ = timed(memorization_distance, feats.astype(np.float32), rng.random((m_ref, dim)))
        seconds += ((t_feat + t_cov) * (n_images + n_reference) / k + t_sqrtm
                    + t_mem * n_images / k * n_reference / m_ref)
    return seconds


def finish_reserve_s(estimates):
    """FINISH_SAFETY x the measured parts ({part: seconds}), without the margin."""
    return FINISH_SAFETY * sum(estimates.values())


# the plan


@dataclass(frozen=True)
class TrainPlan:
    """All times are seconds; `train_until` is counted on the Deadline's clock (from process start)."""

    budget_s: float  # the whole run's wall time
    estimates: dict  # the measured finish, {part: seconds}: generate, zip, checkpoint (+ self_check), before safety
    finish_s: float  # FINISH_SAFETY x the reserved parts of estimates: the finish reserve; the Pace stretches it
    margin_s: float  # Config.reserve_margin_s, kept on top of finish_s
    train_until: float  # training stops here on the Deadline's clock: budget_s - hold_back_s - finish_s - margin_s
    prior_train_s: float  # training done by the run(s) this one resumes (0 for a fresh run)
    plan_s: float  # training time the schedule (LR, noise decay) spans, prior_train_s included
    inherited: bool  # resumed an unfinished plan: plan_s is the earlier run's, not this budget's
    first_step_s: float  # the step-time margin before a step is measured: 10 generation batches' worth
    gen_batch: int  # images per generation batch that fits (the finish's batch)
    gen_batch_s: float  # seconds per generation batch as measured at start: the finish's pace, re-timed near the end
    self_check_reserved: bool = True  # False: the self-check is not in finish_s; it runs only if training ends early
    hold_back_s: float = 0.0  # several ranks: the training group's collective timeout; train_until is this much earlier

    def window(self, now):
        """This run's training seconds from `now` (Deadline clock): up to train_until, and no further than the plan."""
        return max(min(self.train_until - now, self.plan_s - self.prior_train_s), 0.0)

    def complete(self, *, reason, train_seconds_total):
        """A budget- or step-ended run is complete unless it stopped short of an inherited plan."""
        return reason in ("budget", "steps") and (
            not self.inherited or train_seconds_total >= 0.99 * self.plan_s - 1.0)


def budget_too_small(budget_s, elapsed_s, reserve_s, *, budget_text="", left="", at_least=False):
    return UsageError(f"--time-budget {budget_text or format_duration(budget_s)} is too small: start-up and loading "
                      f"took {format_duration(elapsed_s)} and writing the images needs "
                      f"{'at least ' if at_least else ''}{format_duration(reserve_s)}{left}")


def refuse_if_finish_cannot_fit(partial, *, budget_s, elapsed_s, margin_s, budget_text=""):
    """Refuse as soon as the parts measured so far (without the optional self-check) leave no training time:
    plan_training would refuse the run too, minutes later."""
    reserve_s = finish_reserve_s({k: v for k, v in partial.items() if k != OPTIONAL_FINISH}) + margin_s
    if elapsed_s + reserve_s >= budget_s:
        raise budget_too_small(budget_s, elapsed_s, reserve_s, budget_text=budget_text, at_least=True,
                               left=" (measurement stopped early)")


def plan_training(*, budget_s, elapsed_s, estimates, gen_batch, margin_s, n_images, batch_size, resumed=None,
                  budget_text="", max_steps=0, hold_back_s=0.0):
    """The measured finish -> TrainPlan; logs the reserve and what a resumed run has left. A window that cannot hold
    one step is a UsageError: such a run would ship an untrained generator's noise."""
    first_step_s = 10 * estimates["generate"] / n_images * batch_size
    usable_s = budget_s - hold_back_s - margin_s
    finish_s = finish_reserve_s(estimates)
    check_s = FINISH_SAFETY * estimates.get(OPTIONAL_FINISH, 0.0)
    reserved = not (check_s > 0 and usable_s - finish_s - elapsed_s < check_s)  # never more than training gets
    finish_s -= 0.0 if reserved else check_s
    train_until = usable_s - finish_s
    window = train_until - elapsed_s
    parts = ", ".join(f"{k} {format_duration(v)}" + ("" if reserved or k != OPTIONAL_FINISH else " not reserved")
                      for k, v in estimates.items())
    steps = (f" or step {max_steps:,}, whichever comes first (max_steps; then the zip is written and the rest of the "
             "budget is not used)" if max_steps else " (no step limit: max_steps 0)")
    log(f"finish reserve {format_duration(finish_s + margin_s)} (measured: {parts}, x{FINISH_SAFETY:g}, margin "
        f"{format_duration(margin_s)}); training until {format_duration(train_until)}{steps}")
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
        if resumed.complete:
            log(f"resumed from {resumed.path} at step {resumed.step}: its training was complete "
                f"({format_duration(prior_s)}); training on for another {format_duration(window)}")
        else:
            plan_s, inherited = max(resumed.plan_seconds, prior_s), True
            left = plan_s - prior_s
            log(f"resumed from {resumed.path} at step {resumed.step}: {format_duration(prior_s)} of "
                f"{format_duration(plan_s)} planned training done; training the remaining {format_duration(left)}"
                + ("" if left <= window else f" (this budget allows {format_duration(window)})"))
    batches = math.ceil(n_images / gen_batch)
    return TrainPlan(budget_s=budget_s, estimates=dict(estimates), finish_s=finish_s, margin_s=margin_s,
                     train_until=train_until, prior_train_s=prior_s, plan_s=max(plan_s, 1e-6), inherited=inherited,
                     first_step_s=first_step_s, gen_batch=gen_batch, gen_batch_s=estimates["generate"] / batches,
                     self_check_reserved=reserved, hold_back_s=hold_back_s)


# the pace: training's stop and the finish's optional parts, at the slowdown measured now


class Pace:
    """Step time and slowdown, measured at the loop's host syncs, and the finish's re-timing near the end. probe: () ->
    seconds for one generation batch of plan.gen_batch images now, or None not to re-time. slowdown = max(steps now vs
    their first steady measurement, a re-timed generation batch vs at start): the finish reserve is
    stretched by it, so training stops earlier when the machine got slower."""

    def __init__(self, plan, deadline, *, probe=None):
        self.plan, self.deadline, self.probe = plan, deadline, probe
        self.step_s = None  # seconds per step for the margin (the first steps, with autotuning, weigh in)
        self.base_s = self.recent_s = None  # steady seconds per step: the first measured, a running average
        self.step_slowdown, self.gen_slowdown = 1.0, 1.0
        self.last_probe, self.said_gen = -float("inf"), 1.0

    @property
    def slowdown(self):
        return max(self.step_slowdown, self.gen_slowdown)

    def step_estimate(self):
        return self.step_s if self.step_s is not None else self.plan.first_step_s

    def stop_at(self):
        """Training ends by this time (Deadline clock): train_until, earlier by what the slowdown adds to the finish."""
        return self.plan.train_until - self.plan.finish_s * (self.slowdown - 1)

    def steps_fit(self, steps):
        """Do `steps` more steps, plus one queued on the GPU, end before stop_at()?"""
        return self.deadline.elapsed() + (steps + 1) * self.step_estimate() < self.stop_at()

    def _watch_s(self, most_s):
        """most_s, or PROBE_SHARE of the time to the stop (at least 1 s): load arriving late is seen before the stop."""
        return min(most_s, max(1.0, PROBE_SHARE * (self.stop_at() - self.deadline.elapsed())))

    def sync_interval(self, *, check_every, done, step):
        """Steps to the next host sync: 1 for the first two of this run (their time sets the margin), then to the next
        multiple of check_every, but no more than _watch_s(SYNC_MAX_S) of steps. done: steps made in this run."""
        if done < 2:
            return 1
        most = int(self._watch_s(SYNC_MAX_S) / max(self.step_estimate(), 1e-9))
        return max(1, min(check_every - step % check_every, most))

    def record(self, seconds, steps, *, done):
        """At a host sync: `steps` steps took `seconds`; done = steps made in this run."""
        measured = seconds / max(steps, 1)
        if done <= 2:  # the first steps carry autotuning: they set the margin until steady steps are measured
            self.step_s = max(self.step_s or 0.0, measured)
            return
        self.step_s = 0.7 * self.step_s + 0.3 * measured
        if self.base_s is None:
            self.base_s = self.recent_s = measured
        self.recent_s = 0.7 * self.recent_s + 0.3 * measured
        self.step_slowdown = min(max(self.recent_s / self.base_s, 1.0), SLOWDOWN_MAX)

    def checkpoint_fits(self, checkpoint_s):
        """Does twice the time of the last checkpoint and a step (and one queued on the GPU) fit before the stop?"""
        return self.deadline.elapsed() + 2 * (checkpoint_s + self.step_estimate()) < self.stop_at()

    def retime(self):
        """Near the end, re-time a generation batch every _watch_s(its time / PROBE_COST). A batch slower than counted
        so far is timed again at once and the lesser counts: new load counts now, a one-off hiccup does not."""
        plan = self.plan
        if (self.probe is None or self.deadline.elapsed() < plan.train_until - plan.finish_s * (FINISH_SLOWDOWN_MAX - 1)
                or time.monotonic() - self.last_probe < self._watch_s(max(1.0, plan.gen_batch_s / PROBE_COST))):
            return
        try:
            slowdown = self.probe() / plan.gen_batch_s
            if slowdown > 1.1 * self.gen_slowdown:
                slowdown = min(slowdown, self.probe() / plan.gen_batch_s)
        except Exception as exc:  # never worth a crash: train on without re-timing
            warn(f"re-timing a generation batch failed ({type(exc).__name__}: {exc}); not re-timed again")
            self.probe = None
            return
        self.last_probe = time.monotonic()
        self.gen_slowdown = min(max(slowdown, 1.0), FINISH_SLOWDOWN_MAX)
        if self.gen_slowdown > 1.2 * self.said_gen:  # said_gen >= 1: only a slowdown past 1.2x is logged
            self.said_gen = self.gen_slowdown
            reserve, left = plan.finish_s * self.slowdown + plan.margin_s, self.remaining()
            log(f"generation {self.gen_slowdown:.1f}x slower than measured at start: the finish reserve grows to "
                f"{format_duration(reserve)}" + ("" if reserve <= left else
                                                 f", more than the {format_duration(max(left, 0.0))} left: at this "
                                                 f"load the zip will be late"))

    # the finish

    def remaining(self):
        return self.deadline.remaining()

    def need(self, part, *, images=0):
        """Seconds that must be left to start an optional part of the finish now: "zip_retry" (a single-threaded zip:
        twice the measured one), "self_check" or "pictures" (images: those it generates beyond samples.png's, timed
        as the finish's generation batches)."""
        est, s, plan = self.plan.estimates, self.slowdown, self.plan
        gen_s = FINISH_SAFETY * math.ceil(images / plan.gen_batch) * plan.gen_batch_s
        return {"zip_retry": 2 * est["zip"] * s + FINISH_EXIT_S,
                "self_check": FINISH_SAFETY * est.get("self_check", 0.0) * s + FINISH_EXIT_S,
                "pictures": (FINISH_PICTURES_S + gen_s + FINISH_EXIT_S) * s}[part]
