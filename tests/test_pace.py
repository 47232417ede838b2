"""modules/pace.py: the stop time, the step-time slowdown, the finish re-timing and what the finish's optional parts
need, all from the plan's measured estimates; and the one-rank DistContext whose collectives the loop calls."""
import dataclasses

import pytest
import torch

from conftest import window_plan
from modules.distributed import DistContext
from modules.pace import FINISH_EXIT_S, FINISH_PICTURES_S, FINISH_SAFETY, SYNC_MAX_S, Pace, finish_reserve_s
from modules.utils import Deadline


def _pace(seconds=100.0, *, finish_s=10.0, probe=None, **kw):
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
    with pytest.raises(ValueError):
        pace.need("lunch")


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
    assert pace.step_s == 0.5 and pace.margin() == 1.0
    assert pace.sync_interval(check_every=50, done=2, step=2) == int(SYNC_MAX_S / 0.5)  # at most SYNC_MAX_S of steps
    assert pace.sync_interval(check_every=5, done=2, step=2) == 3  # syncs at round step counts: 5, 10, ...
    assert pace.sync_interval(check_every=5, done=2, step=1005) == 5
    pace.record(1.0, 10, done=12)  # steady: 0.1 s a step is the base
    pace.record(3.0, 10, done=22)  # then 0.3 s a step
    assert pace.step_slowdown == pytest.approx(0.7 + 0.3 * 3.0)
    pace.record(1.0, 10, done=32, level=2)  # a new PGGAN level has its own base
    assert pace.base_s == pytest.approx(0.1) and pace.step_slowdown == 1.0


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


def test_one_rank_collectives_return_local_values():
    """The loop's single path: with one rank no group exists and every collective is the identity."""
    ctx = DistContext()
    assert not ctx.distributed and ctx.is_main
    assert ctx.agree(stop="budget", progress=0.25, interval=7, device=torch.device("cpu"), interrupted=False) == (
        "budget", 0.25, 7)
    box = {"plan": 1}
    assert ctx.broadcast(box) is box and ctx.dead_workers() == []
    ctx.sync_buffers([torch.nn.BatchNorm1d(2)])  # nothing to send, nothing raised
    assert ctx.mark_broken("a failure") == "" and ctx.broken == ""  # nothing to break alone


def test_a_slower_generation_also_counts_the_encoding_hidden_behind_it():
    """The zip's estimate leaves out the PNG encoding measured as running on another core during generation; once a
    re-timed batch is slower (other load has the cores) that encoding runs in the finish's time: at 2x all of it
    stretches the reserve, on a quiet machine none."""
    d = Deadline(3600)
    plan = dataclasses.replace(window_plan(d, 5.0, finish_s=10.0), encode_hidden_s=8.0)
    quiet, loaded, half = (Pace(plan, d, probe=lambda x=x: x) for x in (0.01, 0.02, 0.015))
    for pace in (quiet, loaded, half):
        pace.retime()
    assert quiet.stop_at() == pytest.approx(plan.train_until)
    assert loaded.stop_at() == pytest.approx(plan.train_until - 10.0 - FINISH_SAFETY * 8.0 * 2)
    assert half.stop_at() == pytest.approx(plan.train_until - 5.0 - FINISH_SAFETY * 4.0 * 1.5)
