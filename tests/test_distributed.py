"""Several ranks through torch.distributed, on the CPU with gloo (CI has no GPU): one step on 2 ranks x B/2 equals one
process on the same B samples, no D all-reduce in the G step, --gpus resolution, and the bundled kernel run with 2
ranks forked by itself, under torchrun, inside a real Jupyter kernel, with rank 1 killed, and stopped by SIGTERM."""
import dataclasses
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import types
import zipfile

import numpy as np
import pytest
import torch

from conftest import KERNEL, ROOT, run_kernel
from modules.recipe.config import PRESETS, Config, apply_overrides
from modules.recipe.settings import split_batch
from modules.recipe.train import build_trainer
from modules.recipe.utils import UsageError
from modules.run.distributed import DistContext
from modules.run.distributed import resolve_world_size, torchrun_env

CPU = torch.device("cpu")
B, N_CLASSES = 8, 3
FAST = ["--set", "dev_counts=true", "--set", "n_images=500", "--set", "self_check=false", "--set", "sample_batch=100"]
STEPS = ["--set", "max_steps=8"]  # runs that need not last their budget stop after 8 steps (the suite's time)


# --gpus and the batch split


def test_world_size_resolution(monkeypatch):
    assert resolve_world_size("auto", "cpu") == 1
    assert resolve_world_size("3", "cpu") == 3
    assert resolve_world_size("1", "cuda:0") == 1  # "two" or "0": refused when parsed (test_config)
    with pytest.raises(UsageError):
        resolve_world_size("2", "cuda:1")
    assert split_batch(64, 0, 2) == 32 and split_batch(64, 48, 2) == 48
    with pytest.raises(UsageError):
        split_batch(64, 0, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UsageError, match="MASTER_ADDR and MASTER_PORT not"):  # a partial torchrun environment
        torchrun_env()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(UsageError, match="but MASTER_PORT not"):
        torchrun_env()
    monkeypatch.setenv("MASTER_PORT", "29500")
    ctx = torchrun_env()
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.launcher) == (1, 2, 1, "torchrun")


# one step: 2 ranks x B/2 == 1 process x B


def _cfg():
    # hinge: per-sample losses (RaLS's relativistic averages are per rank); no noise.
    cfg = apply_overrides(Config(), PRESETS["dcgan"], "dcgan")
    return dataclasses.replace(cfg, g_ch=4, d_ch=4, z_dim=8, batch_size=B, loss="hinge", ema=False, real_noise=0.0,
                               hflip=False, lr_g=1e-3, lr_d=1e-3)


def _build(**ranks):
    """A trainer whose BatchNorm layers normalise with their running statistics: per-rank batch statistics differ
    from one batch of B by design, so only without them can 2 ranks x B/2 equal 1 process x B."""
    trainer = build_trainer(_cfg(), _data(), CPU, **ranks)
    for m in (*trainer.G.modules(), *trainer.D.modules()):
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    return trainer


def _inputs():
    """The same B reals, labels and latents for both runs: [reals, y_real, y_fake(D), z(D), y_fake(G), z(G)]."""
    g = torch.Generator().manual_seed(123)
    return [torch.rand(B, 3, 64, 64, generator=g) * 2 - 1, torch.randint(N_CLASSES, (B,), generator=g),
            torch.randint(N_CLASSES, (B,), generator=g), torch.randn(B, 8, generator=g),
            torch.randint(N_CLASSES, (B,), generator=g), torch.randn(B, 8, generator=g)]


def _feed(trainer, inputs, lo, hi):
    """Make the trainer draw rows lo:hi of the fixed inputs instead of random ones."""
    real, y_real, yf_d, z_d, yf_g, z_g = [t[lo:hi] for t in inputs]
    labels, latents = [yf_d, yf_g], [z_d, z_g]
    trainer.batches = types.SimpleNamespace(device=CPU, sample=lambda n: (real, y_real),
                                            fake_labels=lambda n: labels.pop(0))
    trainer._latents = lambda n: latents.pop(0)


def _adam_eps(trainer):
    """Adam's first step is lr * g / (|g| + eps): with the default eps=1e-8 a gradient of 1e-8 moves a weight as far as
    one of 1, so float rounding in tiny gradients would decide the comparison. eps 1e-3 keeps the update ~linear there."""
    for opt in (trainer.opt_g, trainer.opt_d):
        for group in opt.param_groups:
            group["eps"] = 1e-3


def _data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    return types.SimpleNamespace(images=images, labels=np.arange(16) % N_CLASSES,
                                 classes=[f"c{i}" for i in range(N_CLASSES)], reference=images)


