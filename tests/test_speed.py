"""Speed paths on CPU: AMP resolution (CUDA capabilities faked), no host sync inside Trainer.step(),
configure_backends and the CPU threads."""
import copy
import dataclasses
import importlib.util
import types
import time

import numpy as np
import pytest
import torch
from torch import nn

from modules.recipe.config import PRESETS, Config, apply_overrides
from modules.recipe.device import resolve_amp
from modules.recipe.device import (
    choose_threads,
    pick_cpu_threads,
    configure_backends,
    configure_threads,
    env_threads,
)
from modules.recipe.train import build_trainer

CPU = torch.device("cpu")
FAKE_CUDA = types.SimpleNamespace(type="cuda", index=0)  # resolve_amp / speed only read .type and pass it on


def fake_capability(monkeypatch, major, minor=0, bf16=True):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def smoke_trainer(amp="auto", batch_size=8):
    """BigGAN at the smoke preset's tiny widths on 16 random images of 3 breeds, on the CPU."""
    cfg = dataclasses.replace(apply_overrides(Config(), PRESETS["smoke"], "smoke"), amp=amp, batch_size=batch_size)
    assert cfg.arch == "biggan" and cfg.g_ch <= 4
    rng = np.random.default_rng(0)
    data = types.SimpleNamespace(images=rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8),
                                 labels=np.arange(16) % 3, classes=["a", "b", "c"], reference=None)
    return build_trainer(cfg, data, CPU)


# amp

def test_resolve_amp_none_on_cpu_and_when_off(monkeypatch):
    assert resolve_amp("auto", CPU) is None
    assert resolve_amp("off", CPU) is None
    fake_capability(monkeypatch, 8)
    assert resolve_amp("off", FAKE_CUDA) is None


@pytest.mark.parametrize("cap, bf16, want", [((6, 0), True, torch.float16),  # P100: no bf16 whatever the driver says
                                             ((7, 5), False, torch.float16),  # T4
                                             ((8, 0), True, torch.bfloat16),  # A100
                                             ((8, 0), False, torch.float16),
                                             ((9, 0), True, torch.bfloat16)])  # H100
def test_resolve_amp_picks_dtype_by_capability(monkeypatch, cap, bf16, want):
    fake_capability(monkeypatch, *cap, bf16=bf16)
    assert resolve_amp("auto", FAKE_CUDA) == want


@pytest.mark.parametrize("amp", ["auto", "off"])
def test_grad_scaler_disabled_on_cpu(amp):
    tr = smoke_trainer(amp=amp)
    assert tr.amp_dtype is None
    assert not tr.scaler_g.is_enabled() and not tr.scaler_d.is_enabled()


# no host sync per step

SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")


class HostSyncError(AssertionError):
    pass


def forbid_host_syncs(monkeypatch, allowed_ids=()):
    """Make every Tensor -> host read raise, except on the tensors in allowed_ids."""
    for name in SYNC_METHODS:
        original = getattr(torch.Tensor, name)

        def patched(self, *args, _name=name, _original=original, **kwargs):
            if id(self) in allowed_ids:
                return _original(self, *args, **kwargs)
            raise HostSyncError(f"host sync: Tensor.{_name} called inside Trainer.step()")

        monkeypatch.setattr(torch.Tensor, name, patched)


def test_trainer_step_makes_no_host_sync(monkeypatch):
    torch.manual_seed(0)
    tr = smoke_trainer()
    tr.step()  # creates the optimiser state
    # Non-fused Adam (CPU) reads its step counter, a CPU scalar, with .item(): not a device sync, and on CUDA fused Adam
    # keeps it on the device. Those counters are the only tensors allowed to be read.
    steps = {id(s["step"]) for opt in (tr.opt_g, tr.opt_d) for s in opt.state.values()}
    assert steps
    with monkeypatch.context() as m:
        forbid_host_syncs(m, steps)
        with pytest.raises(HostSyncError):
            float(torch.ones(()))  # the trap works
        for _ in range(4):
            tr.step()
    assert tr.step_count == 5 and tr.stats_n == 5
    loss_d, loss_g, bad = tr.read_stats()  # the one sync, unpatched
    assert np.isfinite(loss_d) and np.isfinite(loss_g) and bad == 0
    assert tr.stats_n == 0


