"""modules/run/budget.py: the finish measured through the run's Sampler, the budget split into start-up, training and
the finish reserve (and the resume arithmetic), the stop time, the step-time slowdown, the finish re-timing and what the
finish's optional parts need."""
import math
import time

import numpy as np
import pytest
import torch

import modules.run.budget as budget
from conftest import CPU, tiny_cfg, tiny_data, window_plan
from modules.recipe.sample import Sampler, build_sampler
from modules.recipe.train import build_trainer
from modules.recipe.utils import Deadline, UsageError
from modules.run.budget import (
    CPU_GEN_BATCH_MAX,
    FINISH_EXIT_S,
    FINISH_PICTURES_S,
    FINISH_SAFETY,
    SYNC_MAX_S,
    Pace,
    finish_reserve_s,
    measure_finish_seconds,
    plan_training,
    refuse_if_finish_cannot_fit,
)
from modules.run.checkpoint import Resumed

def _pace(seconds=1000.0, *, finish_s=10.0, probe=None, **kw):
    d = Deadline(3600)
    return Pace(window_plan(d, seconds, finish_s=finish_s, **kw), d, probe=probe)


def test_reserve_and_finish_needs_follow_the_estimates_and_the_slowdown():
    assert finish_reserve_s({"generate": 8.0, "zip": 4.0}) == pytest.approx(FINISH_SAFETY * 12.0)
    pace = _pace()
    pace.plan.estimates.update(zip=3.0, self_check=5.0)
    assert pace.need("zip_retry") == pytest.approx(2 * 3.0 + FINISH_EXIT_S)
    assert pace.need("self_check") == pytest.approx(FINISH_SAFETY * 5.0 + FINISH_EXIT_S)
    assert pace.need("pictures") == pytest.approx(FINISH_PICTURES_S + FINISH_EXIT_S)
    pace.step_slowdown = 2.0
    assert pace.need("self_check") == pytest.approx(FINISH_SAFETY * 5.0 * 2 + FINISH_EXIT_S)
    assert pace.need("pictures") == pytest.approx((FINISH_PICTURES_S + FINISH_EXIT_S) * 2)
    with pytest.raises(KeyError):
        pace.need("lunch")


def test_pictures_need_the_generation_of_their_sheet():
    """breeds.png generates a few images per breed at the finish: the pictures' need counts them in generation
    batches at the measured pace, padded once."""
    pace = _pace()
    batches = math.ceil(720 / pace.plan.gen_batch)
    assert pace.need("pictures", images=720) == pytest.approx(
        FINISH_PICTURES_S + FINISH_SAFETY * batches * pace.plan.gen_batch_s + FINISH_EXIT_S)
    assert pace.need("pictures", images=720) > pace.need("pictures")


def test_the_stop_moves_earlier_by_the_slowdown_and_steps_must_fit():
    pace = _pace(100.0, finish_s=10.0)
    until = pace.plan.train_until
    assert pace.stop_at() == pytest.approx(until)
    pace.step_slowdown, pace.gen_slowdown = 1.5, 3.0  # the larger counts
    assert pace.slowdown == 3.0 and pace.stop_at() == pytest.approx(until - 10.0 * 2)
    assert pace.steps_fit(10)  # before a measurement: the plan's first-step margin (0 here)
    pace.step_s = 10.0  # 10 s a step, the stop at 80 s: 8 more steps (+ one queued) no longer end before it, 5 do
    assert not pace.steps_fit(8) and pace.steps_fit(5)


def test_step_time_sets_the_sync_interval_and_the_slowdown():
    pace = _pace()
    assert pace.sync_interval(check_every=50, done=0, step=0) == 1  # the first two steps are timed one by one
    pace.record(0.5, 1, done=1)
    pace.record(0.2, 1, done=2)  # the first steps carry autotuning: the slowest sets the margin
    assert pace.step_s == 0.5 and pace.step_estimate() == 0.5
    assert pace.sync_interval(check_every=50, done=2, step=2) == int(SYNC_MAX_S / 0.5)  # at most SYNC_MAX_S of steps
    assert pace.sync_interval(check_every=5, done=2, step=2) == 3  # syncs at round step counts: 5, 10, ...
    assert pace.sync_interval(check_every=5, done=2, step=1005) == 5
    pace.record(1.0, 10, done=12)  # steady: 0.1 s a step is the base
    pace.record(3.0, 10, done=22)  # then 0.3 s a step
    assert pace.step_slowdown == pytest.approx(0.7 + 0.3 * 3.0)