def _rank_worker(rank, port, out_dir):
    import torch.distributed as dist

    from modules.run.distributed import DistContext, make_training_group
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, launcher="fork")
    torch.manual_seed(0)
    trainer = _build(rank=rank, world_size=2)
    trainer.set_progress(1.0)
    _adam_eps(trainer)
    trainer.attach_group(make_training_group(ctx, 30.0))
    calls = {"G": 0, "D": 0}

    def counting(name):
        def hook(state, bucket):
            calls[name] += 1
            t = bucket.buffer().div_(2)
            return dist.all_reduce(t, group=trainer.group, async_op=True).get_future().then(lambda f: f.value()[0])
        return hook

    trainer.G_train.register_comm_hook(None, counting("G"))
    trainer.D_train.register_comm_hook(None, counting("D"))
    half = B // 2
    _feed(trainer, _inputs(), rank * half, (rank + 1) * half)
    trainer.step()
    one_step = dict(calls)
    if rank == 0:
        torch.save({"state": trainer.state_dict(), "calls_1": one_step}, os.path.join(out_dir, "rank0.pt"))
    trainer.optim = dataclasses.replace(trainer.optim, d_steps=3)  # D all-reduces must scale with the D steps alone
    inputs = _inputs()
    lo, hi = rank * half, (rank + 1) * half
    real, y_real = inputs[0][lo:hi], inputs[1][lo:hi]
    trainer.batches = types.SimpleNamespace(device=CPU, sample=lambda n: (real, y_real),
                                            fake_labels=lambda n: inputs[2][lo:hi])
    trainer._latents = lambda n: inputs[3][lo:hi]
    trainer.step()
    if rank == 0:
        torch.save({"calls_1": one_step, "calls_2": {k: calls[k] - one_step[k] for k in calls}},
                   os.path.join(out_dir, "calls.pt"))
    dist.destroy_process_group()


def test_two_ranks_step_equals_one_process_and_g_step_skips_d_allreduce(tmp_path):
    from modules.run.distributed import _free_port
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_rank_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    ddp = torch.load(tmp_path / "rank0.pt", weights_only=True)
    calls = torch.load(tmp_path / "calls.pt", weights_only=True)

    torch.manual_seed(0)
    single = _build()
    single.set_progress(1.0)
    _adam_eps(single)
    before = {k: v.clone() for k, v in single.G.state_dict().items()}
    _feed(single, _inputs(), 0, B)
    single.step()
    for net in ("G", "D"):
        a, b = single.state_dict()[net], ddp["state"][net]
        assert a.keys() == b.keys()  # plain state dicts (no DDP "module." prefix): N ranks' checkpoints load on M
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=f"{net}.{k}")
    assert any(not torch.equal(before[k], v) for k, v in single.G.state_dict().items())  # the step did something
    single.load_state_dict(ddp["state"])  # a 2-rank checkpoint resumes in one process

    c1, c3 = calls["calls_1"], calls["calls_2"]
    assert c1["D"] >= 1 and c1["G"] >= 1
    assert c3["D"] == 3 * c1["D"], calls  # one D all-reduce per D step, none in the G step
    assert c3["G"] == c1["G"]


# the bundled kernel with 2 ranks


def _check_run(out, proc, wall, budget_s, n=500):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    zips = [f for f in os.listdir(out) if f.endswith(".zip")]
    assert zips == ["images.zip"], zips
    with zipfile.ZipFile(os.path.join(out, "images.zip")) as z:
        assert z.testzip() is None and len(z.namelist()) == n
    assert wall <= budget_s + 5, wall  # the budget counts from the interpreter's start; +5 s for process teardown
    return json.loads((out / "report.json").read_text())