def test_host_sync_trap_catches_a_sync_in_step(monkeypatch):
    """The trap is not vacuous: a loss read inside step() is caught."""
    tr = smoke_trainer()
    tr.step()
    original_stats = tr.stats

    class SyncingStats:  # step() accumulates into slices and items of its stats tensor on the device
        def __getitem__(self, index):
            return original_stats[index]

        def __setitem__(self, index, value):
            float(value.reshape(-1)[0])  # what a careless `log(float(loss))` would do
            original_stats[index] = value

    tr.stats = SyncingStats()
    with monkeypatch.context() as m:
        forbid_host_syncs(m, {id(s["step"]) for opt in (tr.opt_g, tr.opt_d) for s in opt.state.values()})
        with pytest.raises(HostSyncError):
            tr.step()


# backends

@pytest.fixture
def backend_flags():
    """Snapshot and restore the global backend flags a test may change."""
    conv = torch.backends.cudnn.conv
    saved = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), conv.fp32_precision)
    yield saved
    torch.backends.cudnn.benchmark = saved[0]
    torch.set_float32_matmul_precision(saved[1])
    conv.fp32_precision = saved[2]


def current_flags():
    conv = torch.backends.cudnn.conv
    return torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision(), conv.fp32_precision


def test_configure_backends_cpu_is_a_no_op(backend_flags):
    configure_backends(CPU)
    assert current_flags() == backend_flags


def test_configure_backends_pascal_autotunes_without_tf32(monkeypatch, backend_flags):
    fake_capability(monkeypatch, 6, 0)
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    configure_backends(FAKE_CUDA)
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "highest"


def test_configure_backends_ampere_enables_tf32(monkeypatch, backend_flags):
    fake_capability(monkeypatch, 8, 0)
    torch.backends.cudnn.benchmark = False
    torch.set_float32_matmul_precision("highest")
    configure_backends(FAKE_CUDA)
    assert torch.backends.cudnn.benchmark and torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"


def test_omp_num_threads_is_read_as_a_positive_count(monkeypatch):
    for value, expected in [("1", 1), (" 4 ", 4), ("0", 0), ("", 0), ("two", 0), ("-1", 0)]:
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert env_threads() == expected, value
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert env_threads() == 0


def test_cpu_threads_are_chosen_and_can_be_set():
    """GPU run: 1 thread; CPU run on <= 2 cores: 1 (bench_threads.py: 2 threads lost 9-11x on a loaded 2-core box);
    more cores: all but one; --set threads=N wins. configure_threads sets torch's count and says so for the log."""
    gpu = types.SimpleNamespace(type="cuda")
    assert choose_threads(0, gpu, cpus=16)[0] == 1
    assert choose_threads(0, CPU, cpus=2)[0] == 1 and choose_threads(0, CPU, cpus=1)[0] == 1
    assert choose_threads(0, CPU, cpus=8)[0] == 7
    assert choose_threads(3, CPU, cpus=2) == (3, "set by threads")
    assert choose_threads(0, CPU, cpus=8, env=1) == (1, "set by OMP_NUM_THREADS")  # the user's OMP_NUM_THREADS holds
    assert choose_threads(3, CPU, cpus=8, env=1)[0] == 3  # ... below --set threads=N
    assert choose_threads(0, gpu, cpus=16, env=4)[0] == 1  # a GPU run keeps 1
    before = torch.get_num_threads()
    try:
        assert configure_threads(2, CPU) == "torch CPU threads 2 (set by threads)" and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fast", [1, 2])
def test_pick_cpu_threads_keeps_the_faster_count(fast):
    """A CPU run measures its generation batch at each thread count and keeps the faster one (here a stand-in whose
    duration depends on torch's thread count), leaving torch set to it."""
    n0 = torch.get_num_threads()
    try:
        def fn():
            time.sleep(0.002 if torch.get_num_threads() == fast else 0.02)
        best, times = pick_cpu_threads(fn, candidates=[1, 2], reps=2)
        assert best == fast and torch.get_num_threads() == fast
        assert set(times) == {1, 2} and times[fast] < times[3 - fast]
    finally:
        torch.set_num_threads(n0)
