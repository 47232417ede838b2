"""modules/run/rank.py: an out-of-memory error in the first training steps said in one line, exit 2, tested on the CPU
with an injected one; later in training it is a crash like any other."""
import pytest
import torch

from conftest import CPU, loop_kwargs, run_loop, tiny_cfg, tiny_data, window_plan
from modules.recipe.train import build_trainer
from modules.recipe.utils import Deadline, is_out_of_memory
from modules.run import rank as run_module
from modules.run.main import main
from modules.run.rank import describe_early_oom


def test_out_of_memory_in_the_first_steps_is_a_usage_error_later_a_crash():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 GB"))
    assert not is_out_of_memory(RuntimeError("injected fault"))
    for at, early in ((1, True), (6, False)):
        torch.manual_seed(0)
        cfg = tiny_cfg(batch_size=4, fault=f"oom@{at}")
        trainer = build_trainer(cfg, tiny_data(), CPU)
        d = Deadline(3600)
        run = lambda: run_loop(trainer, plan=window_plan(d, 600), deadline=d, stop_event=None,  # noqa: E731
                                 **loop_kwargs(cfg, check_every=2, tick_s=1e9, max_steps=10))
        if early:  # the loop re-raises it; run.train names the setting in one line (exit 2, the next test)
            with pytest.raises(torch.cuda.OutOfMemoryError) as info:
                run()
            msg = describe_early_oom(info.value, when=f"in training step {trainer.step_count + 1}", device=CPU,
                                     batch_per_rank=trainer.batch_per_rank, world_size=trainer.world_size)
            assert msg.startswith("out of memory in training step 2 at 4 images per rank on the CPU: set --set "
                                  "batch_size=2 or lower g_ch / d_ch [OutOfMemoryError: ") and "\n" not in msg
        else:  # later in training: a crash like any other, the run ships what it has
            summary = run()
            assert summary.reason == "crashed" and summary.error.startswith("OutOfMemoryError: CUDA out of memory")
            assert summary.steps == 6


def test_early_out_of_memory_on_cuda_names_the_peak_and_the_batch_per_gpu(monkeypatch):
    """The CUDA line (reasoned, not run on a GPU here): the peak torch allocated against the device's total, and for
    several ranks both the global batch and batch_per_gpu to set."""
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 14 * 2**30)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 16 * 10**9}))
    exc = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    cuda = torch.device("cuda", 0)
    msg = describe_early_oom(exc, when="in training step 1", device=cuda, batch_per_rank=32, world_size=2)
    assert msg == ("out of memory in training step 1 at 32 images per rank x 2 ranks (peak 14.00 GiB allocated of "
                   "14.9 GiB on cuda:0): set --set batch_size=32 (or batch_per_gpu=16) or lower g_ch / d_ch "
                   "[OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB]")
    assert describe_early_oom(exc, when="before training", device=cuda).startswith(
        "out of memory before training (peak 14.00 GiB allocated of 14.9 GiB on cuda:0): lower g_ch / d_ch [")


def test_kernel_exits_2_on_an_out_of_memory_error_in_the_first_step(tmp_path, capsys):
    # main() in this process: its Deadline counts from the pytest process's start, so the budget is far above the
    # whole suite's length (the run ends by the injected error at step 0, not by the clock)
    out = tmp_path / "o"
    code = main(["--demo", "--preset", "smoke", "--device", "cpu", "--time-budget", "3h", "--out", str(out),
                 "--set", "fault=oom@0", "--set", "self_check=false", "--set", "n_images=500", "--set", "dev_counts=true"])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith("error: out of memory in training step 1 at 16 images per rank") and "batch_size=8" in err[0]
    assert "Traceback" not in captured.out + captured.err and "shipping" not in captured.out
    assert not out.exists()  # made for this run and left empty: removed again


@pytest.mark.parametrize("where", ["build_trainer", "measure_finish_seconds"])
def test_out_of_memory_before_training_exits_2_in_one_line(tmp_path, capsys, monkeypatch, where):
    """Models too wide for the device fail while they are built, or when the finish is measured (after the output
    folder was made): one line naming the widths, exit 2, no folder left, never a traceback."""
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")

    monkeypatch.setattr(run_module, where, out_of_memory)
    out = tmp_path / "o"
    code = main(["--demo", "--preset", "smoke", "--device", "cpu", "--time-budget", "3h", "--out", str(out),
                 "--set", "self_check=false"])
    captured = capsys.readouterr()
    assert code == 2 and captured.err.strip() == (
        "error: out of memory before training (building the models, measuring the finish) on the CPU: lower g_ch / "
        "d_ch [OutOfMemoryError: CUDA out of memory. Tried to allocate 40.00 GiB]"), captured.err
    assert "Traceback" not in captured.out and not out.exists()