def _leftovers(marker):
    """Processes whose command line still holds marker (the run's unique output folder)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(marker) in line and "ps -eo" not in line]


def test_kernel_two_forked_ranks(tmp_path):
    out = tmp_path / "out"
    proc, wall = run_kernel(["--demo", "--preset", "smoke", "--device", "cpu", "--gpus", "2", "--out", out,
                             "--time-budget", "90s", *FAST, *STEPS], timeout=300)
    report = _check_run(out, proc, wall, 90)
    assert report["train"]["reason"] == "steps" and report["train"]["total_steps"] == 8
    assert report["ranks"] == {"world_size": 2, "launcher": "fork", "batch_per_rank": 8}
    assert report["train"]["steps"] > 0 and not report["degraded"]
    assert "[rank 1]" not in proc.stdout  # only rank 0 logs
    assert not _leftovers(out)


def test_kernel_under_torchrun(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(KERNEL),
            "--demo", "--preset", "smoke", "--device", "cpu", "--out", str(out), "--time-budget", "90s", *FAST, *STEPS]
    t0 = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
    wall = time.monotonic() - t0
    report = _check_run(out, proc, wall, 90 + 10)  # + torchrun's own start
    assert report["ranks"]["launcher"] == "torchrun" and report["train"]["steps"] > 0


def test_kernel_rank1_killed_ships_from_rank0(tmp_path):
    out = tmp_path / "out"
    proc, wall = run_kernel(["--demo", "--preset", "smoke", "--device", "cpu", "--gpus", "2", "--out", out,
                             "--time-budget", "90s", "--set", "fault=kill@4", *FAST, *STEPS], timeout=300)
    report = _check_run(out, proc, wall, 90)
    assert report["degraded"] and report["train"]["reason"] == "crashed"
    assert report["failed_ranks"] == {"1": "killed by SIGKILL"}, report["failed_ranks"]
    assert "rank(s) [1] ended during training: aborting the process groups" in proc.stdout  # rank 0's watcher
    assert not _leftovers(out)


def test_kernel_sigterm_stops_every_rank(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(KERNEL), "--demo", "--preset", "smoke", "--device", "cpu", "--gpus", "2", "--out",
            str(out), "--time-budget", "90s", *FAST]
    t0 = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "training started" in line:
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=200)[0]
    wall = time.monotonic() - t0
    result = types.SimpleNamespace(returncode=proc.returncode, stdout="".join(lines) + rest, stderr="")
    report = _check_run(out, result, wall, 90)
    assert report["train"]["reason"] == "interrupted" and not report["degraded"], report["train"]
    assert not _leftovers(out)


def test_kernel_in_a_jupyter_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    argv = ["kernel.py", "--demo", "--preset", "smoke", "--device", "cpu", "--gpus", "2", "--out", str(out),
            "--time-budget", "90s", *FAST, *STEPS]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(f"import sys\nsys.argv = {argv!r}"),
                nbformat.v4.new_code_cell(KERNEL.read_text())]  # the cell is kernel.py, as on Kaggle
    t0 = time.monotonic()
    nbclient.NotebookClient(nb, timeout=280, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
                            ).execute()
    wall = time.monotonic() - t0
    text = "".join(o.get("text", "") for o in nb.cells[1].outputs)
    result = types.SimpleNamespace(returncode=0, stdout=text, stderr="")
    report = _check_run(out, result, wall, 90 + 15)  # + the Jupyter kernel's start
    assert report["ranks"]["launcher"] == "fork" and report["train"]["steps"] > 0, text[-2000:]
    assert not _leftovers(out)


@pytest.fixture(autouse=True)
def _no_torchrun_env(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)


def test_workers_that_cannot_start_fall_back_to_one_process(monkeypatch, capsys):
    """The rendezvous port is taken: rank 0 warns and the run goes on as one process (init_group -> False)."""
    import socket

    import torch.distributed as dist

    from modules.run.distributed import DistContext, init_group
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(busy.getsockname()[1]))
        t0 = time.monotonic()
        assert init_group(DistContext(rank=0, world_size=2, launcher="fork"), backend="gloo", remaining_s=600) is False
    assert time.monotonic() - t0 < 30 and not dist.is_initialized()
    assert "could not start" in capsys.readouterr().out


# buffers, the dead-rank watcher, the NCCL environment


def _buffers_worker(rank, port, out_dir):
    import torch.distributed as dist

    from modules.run.distributed import DistContext
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ctx = DistContext(rank=rank, world_size=2, launcher="fork", group=dist.group.WORLD)
    torch.manual_seed(rank)  # different buffers on each rank
    nets = [torch.nn.Sequential(*[torch.nn.BatchNorm2d(4) for _ in range(20)]), torch.nn.BatchNorm1d(3)]
    for m in nets[0].modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(1, 2)
            m.num_batches_tracked.fill_(10 + rank)  # int64: a dtype of its own
    calls = []
    real = dist.broadcast
    dist.broadcast = lambda t, *a, **k: calls.append(t.dtype) or real(t, *a, **k)
    ctx.sync_buffers(nets)
    dist.broadcast = real
    torch.save({"buffers": [b.clone() for n in nets for b in n.buffers()], "calls": len(calls)},
               os.path.join(out_dir, f"buffers{rank}.pt"))
    dist.destroy_process_group()


def test_sync_buffers_one_broadcast_per_dtype_and_equal_after(tmp_path):
    from modules.run.distributed import _free_port
    port = _free_port()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_buffers_worker, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"buffers{r}.pt", weights_only=True) for r in range(2))
    assert len(r0["buffers"]) == 63 and r0["calls"] == r1["calls"] == 2  # float32 and int64
    for a, b in zip(r0["buffers"], r1["buffers"]):
        assert torch.equal(a, b)
    assert int(r1["buffers"][2]) == 10  # rank 0's num_batches_tracked


def test_training_timeout_outlasts_a_checkpoint_within_half_the_finish_reserve():
    from modules.run.distributed import training_timeout
    assert training_timeout(600.0, 2.0) == 11.0  # 3 checkpoints + 5 s
    assert training_timeout(600.0, 100.0) == 120.0  # never above DIST_TIMEOUT_MAX_S
    assert training_timeout(30.0, 20.0) == 15.0  # half the finish reserve
    assert training_timeout(4.0, 0.0) == 10.0  # never below DIST_TIMEOUT_MIN_S


def test_nccl_error_env_per_torch_version(monkeypatch):
    """Async error handling (2: abort the communicators, keep the process) without blocking wait, under the names the
    running torch reads: NCCL_* before 2.2, TORCH_NCCL_* from 2.2; init_group sets them before the group exists."""
    import torch.distributed as dist

    from modules.run.distributed import DistContext, init_group, nccl_error_env
    assert nccl_error_env("2.1.2+cu121") == {"NCCL_ASYNC_ERROR_HANDLING": "2", "NCCL_BLOCKING_WAIT": "0"}
    want = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2", "TORCH_NCCL_BLOCKING_WAIT": "0"}
    assert nccl_error_env("2.2.0") == nccl_error_env("2.14.1") == nccl_error_env("3.0.0a0") == want
    for prefix in ("NCCL_", "TORCH_NCCL_"):
        for k in ("ASYNC_ERROR_HANDLING", "BLOCKING_WAIT"):
            monkeypatch.setenv(prefix + k, "1")  # restored after the test
    monkeypatch.setattr(torch, "__version__", "2.1.2+cu121")

    def no_group(*a, **k):
        raise RuntimeError("no NCCL here")
    monkeypatch.setattr(dist, "init_process_group", no_group)
    assert init_group(DistContext(rank=0, world_size=2, launcher="torchrun"), backend="nccl", remaining_s=100) is False
    assert os.environ["NCCL_ASYNC_ERROR_HANDLING"] == "2" and os.environ["NCCL_BLOCKING_WAIT"] == "0"


def _exit_at_once(code):
    os._exit(code)


def test_watcher_notices_a_dead_worker_and_aborts(monkeypatch):
    """Rank 0's watcher: a worker killed mid-training is noticed within a poll and the abort path runs once."""
    import threading

    from modules.run import distributed
    from modules.run.distributed import DistContext, watch_workers
    proc = multiprocessing.get_context("fork").Process(target=_exit_at_once, args=(3,))
    ctx = DistContext(rank=0, world_size=2, launcher="fork", workers=[proc])
    aborted, calls = threading.Event(), []
    t0 = time.monotonic()
    monkeypatch.setattr(distributed, "abort_groups", lambda c: calls.append(c) or aborted.set())
    watch_workers(ctx)
    proc.start()
    assert aborted.wait(30), "the watcher never noticed the dead worker"
    assert time.monotonic() - t0 < 5 and calls == [ctx] and ctx.broken == "rank(s) [1] ended"
    ctx.watch.set()


