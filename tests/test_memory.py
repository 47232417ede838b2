"""modules/memory.py: the memory a setting needs, checked before training (issue 19 defect 6), and an out-of-memory
error in the first training steps said in one line, exit 2 (issue 18 part 2), tested on the CPU with an injected one."""
import dataclasses

import pytest
import torch

from conftest import CPU, loop_kwargs, run_loop, tiny_cfg, tiny_data, window_plan
from modules.config import PRESETS, Config, apply_overrides
from modules.main import main
from modules.memory import GIB, build_memory_estimate, check_memory, describe_early_oom
from modules.utils import is_out_of_memory
from modules.models import build_models, count_params
from modules.train import build_trainer
from modules.utils import Deadline, UsageError


def test_parameters_are_counted_exactly_at_widths_never_built():
    cfg = apply_overrides(Config(), {"g_ch": 32, "d_ch": 40}, "test")  # fitted from widths 8, 16, 24
    est = build_memory_estimate(cfg, batch_per_rank=64, n_classes=120, n_crops=1000)
    G, D = build_models(cfg, 120)
    assert est.params == count_params(G) + count_params(D)
    assert est.state >= 28 * est.params and est.crops == 1000 * 64 * 64 * 3


def test_activations_scale_with_the_batches():
    cfg = tiny_cfg()
    small = build_memory_estimate(cfg, batch_per_rank=16, n_classes=6, n_crops=0)
    big = build_memory_estimate(dataclasses.replace(cfg, sample_batch=10000), batch_per_rank=64, n_classes=6, n_crops=0)
    assert big.train == pytest.approx(4 * small.train, rel=1e-6) and big.state == small.state
    assert big.generate > 10 * GIB  # issue 19: the smoke demo's sample_batch=10000 went to 19 GB resident
    assert small.generate < 0.2 * GIB


def test_check_memory_passes_lowers_the_generation_batch_or_refuses(capsys):
    est = build_memory_estimate(dataclasses.replace(tiny_cfg(), sample_batch=10000), batch_per_rank=16, n_classes=6,
                                n_crops=0)
    assert check_memory(est, available=None, where="the host") == 10000  # unknown: not checked, said so
    assert check_memory(est, available=400 * GIB, where="the host") == 10000
    lowered = check_memory(est, available=8 * GIB, where="the host")
    assert 1 <= lowered < 10000 and lowered * est.generate_per_image <= 4 * GIB
    out = capsys.readouterr().out
    assert "WARNING: sample_batch=10000 would need" in out and f"generating {lowered} at a time" in out
    big_batch = dataclasses.replace(est, batch_per_rank=8192)
    with pytest.raises(UsageError, match=r"a training step at 8192 images per rank needs .* set --set batch_size=\d+"):
        check_memory(big_batch, available=8 * GIB, where="cuda:0")
    with pytest.raises(UsageError, match=r"\(or batch_per_gpu=\d+\)"):
        check_memory(big_batch, available=8 * GIB, where="cuda:0", world=2)
    with pytest.raises(UsageError, match="the models alone .* lower g_ch / d_ch"):
        check_memory(dataclasses.replace(est, state=9 * GIB), available=8 * GIB, where="cuda:0")


def test_widths_that_cannot_fit_exit_2_before_the_data(tmp_path, capsys):
    code = main(["--demo", "--preset", "smoke", "--device", "cpu", "--set", "g_ch=1024", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "lower g_ch / d_ch" in err[0] and "on the host" in err[0]
    assert not (tmp_path / "o").exists()


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
            msg = describe_early_oom(info.value, step=trainer.step_count + 1, batch_per_rank=trainer.batch_per_rank,
                                     world_size=trainer.world_size, device=trainer.device)
            assert msg.startswith("out of memory in training step 2 at 4 images per rank (") and "\n" not in msg
            assert "GiB free on the host now" in msg and "set --set batch_size=2" in msg and "OutOfMemoryError" in msg
        else:  # later in training: a crash like any other, the run ships what it has
            summary = run()
            assert summary.reason == "crashed" and summary.error.startswith("OutOfMemoryError: CUDA out of memory")
            assert summary.steps == 6


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