def test_retime_only_near_the_end_and_never_raises(capsys):
    calls = []

    def probe():
        calls.append(1)
        return 0.04  # 4x the 0.01 s measured at start

    far = _pace(1e6, finish_s=1.0, probe=probe)  # the end is far: no re-timing
    far.retime()
    assert not calls and far.gen_slowdown == 1.0
    near = _pace(5.0, finish_s=1.0, probe=probe)
    near.retime()
    assert calls and near.gen_slowdown == pytest.approx(4.0)
    assert "at this load the zip will be late" not in capsys.readouterr().out  # 1 s x 4 fits the hour left
    late = _pace(5.0, finish_s=2000.0, probe=probe)  # 2000 s x 4 is more than the hour's budget
    late.retime()
    assert "at this load the zip will be late" in capsys.readouterr().out

    def broken():
        raise RuntimeError("no")

    bad = _pace(5.0, finish_s=1.0, probe=broken)
    bad.retime()
    assert bad.probe is None and bad.gen_slowdown == 1.0


def _probes(*seconds):
    """A probe that returns the given seconds in turn (the last one from then on), and the list of its calls."""
    calls = []

    def probe():
        calls.append(1)
        return seconds[min(len(calls), len(seconds)) - 1]

    return probe, calls


def test_load_seen_by_one_retiming_counts_at_once_a_hiccup_does_not():
    """Load that begins between two re-timings moves the stop at the next one: a batch slower than counted is timed
    again at once and, slow again, counts (not only after a second re-timing seconds later, when the stop may have
    passed: bench_late_load, 13 s over a 120 s budget). A one-off slow batch is timed again too and does not count."""
    probe, calls = _probes(0.01, 0.04)  # quiet at the first re-timing, 4x slower from then on
    pace = _pace(5.0, finish_s=2.0, probe=probe)
    pace.retime()
    assert pace.gen_slowdown == 1.0 and len(calls) == 1  # as measured: timed once
    pace.last_probe = -float("inf")  # the next re-timing is due
    pace.retime()
    assert pace.gen_slowdown == pytest.approx(4.0) and len(calls) == 3  # slower: timed again at once, and it counts
    assert pace.stop_at() == pytest.approx(pace.plan.train_until - 2.0 * 3)
    probe, calls = _probes(0.05, 0.01)  # one hiccup, then as measured
    hiccup = _pace(5.0, finish_s=2.0, probe=probe)
    hiccup.retime()
    assert hiccup.gen_slowdown == 1.0 and len(calls) == 2


def test_syncs_and_retimings_come_closer_near_the_stop():
    """Far from the stop a host sync comes every check_every steps or SYNC_MAX_S, a re-timing every gen_batch_s /
    PROBE_COST; within the last 10 x those, every tenth of the time to the stop (at least 1 s): load arriving late in
    training is seen before the stop has passed."""
    far, near = _pace(1000.0, finish_s=1.0), _pace(5.0, finish_s=1.0)
    for pace in (far, near):
        pace.record(0.5, 1, done=1)  # 0.5 s a step
    assert far.sync_interval(check_every=50, done=2, step=2) == int(SYNC_MAX_S / 0.5)
    assert near.sync_interval(check_every=50, done=2, step=2) == 2  # 1 s of steps
    probe, calls = _probes(0.01)
    pace = _pace(20.0, finish_s=5.0, probe=probe, gen_batch_s=0.1)  # cost rule: every 0.1 / PROBE_COST = 5 s
    pace.retime()
    pace.last_probe = time.monotonic() - 2.5  # 2.5 s ago: more than a tenth of the ~20 s to the stop
    pace.retime()
    assert len(calls) == 2
    far = _pace(1000.0, finish_s=200.0, probe=probe, gen_batch_s=0.1)
    far.retime()
    far.last_probe = time.monotonic() - 2.5  # the cost rule holds far from the stop
    far.retime()
    assert len(calls) == 3


EST = {"generate": 8.0, "zip": 4.0, "checkpoint": 0.0}


def _plan(**kw):
    args = dict(budget_s=100.0, elapsed_s=10.0, estimates=EST, gen_batch=25, margin_s=5.0, n_images=10000,
                batch_size=16)
    return plan_training(**{**args, **kw})