def test_rank_device_set_before_cuda_is_touched(monkeypatch):
    """Every rank of a CUDA run makes cuda:LOCAL_RANK its current device first; a rank that cannot: one line."""
    from modules.run.distributed import DistContext
    from modules.run.distributed import rank_device
    seen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: seen.append(i))
    assert rank_device(DistContext(rank=1, world_size=2, local_rank=1, launcher="fork"), "cuda") == "cuda:1"
    assert rank_device(DistContext(), "cuda") == "cuda" and seen == [1]

    def missing(i):
        raise RuntimeError("CUDA error: invalid device ordinal")
    monkeypatch.setattr(torch.cuda, "set_device", missing)
    with pytest.raises(UsageError, match="rank 3 cannot use cuda:3"):
        rank_device(DistContext(rank=3, world_size=4, local_rank=3, launcher="torchrun"), "cuda")


def test_kernel_worker_dead_at_start_falls_back_in_seconds(tmp_path):
    """A forked worker that dies before the group forms (e.g. CUDA unusable after the fork): rank 0 sees its process
    end and runs alone at once, instead of waiting the rendezvous timeout (300 s with this budget)."""
    out = tmp_path / "out"
    script = tmp_path / "dies.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(ROOT)!r})\nimport modules.run.main as m\n"
                      "m.worker_main = lambda ctx, setup: os._exit(1)\nsys.exit(m.main())\n")
    proc, wall = run_kernel(["--demo", "--preset", "smoke", "--device", "cpu", "--gpus", "2", "--out", out,
                             "--time-budget", "20m", *FAST, *STEPS], timeout=240, script=script)
    assert "could not start (RuntimeError: rank(s) [1] ended before the group formed)" in proc.stdout, proc.stdout
    report = _check_run(out, proc, wall, 1200)
    assert wall < 150 and report["train"]["reason"] == "steps" and not report.get("ranks"), (wall, report["train"])
    assert any("distributed start failed" in w for w in report["warnings"])


