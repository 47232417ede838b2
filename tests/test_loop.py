import threading

import pytest
import torch

from modules.recipe import loop
from modules.recipe.train import build_trainer
from modules.recipe.utils import Deadline
from conftest import CPU, loop_kwargs, run_loop, tiny_cfg, tiny_data, window_plan


def test_nan_is_rolled_back_and_training_goes_on():
    torch.manual_seed(0)
    cfg = tiny_cfg(batch_size=4, fault="nan@12", snapshot_every=5)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    d = Deadline(3600)
    summary = run_loop(trainer, plan=window_plan(d, 600), deadline=d, stop_event=None,
                         **loop_kwargs(cfg, check_every=5, snapshot_every=5, tick_s=1e9, max_steps=25))
    assert summary.rollbacks == 1 and summary.reason == "steps" and trainer.step_count == 25
    for p in list(trainer.generator_to_ship().parameters()) + list(trainer.D.parameters()):
        assert torch.isfinite(p).all()


def test_repeated_divergence_stops_training():
    torch.manual_seed(0)
    cfg = tiny_cfg(batch_size=4)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    trainer.step = _always_nan(trainer.step, trainer)  # every step reports a non-finite loss
    d = Deadline(3600)
    summary = run_loop(trainer, plan=window_plan(d, 600), deadline=d, stop_event=None,
                         **loop_kwargs(cfg, check_every=2, snapshot_every=2, tick_s=1e9, max_rollbacks=2, max_steps=50))
    assert summary.reason == "diverged" and summary.rollbacks == 3
    for p in trainer.generator_to_ship().parameters():
        assert torch.isfinite(p).all()


def _always_nan(step, trainer):
    def nan_step():
        step()
        trainer.stats[2] += 1  # a non-finite loss at every step
    return nan_step


def test_stop_event_ends_loop():
    cfg = tiny_cfg(batch_size=4)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    ev = threading.Event()
    ev.set()
    d = Deadline(3600)
    summary = run_loop(trainer, plan=window_plan(d, 100), deadline=d, stop_event=ev, **loop_kwargs(cfg))
    assert summary.reason == "interrupted" and summary.steps == 0


def test_loop_stops_before_the_window_closes():
    cfg = tiny_cfg(batch_size=4)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    d = Deadline(3600)
    plan = window_plan(d, 3.0)
    summary = run_loop(trainer, plan=plan, deadline=d, stop_event=None, **loop_kwargs(cfg, check_every=2, tick_s=1e9))
    assert summary.reason == "budget" and summary.steps > 0 and d.elapsed() <= plan.train_until + 3.0  # CI stalls


def test_no_config_default_is_repeated():
    """Defaults live in Config only: every keyword of the functions that build_trainer and main feed from the Config
    is required (a default here could silently disagree with Config's, as four once did)."""
    import inspect

    from modules.recipe.train import EMA, DeviceBatches
    from modules.run.rank import fault_hook
    from modules.run.finish import finish, save_pictures
    from modules.recipe.loop import train_loop
    from modules.recipe.settings import (AveragingSettings, DInputSettings, LossSettings, OptimSettings,
                                         TrainerSettings, trainer_settings)
    from modules.recipe.train import Trainer, build_trainer

    groups = (TrainerSettings, LossSettings, OptimSettings, AveragingSettings, DInputSettings)
    for fn in (Trainer.__init__, DeviceBatches.__init__, EMA.__init__, build_trainer, train_loop, finish, save_pictures,
               trainer_settings, fault_hook, *groups):
        params = inspect.signature(fn).parameters.values()
        with_default = [p.name for p in params if p.default is not inspect.Parameter.empty
                        and p.name not in ("rank", "world_size", "ctx")]  # the ranks' layout, not a Config setting
        assert not with_default, f"{fn.__qualname__} has defaults for {with_default}: make them required keywords"
    assert "aux_weight" in inspect.signature(LossSettings).parameters  # the walk sees the real signature


def test_a_slower_finish_moves_the_stop_earlier():
    """The finish can slow down more than the steps (another process starts after the reserve was measured): near the
    end the loop re-times a generation batch, and a 4x slower one stops training finish_s * 3 earlier."""
    cfg = tiny_cfg(batch_size=4)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    d = Deadline(3600)
    plan = window_plan(d, 8.0, finish_s=1.5, gen_batch_s=0.01)
    probes = []

    def probe():  # a generation batch now takes 4x what was measured at start
        probes.append(d.elapsed())
        return 0.04

    summary = run_loop(trainer, plan=plan, deadline=d, stop_event=None,
                         **loop_kwargs(cfg, check_every=2, tick_s=1e9, finish_probe=probe))
    assert summary.reason == "budget" and summary.steps > 0 and probes
    assert summary.slowdown == 4.0
    assert d.elapsed() <= plan.train_until - 1.5 * 3 + 1.0, (d.elapsed(), plan.train_until)  # + one step, CI stalls


def test_a_failure_before_the_first_step_is_raised_later_ones_ship():
    """Nothing trained yet: the failure is re-raised (run.train names it, exit 2); after one completed step it is a
    crash, and the loop returns for the caller to ship what there is."""
    for at, early in ((0, True), (1, False)):
        cfg = tiny_cfg(batch_size=4, fault=f"raise@{at}")
        trainer = build_trainer(cfg, tiny_data(), CPU)
        d = Deadline(3600)
        run = lambda: run_loop(trainer, plan=window_plan(d, 600), deadline=d, stop_event=None,  # noqa: E731
                               **loop_kwargs(cfg, check_every=2, tick_s=1e9, max_steps=4))
        if early:
            with pytest.raises(RuntimeError, match="injected fault at step 0"):
                run()
            assert trainer.step_count == 0
        else:
            summary = run()
            assert summary.reason == "crashed" and summary.steps == 1 and "injected fault" in summary.error


def test_peak_memory_is_counted_from_the_start_of_training(monkeypatch):
    """The memory line after the first 2 steps reads torch.cuda.max_memory_allocated: its counter is reset at the start
    of training, before any step and after the finish was measured (which generates a larger batch). CUDA faked: the
    counter is a dict; the loop's own call is seen through a spy on the CPU trainer."""
    counter = {"allocated": 1 << 30, "peak": 6 << 30}  # 6 GiB: the finish measurement's generation batch
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: counter.update(peak=counter["allocated"]))
    loop._reset_peak_memory(torch.device("cuda", 0))
    assert counter["peak"] == 1 << 30
    loop._reset_peak_memory(CPU)  # nothing to reset on the CPU (no call into torch.cuda)
    cfg = tiny_cfg(batch_size=4)
    trainer = build_trainer(cfg, tiny_data(), CPU)
    seen = []
    monkeypatch.setattr(loop, "_reset_peak_memory", lambda device: seen.append((device, trainer.step_count)))
    d = Deadline(3600)
    run_loop(trainer, plan=window_plan(d, 600), deadline=d, stop_event=None,
             **loop_kwargs(cfg, check_every=2, tick_s=1e9, max_steps=2))
    assert seen == [(CPU, 0)]
