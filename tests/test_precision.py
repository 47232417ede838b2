import contextlib

import pytest
import torch

from conftest import CPU
from modules.precision import resolve_amp
from modules.utils import UsageError


def test_amp_off_on_cpu():
    assert resolve_amp("auto", CPU) is None


def test_amp_forced_on_the_cpu():
    """amp=fp16 / bf16 force that autocast dtype on the CPU too (issue 18); off is fp32 everywhere."""
    assert resolve_amp("off", CPU) is None
    assert resolve_amp("fp16", CPU) == torch.float16 and resolve_amp("bf16", CPU) == torch.bfloat16


def test_forced_amp_refused_in_one_line_by_a_torch_without_it(monkeypatch):
    """torch 2.1/2.2 have no torch.amp.GradScaler("cpu"); an old CPU autocast falls back to fp32 with a warning."""
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    with pytest.raises(UsageError, match=r"amp=fp16 cannot be used on cpu .*GradScaler.*use amp=auto or amp=off"):
        resolve_amp("fp16", CPU)
    monkeypatch.undo()
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # autocast that does nothing
    with pytest.raises(UsageError, match=r"amp=bf16 .*does not compute in torch.bfloat16") as info:
        resolve_amp("bf16", CPU)
    assert "\n" not in str(info.value)
