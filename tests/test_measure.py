"""modules/measure.py: the measured finish reserve has its parts, timed through the run's Sampler."""
import numpy as np
import pytest
import torch

from conftest import CPU, tiny_cfg, tiny_data
from modules.measure import CPU_GEN_BATCH_MAX, measure_finish_seconds
from modules.sample import Sampler, build_sampler
from modules.train import build_trainer


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