def test_fresh_run_plan():
    p = _plan()
    assert p.finish_s == pytest.approx(FINISH_SAFETY * 12.0) and p.margin_s == 5.0
    assert p.train_until == pytest.approx(100.0 - p.finish_s - p.margin_s)
    assert p.prior_train_s == 0.0 and p.plan_s == pytest.approx(p.train_until - 10.0) and not p.inherited
    assert p.window(10.0) == pytest.approx(p.plan_s) and p.window(p.train_until + 1) == 0.0
    assert p.gen_batch_s == pytest.approx(8.0 / 400) and p.first_step_s == pytest.approx(10 * 8.0 / 10000 * 16)
    assert p.complete(reason="budget", train_seconds_total=1.0) and not p.complete(reason="crashed",
                                                                                  train_seconds_total=1e9)


def test_resumed_runs():
    done = Resumed(path="c.pt", payload={}, step=7, train_seconds=30.0, plan_seconds=30.0, complete=True, history={})
    p = _plan(resumed=done)
    assert p.prior_train_s == 30.0 and p.plan_s == pytest.approx(30.0 + p.train_until - 10.0) and not p.inherited
    half = Resumed(path="c.pt", payload={}, step=7, train_seconds=30.0, plan_seconds=50.0, complete=False, history={})
    p = _plan(resumed=half)
    assert p.inherited and p.plan_s == 50.0 and p.window(10.0) == pytest.approx(20.0)  # the plan's rest only
    assert not p.complete(reason="budget", train_seconds_total=40.0)
    assert p.complete(reason="budget", train_seconds_total=49.9)


def test_no_window_is_a_usage_error():
    with pytest.raises(UsageError, match="--time-budget 30s is too small: start-up and loading took 20.0s"):
        _plan(budget_s=30.0, elapsed_s=20.0, budget_text="30s")


def test_a_window_shorter_than_one_step_is_a_usage_error():
    """Not a run that trains 0 steps and ships noise: the first step's margin (0.128 s here) must fit."""
    fixed = 10.0 + FINISH_SAFETY * 12.0 + 5.0  # start-up + finish reserve
    with pytest.raises(UsageError, match=r"which leaves 0.1s: less than one training step \(~0.1s\)"):
        _plan(budget_s=fixed + 0.1)
    assert _plan(budget_s=fixed + 0.2).window(10.0) == pytest.approx(0.2)


def test_the_self_check_is_reserved_while_it_costs_less_than_the_training_it_leaves(capsys):
    est = {**EST, "self_check": 8.0}  # reserve 1.25 x 20 + 5 = 30 s; the self-check's share 10 s
    p = _plan(estimates=est)  # window with it: 100 - 10 - 30 = 60 s > 10 s
    assert p.self_check_reserved and p.finish_s == pytest.approx(FINISH_SAFETY * 20.0)
    assert "left out" not in capsys.readouterr().out


def test_a_self_check_dearer_than_training_is_left_out_of_the_reserve_not_refused(capsys):
    """The self-check is optional: a budget that holds the zip but not the self-check trains instead of being refused
    (CI: a 300 s run's self-check estimated at 3m18s while three kernels started on 2 cores), and one that holds it
    only by leaving less training than it takes itself drops it too."""
    est = {**EST, "self_check": 60.0}  # 1.25 x 60 = 75 s: with it the window would be 100 - 10 - 95 < 0
    p = _plan(estimates=est)
    assert not p.self_check_reserved and p.finish_s == pytest.approx(FINISH_SAFETY * 12.0)
    assert p.train_until == pytest.approx(100.0 - FINISH_SAFETY * 12.0 - 5.0) and p.estimates == est
    out = capsys.readouterr().out
    assert "self_check 1m00s not reserved" in out and "WARNING: the self-check (~1m15s) is left out" in out
    p = _plan(estimates={**EST, "self_check": 30.0})  # with it: 100 - 10 - 57.5 = 32.5 s of training < 37.5 s
    assert not p.self_check_reserved and p.window(10.0) == pytest.approx(100.0 - 10.0 - 20.0)
    with pytest.raises(UsageError, match="writing the images needs 20.0s"):  # the zip itself still has to fit
        _plan(estimates=est, budget_s=29.0)


def test_a_collective_timeout_moves_the_stop_not_the_budget():
    """Several ranks: training stops hold_back_s earlier (a hung rank costs up to the collective timeout), and the
    plan is right as built: budget_s is the run's own, not a patched copy."""
    p, q = _plan(), _plan(hold_back_s=7.0)
    assert q.budget_s == p.budget_s == 100.0 and q.train_until == pytest.approx(p.train_until - 7.0)
    assert q.plan_s == pytest.approx(p.plan_s - 7.0)


