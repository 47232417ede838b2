"""modules/plan.py: the budget split into start-up, training and the finish reserve, and the resume arithmetic."""
import pytest

from modules.checkpoint import Resumed
from modules.pace import FINISH_SAFETY
from modules.plan import plan_training, refuse_if_finish_cannot_fit
from modules.utils import UsageError

EST = {"generate": 8.0, "zip": 4.0, "checkpoint": 0.0}


def _plan(**kw):
    args = dict(budget_s=100.0, elapsed_s=10.0, estimates=EST, gen_batch=25, margin_s=5.0, n_images=10000,
                batch_size=16)
    return plan_training(**{**args, **kw})


def test_fresh_run_plan():
    p = _plan()
    assert p.finish_s == pytest.approx(FINISH_SAFETY * 12.0) and p.reserve_s == pytest.approx(p.finish_s + 5.0)
    assert p.train_until == pytest.approx(100.0 - p.reserve_s)
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