def test_kernel_torchrun_env_without_peers(tmp_path):
    """A partial torchrun environment: a missing MASTER_* is one line, exit 2; rank 0 whose peers never come runs
    alone after a wait bounded by the budget; rank 1 without its rank 0 ends with one line, exit 2."""
    from modules.run.distributed import _free_port
    base = ["--demo", "--preset", "smoke", "--device", "cpu", *FAST, *STEPS]
    proc, _ = run_kernel([*base, "--out", tmp_path / "a"], env={"RANK": "1", "WORLD_SIZE": "2"}, timeout=120)
    assert proc.returncode == 2 and "MASTER_ADDR and MASTER_PORT not" in proc.stderr and "Traceback" not in proc.stderr
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    out = tmp_path / "b"
    proc, wall = run_kernel([*base, "--out", out, "--time-budget", "60s"], env=env, timeout=200)
    assert "could not start" in proc.stdout and "Traceback" not in proc.stdout + proc.stderr, proc.stdout[-3000:]
    _check_run(out, proc, wall, 60)
    env["RANK"] = "1"
    proc, wall = run_kernel([*base, "--out", tmp_path / "c", "--time-budget", "60s"], env=env, timeout=200)
    assert proc.returncode == 2 and "error: rank 1 could not join the 2 ranks" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "frame #" not in proc.stderr and wall < 60


def test_no_fork_after_an_earlier_cell_initialised_the_cuda_driver(monkeypatch, capsys):
    """torch.cuda.is_initialized() stays False after a non-NVML is_available(), but the driver is up (cuInit):
    libcuda's cuCtxGetCurrent tells, and the kernel runs one process instead of forking children that would fail."""
    import ctypes

    from modules.run import distributed
    answer = {"code": 3}

    class FakeLibcuda:
        def cuCtxGetCurrent(self, ptr):
            return answer["code"]

    def fake_cdll(name, *a, **k):
        if name != "libcuda.so.1":
            raise AssertionError(name)
        if answer["code"] is None:
            raise OSError("libcuda.so.1: cannot open shared object file")
        return FakeLibcuda()
    monkeypatch.setattr(ctypes, "CDLL", fake_cdll)
    assert distributed.cuda_driver_initialised() is False  # 3 = CUDA_ERROR_NOT_INITIALIZED
    answer["code"] = None
    assert distributed.cuda_driver_initialised() is False  # no libcuda: no CUDA at all
    answer["code"] = 0
    assert distributed.cuda_driver_initialised() is True
    forked = []
    ctx = distributed.fork_workers(2, forked.append, cuda=True)
    assert (ctx.world_size, ctx.workers, forked) == (1, [], [])
    assert "CUDA is already initialised in this process" in capsys.readouterr().out


def test_one_rank_collectives_return_local_values():
    """The loop's single path: with one rank no group exists and every collective is the identity."""
    ctx = DistContext()
    assert not ctx.distributed and ctx.is_main
    assert ctx.agree(stop="budget", progress=0.25, interval=7, device=torch.device("cpu"), interrupted=False) == (
        "budget", 0.25, 7)
    box = {"plan": 1}
    assert ctx.broadcast(box) is box and ctx.dead_workers() == []
    ctx.sync_buffers([torch.nn.BatchNorm1d(2)])  # nothing to send, nothing raised
    assert ctx.mark_broken("a failure") == "" and ctx.broken == ""  # nothing to break alone