def test_a_partly_measured_finish_that_cannot_fit_is_refused_early():
    """The finish measured so far (the self-check aside) x FINISH_SAFETY + margin past the budget: the plan's
    "too small" line, at once; a finish that still fits is let through to be measured in full."""
    with pytest.raises(UsageError, match=r"--time-budget 1m is too small: start-up and loading took 20.0s and writing "
                                         r"the images needs at least 45.0s \(measurement stopped early\)"):
        refuse_if_finish_cannot_fit({"generate": 32.0}, budget_s=60.0, elapsed_s=20.0, margin_s=5.0, budget_text="1m")
    refuse_if_finish_cannot_fit({"generate": 20.0, "self_check": 500.0}, budget_s=60.0, elapsed_s=20.0, margin_s=5.0)


def test_measured_finish_has_its_parts():
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)
    sampler = build_sampler(tiny_cfg(truncation=2.0, sample_batch=25), trainer, tiny_data())
    assert np.array_equal(sampler.label_counts, [6, 5, 5])
    est, info = measure_finish_seconds(sampler, n_images=100, workers=1, disk_bytes_per_s=1e8,
                                       checkpoint_state=trainer.state_dict(), self_check=False, extractor=None,
                                       n_reference=0, crops=None)
    assert set(est) == {"generate", "zip", "checkpoint"} and all(v > 0 for v in est.values())
    assert info["batch"] == 25 and info["zip_bytes"] > 100 * 1000 and info["checkpoint_bytes"] > 0


def test_measuring_stops_at_the_first_batch_when_checked_and_cpu_batches_are_capped(monkeypatch):
    """check() sees the generation's estimate after the first timed batch; when it raises, nothing more is generated
    (a budget too small is refused within seconds, not after minutes of measurement). On the CPU the measured (and
    finish) batch is at most CPU_GEN_BATCH_MAX: a sample_batch of 500 is 4.8 GiB at full width."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)
    sampler = build_sampler(tiny_cfg(sample_batch=500), trainer, tiny_data())
    calls, seen = [], []

    class Late(Exception):
        pass

    def check(partial):
        seen.append(dict(partial))
        raise Late

    original = Sampler.__call__
    monkeypatch.setattr(Sampler, "__call__", lambda self, n, *a, **kw: calls.append(n) or original(self, n, *a, **kw))
    with pytest.raises(Late):
        measure_finish_seconds(sampler, n_images=1000, workers=1, disk_bytes_per_s=1e8, checkpoint_state={},
                               self_check=False, extractor=None, n_reference=0, crops=None, check=check)
    assert calls == [CPU_GEN_BATCH_MAX, CPU_GEN_BATCH_MAX]  # the warm-up and one timed batch, no second one
    assert list(seen[0]) == ["generate"] and seen[0]["generate"] > 0


def test_the_measured_finish_is_padded_once_and_counts_the_whole_encoding(monkeypatch):
    """Each part is measured as it is, unpadded: FINISH_SAFETY pads their sum once (finish_reserve_s). The zip's part
    counts all of the PNG encoding: the finish overlaps it with generation only where a core is free, and a loaded
    machine (when the reserve matters most) has none. Here encoding 25 images takes 0.5 s (2 s for 100) and a
    generation batch 0.25 s (1 s for 100): the zip's part is the 2 s of encoding plus writing and reading back, not
    the encoding left over after generation, nor 2 s x a safety factor."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)
    sampler = build_sampler(tiny_cfg(sample_batch=25), trainer, tiny_data())
    original, encode = Sampler.__call__, budget.encode_pngs
    monkeypatch.setattr(Sampler, "__call__", lambda self, *a, **kw: time.sleep(0.25) or original(self, *a, **kw))
    monkeypatch.setattr(budget, "encode_pngs", lambda imgs, workers: time.sleep(0.5) or encode(imgs, workers))
    est, _ = measure_finish_seconds(sampler, n_images=100, workers=2, disk_bytes_per_s=1e9, checkpoint_state={},
                                    self_check=False, extractor=None, n_reference=0, crops=None)
    assert est["generate"] >= 1.0
    assert 2.0 <= est["zip"] < 2.0 * FINISH_SAFETY, est
