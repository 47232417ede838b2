import threading

import torch

from modules.loop import train_loop
from modules.train import build_trainer
from modules.utils import Deadline
from test_train import CPU, tiny_cfg, tiny_data


def test_nan_is_rolled_back_and_training_goes_on():
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, fault="nan@12", snapshot_every=5), tiny_data(), CPU)
    d = Deadline(3600)
    summary = train_loop(trainer, deadline=d, train_until=d.elapsed() + 600, stop_event=None, check_every=5,
                         snapshot_every=5, tick_s=1e9, max_steps=25)
    assert summary["rollbacks"] == 1 and summary["reason"] == "steps" and trainer.step_count == 25
    for p in list(trainer.generator_to_ship().parameters()) + list(trainer.D.parameters()):
        assert torch.isfinite(p).all()


def test_repeated_divergence_stops_training():
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4), tiny_data(), CPU)
    trainer.step = _always_nan(trainer.step, trainer)  # every step reports a non-finite loss
    d = Deadline(3600)
    summary = train_loop(trainer, deadline=d, train_until=d.elapsed() + 600, stop_event=None, check_every=2,
                         snapshot_every=2, tick_s=1e9, max_rollbacks=2, max_steps=50)
    assert summary["reason"] == "diverged" and summary["rollbacks"] == 3
    for p in trainer.generator_to_ship().parameters():
        assert torch.isfinite(p).all()


def _always_nan(step, trainer):
    def nan_step():
        step()
        trainer.stats[2] += 1  # a non-finite loss at every step
    return nan_step


def test_stop_event_ends_loop():
    trainer = build_trainer(tiny_cfg(batch_size=4), tiny_data(), CPU)
    ev = threading.Event()
    ev.set()
    d = Deadline(3600)
    summary = train_loop(trainer, deadline=d, train_until=d.elapsed() + 100, stop_event=ev)
    assert summary["reason"] == "interrupted" and summary["steps"] == 0


def test_loop_stops_before_the_window_closes():
    trainer = build_trainer(tiny_cfg(batch_size=4), tiny_data(), CPU)
    d = Deadline(3600)
    until = d.elapsed() + 3.0
    summary = train_loop(trainer, deadline=d, train_until=until, stop_event=None, check_every=2, tick_s=1e9)
    assert summary["reason"] == "budget" and summary["steps"] > 0 and d.elapsed() <= until + 3.0  # CI boxes stall
