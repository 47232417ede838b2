"""modules/measure.py: the measured finish reserve has its parts, timed through the run's Sampler."""
import numpy as np
import torch

from conftest import CPU, tiny_cfg, tiny_data
from modules.measure import measure_finish_seconds
from modules.sample import build_sampler
from modules.train import build_trainer


def test_measured_finish_has_its_parts():
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)
    sampler = build_sampler(tiny_cfg(truncation=2.0, sample_batch=25), trainer, tiny_data())
    assert np.array_equal(sampler.label_counts, [6, 5, 5])
    est, info = measure_finish_seconds(sampler, n_images=100, workers=1, disk_bytes_per_s=1e8,
                                       checkpoint_state=trainer.state_dict(), extractor=None, n_reference=0, crops=None)
    assert set(est) == {"generate", "zip", "checkpoint"} and all(v > 0 for v in est.values())
    assert info["batch"] == 25 and info["zip_bytes"] > 100 * 1000 and info["checkpoint_bytes"] > 0
