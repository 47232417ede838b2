import io
import re
import time

import pytest
import torch

from modules.recipe.utils import (
    Deadline,
    PhaseTimer,
    UsageError,
    check_device,
    format_duration,
    is_out_of_memory,
    parse_duration,
    say,
)


@pytest.mark.parametrize("text,seconds", [
    ("9h", 32400), ("90m", 5400), ("600s", 600), ("8h30m", 30600), ("1h2m3s", 3723), ("3600", 3600), ("12.5", 12.5),
    (" 2m ", 120), ("1.5h", 5400),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "abc", "9x", "h", "-5", "0", "5m3h"])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        parse_duration(text)


def test_format_duration():
    assert format_duration(42.5) == "42.5s"
    assert format_duration(600) == "10m00s"
    assert format_duration(3725) == "1h02m05s"


def test_deadline_counts_down():
    d = Deadline(10, start=time.monotonic() - 4)
    assert 3.9 < d.elapsed() < 5
    assert 5 < d.remaining() < 6.1


def test_phase_timer_accumulates():
    t = PhaseTimer()
    with t.phase("a"):
        time.sleep(0.01)
    with t.phase("a"):
        pass
    assert t.seconds["a"] >= 0.01 and "a" in t.summary()


def test_check_device_cpu():
    assert check_device("cpu").type == "cpu"


def _fake_gpus(monkeypatch, count, name_error=None):
    """torch.cuda as a machine with `count` GPUs would show it (nothing is launched: the tests stop before)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def name(device=None):
        if name_error:
            raise name_error
        return "Tesla T4"
    monkeypatch.setattr(torch.cuda, "get_device_name", name)


@pytest.mark.parametrize("count, want, says", [(2, "cuda:2", "torch sees 2 CUDA GPUs (cuda:0 to cuda:1"),
                                               (1, "cuda:7", "torch sees 1 CUDA GPU (cuda:0")])
def test_check_device_names_the_visible_gpus_for_one_that_does_not_exist(monkeypatch, count, want, says):
    _fake_gpus(monkeypatch, count)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1"[: 2 * count - 1])
    with pytest.raises(UsageError, match=rf"device '{want}' does not exist: {re.escape(says)}; CUDA_VISIBLE_DEVICES=")\
            as info:
        check_device(want)
    assert "\n" not in str(info.value)


def test_check_device_one_line_when_the_gpu_cannot_be_read(monkeypatch):
    _fake_gpus(monkeypatch, 1, name_error=RuntimeError("CUDA error: invalid device ordinal\nCUDA kernel errors ..."))
    with pytest.raises(UsageError, match=r"device 'cuda:0' cannot be opened \(RuntimeError: CUDA error: invalid device "
                                         r"ordinal\)$"):
        check_device("cuda:0")


@pytest.mark.parametrize("exc", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    MemoryError(),
    RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9663676416 bytes."),
    RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported at some other API call"),
    getattr(torch, "AcceleratorError", RuntimeError)("CUDA error: out of memory"),
    RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"),
    getattr(torch.distributed, "DistBackendError", RuntimeError)(
        "NCCL error in: ProcessGroupNCCL.cpp:1970, unhandled cuda error (run with NCCL_DEBUG=INFO for details), NCCL "
        "version 2.18.1\nncclUnhandledCudaError: Call to CUDA function failed.\nLast error:\nCuda failure 'out of memory'"),
])
def test_allocation_failures_are_out_of_memory(exc):
    assert is_out_of_memory(exc)


@pytest.mark.parametrize("exc", [RuntimeError("injected fault at step 0"),
                                 RuntimeError("CUDA error: device-side assert triggered"),
                                 RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED"),
                                 ValueError("memory format not supported")])
def test_other_errors_are_not_out_of_memory(exc):
    assert not is_out_of_memory(exc)


def test_say_drops_a_stream_that_fails_and_never_raises():
    """A write to a closed stream (a reader gone) is dropped, and so is every later one: logging never ends a run."""
    class Broken:
        writes = 0

        def write(self, text):
            Broken.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    stream = Broken()
    say("one", stream)
    say("two", stream)
    assert Broken.writes == 1
    closed = io.StringIO()
    closed.close()
    say("three", closed)  # ValueError: I/O operation on closed file
