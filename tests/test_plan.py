"""modules/plan.py: the budget split into start-up, training and the finish reserve, and the resume arithmetic."""
import pytest

from modules.finish import FINISH_SAFETY
from modules.plan import plan_training
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
    done = {"train_seconds": 30.0, "plan_seconds": 30.0, "complete": True, "trainer": {"step": 7}}
    p = _plan(resumed=done)
    assert p.prior_train_s == 30.0 and p.plan_s == pytest.approx(30.0 + p.train_until - 10.0) and not p.inherited
    half = {"train_seconds": 30.0, "plan_seconds": 50.0, "complete": False, "trainer": {"step": 7}}
    p = _plan(resumed=half)
    assert p.inherited and p.plan_s == 50.0 and p.window(10.0) == pytest.approx(20.0)  # the plan's rest only
    assert not p.complete(reason="budget", train_seconds_total=40.0)
    assert p.complete(reason="budget", train_seconds_total=49.9)


def test_no_window_is_a_usage_error():
    with pytest.raises(UsageError, match="--time-budget 30s is too small: start-up and loading took 20.0s"):
        _plan(budget_s=30.0, elapsed_s=20.0, budget_text="30s")
