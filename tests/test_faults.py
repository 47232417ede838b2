"""Config.fault's step faults, injected by the loop's before_step hook (modules/run/rank.py), not by Trainer.step."""
import inspect
import os
import threading
import time

import pytest
import torch

from conftest import CPU, tiny_cfg, tiny_data
from modules.recipe.train import Trainer, build_trainer
from modules.run.rank import fault_hook


def _trainer():
    torch.manual_seed(0)
    return build_trainer(tiny_cfg(batch_size=2, attention=False), tiny_data(), CPU)


def test_no_step_faults_no_hook():
    assert fault_hook("", rank=0) is None and fault_hook("zipfail", rank=0) is None  # zipfail is the finish's
    assert fault_hook("zipfail,nan@3", rank=0) is not None
    assert "fault" not in inspect.getsource(Trainer.step)  # the GAN step holds no test code


def test_raise_and_oom_at_their_step_once():
    trainer, hook = _trainer(), fault_hook("raise@1,oom@2", rank=0)
    hook(trainer)  # step 0: nothing
    trainer.step_count = 1
    with pytest.raises(RuntimeError, match="injected fault at step 1"):
        hook(trainer)
    hook(trainer)  # one shot
    trainer.step_count = 2
    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory.*injected at step 2"):
        hook(trainer)
    hook(trainer)


def test_nan_makes_that_steps_losses_non_finite_once():
    """nan@1: D's weights turn NaN right before step 1, so that step's losses are non-finite (the loop rolls back);
    one shot: after the roll-back the same step passes."""
    trainer, hook = _trainer(), fault_hook("nan@1", rank=0)
    hook(trainer)
    trainer.step()
    assert trainer.read_stats()[2] == 0
    snapshot = trainer.snapshot()
    hook(trainer)
    trainer.step()
    assert trainer.read_stats()[2] > 0
    trainer.rollback(snapshot, 1.0)  # as the loop does
    assert trainer.step_count == 1 and all(torch.isfinite(p).all() for p in trainer.D.parameters())
    hook(trainer)
    trainer.step()
    assert trainer.read_stats()[2] == 0


def test_kill_only_on_rank_1(monkeypatch):
    killed = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: killed.append(sig))
    trainer = _trainer()
    fault_hook("kill@0", rank=0)(trainer)
    assert not killed
    fault_hook("kill@0", rank=1)(trainer)
    assert len(killed) == 1


def test_slow_and_slowgen(monkeypatch):
    slept, here, real_sleep = [], threading.current_thread(), time.sleep
    # this thread's sleeps only: a daemon thread an earlier test left (test_checkpoint's FIFO writer) sleeps too
    monkeypatch.setattr(time, "sleep", lambda s: slept.append(s) if threading.current_thread() is here else real_sleep(s))
    trainer, hook = _trainer(), fault_hook("slow@0.25,slowgen@0.5", rank=0)
    hook(trainer)
    hook(trainer)
    assert slept == [0.25, 0.25]  # every step; slowgen's hooks are registered once
    del slept[:]
    trainer.step()  # training-mode forwards of G: not slowed
    assert slept == []
    G = trainer.generator_to_ship().eval()
    with torch.no_grad():
        G(torch.randn(1, trainer.z_dim), torch.zeros(1, dtype=torch.long))
    assert slept == [0.5]
