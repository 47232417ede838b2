import contextlib
import types

import pytest
import torch

from conftest import CPU
from modules.recipe.device import resolve_amp
from modules.recipe.utils import UsageError


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


@pytest.mark.parametrize("cap", [(7, 5), (6, 0)])  # T4, P100
def test_forced_bf16_refused_below_sm80(monkeypatch, cap):
    """A recent torch calls bf16 supported on a T4 (emulated) and the autocast test passes there; the kernel refuses it
    in one line, as it refuses a dtype that cannot run. fp16 (what auto picks there) is not refused by this check."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    fake_cuda = types.SimpleNamespace(type="cuda", index=0)
    with pytest.raises(UsageError, match=rf"amp=bf16 cannot be used on cuda .*sm_{cap[0]}{cap[1]} has no bf16 tensor "
                                         r"cores \(sm_80\+\).*use amp=auto or amp=off") as info:
        resolve_amp("bf16", fake_cuda)
    assert "\n" not in str(info.value)
    assert resolve_amp("auto", fake_cuda) == torch.float16
