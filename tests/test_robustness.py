"""Nothing lost (issue 6): faults injected into the bundled kernel.py must still leave a verified images.zip, a report,
and a checkpoint that a later run can carry on from; user-fixable problems end with one line and exit code 2; no
budget is overrun, even with three kernels sharing 2 cores.

Every run uses the smoke preset at a lower cost (CHEAP: no attention, a narrower G, small sample batches, so that
10,000 images take ~10 s on one core); n_images stays 10,000. The budget runs (90, 180 and 300 s at once) start with
the module and run beside the other tests; test_budgets_hold_under_contention, last, collects them.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import warnings

import numpy as np
import pytest
import torch

from conftest import CPU, KERNEL, ROOT, loop_kwargs, run_kernel, run_loop, tiny_cfg, tiny_data, window_plan
from modules.recipe.sample import Sampler
from modules.recipe.train import build_trainer
from modules.recipe.utils import Deadline, UsageError
from modules.run.budget import measure_finish_seconds
from modules.run.checkpoint import Resumed, save_checkpoint
from modules.run.rank import fault_hook
from modules.run.submission import verify_zip

# One torch thread per kernel: with two, the OpenMP threads of processes sharing 2 cores spin-wait on each other and
# each process runs 3-4x slower at random moments (a property of a shared test box, not of Kaggle's GPU run).
ENV = {"OMP_NUM_THREADS": "1"}
CHEAP = ["--demo", "--preset", "smoke", "--set", "attention=false", "--set", "g_ch=2", "--set", "sample_batch=25"]
NO_CHECK = ["--set", "self_check=false"]
# Runs that end by themselves (an injected fault, a signal) get budgets far above their length: the budget only has to
# keep training going until the fault or the signal. On a loaded box the finish reserve, measured and then re-timed
# while the budget runs share the cores, grew to most of a 180 s budget (CI: 13.6 s of training, no step 40).
FAULT_BUDGET = 600
# The resumed run writes 2,000 images (a fifth of the finish). The SIGTERM run writes all 10,000 (issue 19): before the
# PNGs were encoded while generating, they took 21.4 s to generate and 6.9 s to zip on CI, 30.1 s after the SIGTERM.
FEWER = ["--set", "n_images=2000", "--set", "dev_counts=true"]


class _Kernel:
    """`python kernel.py ARGS` started in the background, stdout+stderr to log_path; a thread notes the moment it exits,
    so that its wall time is right however late a test looks."""

    def __init__(self, args, log_path):
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.t0 = time.monotonic()
            self.proc = subprocess.Popen([sys.executable, str(KERNEL), *map(str, args)], stdout=log,
                                         stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1", **ENV})
        self.t_exit = None
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self):
        self.proc.wait()
        self.t_exit = time.monotonic()

    def log(self):
        return self.log_path.read_text()

    def wait_for(self, text, timeout):
        """Wait until the log holds text; a kernel that refused its budget up front skips the test."""
        deadline = time.monotonic() + timeout
        while text not in self.log():
            if self.proc.poll() is not None:
                _skip_if_refused(self.proc.returncode, self.log())
                raise AssertionError(f"kernel exited before {text!r}:\n{self.log()[-3000:]}")
            assert time.monotonic() < deadline, f"no {text!r} within {timeout}s:\n{self.log()[-3000:]}"
            time.sleep(0.05)

    def wait(self, timeout):
        """-> seconds from start to exit, measured from outside."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"kernel still running after {timeout}s:\n{self.log()[-3000:]}") from None
        while self.t_exit is None:
            time.sleep(0.01)
        return self.t_exit - self.t0

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _skip_if_refused(code, text):
    """A box so loaded that the kernel refuses the budget up front cannot exercise a fault: skip, do not fail."""
    if code == 2 and "is too small" in text:
        pytest.skip(f"machine too loaded for this budget: {text.strip().splitlines()[-1]}")


def _report(out):
    return json.loads((out / "report.json").read_text())


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _one_line_error(proc, *needles):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


# runs shared by several tests


@pytest.fixture(scope="module", autouse=True)
def budget_runs(tmp_path_factory):
    """Three kernels at once with budgets of 90, 180 and 300 s (the 300 s one with its self-check on), started with the
    module so that they run beside the other tests: -> {budget: (out, _Kernel)}."""
    runs = {}
    for budget in (90, 180, 300):  # 60/120 s: this machine's finish under this contention measured 1m32s/2m23s
        out = tmp_path_factory.mktemp(f"budget{budget}")
        args = [*CHEAP, "--time-budget", f"{budget}s", "--out", out] + (NO_CHECK if budget < 300 else [])
        runs[budget] = out, _Kernel(args, out.parent / f"{out.name}.log")
    yield runs
    for _, kernel in runs.values():
        kernel.kill()


@pytest.fixture(scope="module")
def fault_run(tmp_path_factory):
    """NaN losses at step 12 (rolled back to step 0), then an exception at step 40. The run ends at the raise, long
    before its budget; the budget is large only so that the training window holds 40 steps even when the finish reserve
    is measured and re-timed while the three budget runs share the cores (CI saw 0.7 s of training in a 90 s budget and
    13.6 s in a 180 s one)."""
    out = tmp_path_factory.mktemp("faults")
    proc, wall = run_kernel([*CHEAP, *NO_CHECK, "--time-budget", f"{FAULT_BUDGET}s", "--out", out,
                             "--set", "fault=nan@12,raise@40"], timeout=FAULT_BUDGET + 90, env=ENV)
    _skip_if_refused(proc.returncode, proc.stderr)
    return out, proc, wall


@pytest.fixture(scope="module")
def interrupted_run(tmp_path_factory):
    """SIGTERM 2 s into training -> (out, returncode, seconds from the signal to the exit, log text), with the full
    10,000 images: schedulers give 10-30 s between SIGTERM and SIGKILL, so that finish must fit 30 s (issue 19). Since
    the PNGs are encoded while generating, the finish reserve is ~1.25 x the generation (~20-40 s on a loaded CI box):
    a 90 s budget is still training at the signal (75 s was refused here with four other kernels beside it)."""
    out = tmp_path_factory.mktemp("sigterm")
    kernel = _Kernel([*CHEAP, *NO_CHECK, "--time-budget", "90s", "--out", out], out.parent / f"{out.name}.log")
    kernel.wait_for("training started", timeout=60)
    time.sleep(2.0)
    t_signal = time.monotonic()
    kernel.proc.send_signal(signal.SIGTERM)
    kernel.wait(timeout=120)
    return out, kernel.proc.returncode, kernel.t_exit - t_signal, kernel.log()


# Order: while the three budget runs share the cores (the first ~2 minutes), the tests whose runs end by themselves; the
# interrupt tests, which time the finish after a signal, come when only the 300 s run is left beside them.


# faults in training


def test_nan_is_rolled_back_and_training_goes_on(fault_run):
    out, proc, wall = fault_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # found at the first host sync after step 12: step 20 at check_every 10, earlier when slow steps shorten the interval
    found = re.search(r"non-finite losses by step (\d+): rolled back to step 0", proc.stdout)
    assert found and 13 <= int(found.group(1)) <= 20, proc.stdout[-3000:]
    verify_zip(out / "images.zip", n_expected=10000)
    train = _report(out)["train"]
    assert train["rollbacks"] == 1 and train["total_steps"] == 40  # back to 0, then on to the raise at step 40
    assert wall <= FAULT_BUDGET, wall


def test_exception_ships_a_degraded_run(fault_run):
    out, proc, _ = fault_run
    assert proc.returncode == 0 and "training crashed at step 40 (RuntimeError: injected fault" in proc.stdout
    report = _report(out)
    assert report["degraded"] is True and report["train"]["reason"] == "crashed"
    assert any("injected fault" in w for w in report["warnings"])
    assert report["zip"] == str(out / "images.zip")
    ckpt = Resumed.read(str(out / "checkpoint.pt"), arch={}).payload  # written after the crash as well
    assert ckpt["trainer"]["step"] == 40 and not ckpt["complete"]


def test_bad_checkpoints_exit_2(fault_run, tmp_path):
    """A truncated file, garbage, a checkpoint of another architecture, one that loads but carries wrong-typed or
    absurd fields (issue 19), and a FIFO: one line each, exit 2, before the data, no output folder left."""
    ckpt = fault_run[0] / "checkpoint.pt"
    (tmp_path / "truncated.pt").write_bytes(ckpt.read_bytes()[:50000])
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint\n" * 100)
    good = torch.load(ckpt, map_location="cpu", weights_only=True)
    torch.save({**good, "train_seconds": "12"}, tmp_path / "str_seconds.pt")  # the other fields: test_checkpoint.py
    os.mkfifo(tmp_path / "fifo.pt")
    cases = {"fifo": (["--resume", tmp_path / "fifo.pt"], "is a FIFO"),
             "str_seconds": (["--resume", tmp_path / "str_seconds.pt"], "damaged checkpoint: train_seconds is '12'"),
             "truncated": (["--resume", tmp_path / "truncated.pt"], "not a readable checkpoint"),
             "garbage": (["--resume", tmp_path / "garbage.pt"], "not a readable checkpoint"),
             "other_arch": (["--resume", ckpt, "--preset", "dcgan,smoke"], "arch='biggan'"),
             "other_width": (["--resume", ckpt, "--set", "g_ch=8"], "g_ch=2"),
             "missing": (["--resume", tmp_path / "nope.pt"], "no such file")}
    procs = {name: subprocess.Popen([sys.executable, str(KERNEL), *map(str, [*CHEAP[:3], *args, "--out",
                                                                             tmp_path / name])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                    env={**os.environ, **ENV})
             for name, (args, _) in cases.items()}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)  # 9 kernels importing torch at once on a loaded box
        _one_line_error(types.SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr),
                        "--resume", cases[name][1])
        assert not (tmp_path / name).exists(), name  # refused before the output folder is made
        assert "data:" not in stdout, name  # and before the data is read


# the zip and the output folder


def test_failed_zip_write_keeps_the_old_zip(fault_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(fault_run[0] / "images.zip", out / "images.zip")
    old = _sha(out / "images.zip")
    proc, wall = run_kernel([*CHEAP, *NO_CHECK, "--time-budget", f"{FAULT_BUDGET}s", "--out", out, "--set",
                             "fault=raise@5,zipfail"], timeout=FAULT_BUDGET + 90, env=ENV)  # crash at step 5: ends soon
    _skip_if_refused(proc.returncode, proc.stderr)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no valid images.zip" in lines[0] and str(out / "images.zip") in lines[0]
    assert _sha(out / "images.zip") == old and not list(out.glob("images.zip.tmp*"))
    verify_zip(out / "images.zip", n_expected=10000)
    report = _report(out)
    assert report["degraded"] is True and report["zip"] is None
    assert (out / "checkpoint.pt").exists() and wall <= FAULT_BUDGET


def test_unwritable_output_exits_2_naming_the_path(tmp_path):
    """Found before the data is read, not after hours of training: one line naming the path, exit 2."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.access(read_only, os.W_OK):  # root writes anywhere: use a folder the kernel refuses even root
        read_only = "/sys"
    zip_dir = tmp_path / "zip_is_a_dir"
    (zip_dir / "images.zip").mkdir(parents=True)
    cases = [(a_file, "is a file"), (a_file / "sub", "cannot create"), (read_only, "cannot write"),
             (zip_dir, "images.zip")]
    for out, needle in cases:
        proc, wall = run_kernel([*CHEAP, "--out", out], timeout=60, env=ENV)
        _one_line_error(proc, out, needle)
        assert wall < 30 and "demo: synthetic dataset" not in proc.stdout


# pieces, in process


@pytest.fixture
def one_thread():
    """In-process tests on one torch thread (see ENV)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_trainer(**kw):
    cfg = tiny_cfg(**{"batch_size": 4, "attention": False, **kw})
    data = tiny_data()
    data.classes = ["a", "b", "c"]
    torch.manual_seed(0)
    return build_trainer(cfg, data, CPU)


def _loop(trainer, d, seconds, stop_event, **kw):
    return run_loop(trainer, plan=window_plan(d, seconds), deadline=d, stop_event=stop_event,
                      **loop_kwargs(tiny_cfg(), **kw))


def _finite(trainer):
    tensors = [t for m in (trainer.G, trainer.generator_to_ship()) for t in m.state_dict().values()]
    return all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def _stop_at(trainer, step, stop_event):
    """Make the trainer set stop_event once it reaches `step`: runs that end by step count, not by the clock."""
    inner = trainer.step

    def step_then_maybe_stop():
        inner()
        if trainer.step_count >= step:
            stop_event.set()

    trainer.step = step_then_maybe_stop


def test_nan_after_the_last_check_never_ships(one_thread):
    """NaN in the steps after the last sync: caught on the way out and rolled back before anything ships."""
    trainer, ev, d = _tiny_trainer(), threading.Event(), Deadline(3600)
    step = trainer.step

    def step_then_interrupt():  # a notebook's interrupt at step 6, between two host syncs
        step()
        if trainer.step_count == 6:
            raise KeyboardInterrupt

    trainer.step = step_then_interrupt
    summary = _loop(trainer, d, 600, ev, check_every=10 ** 6, snapshot_every=10 ** 6, tick_s=1e9,
                    before_step=fault_hook("nan@3", rank=0))
    assert summary.reason == "interrupted" and summary.total_steps == 0 and summary.rollbacks == 1
    assert _finite(trainer)


def test_checkpoints_hold_checked_state_only(one_thread):
    """A periodic checkpoint is written only right after a clean finite check: never with NaN weights in it."""
    trainer, ev, d = _tiny_trainer(), threading.Event(), Deadline(3600)
    _stop_at(trainer, 20, ev)
    seen = []

    def checkpoint(train_seconds, plan_seconds, complete):
        seen.append((trainer.step_count, _finite(trainer)))

    summary = _loop(trainer, d, 600, ev, check_every=5, snapshot_every=5, tick_s=1e9, checkpoint_fn=checkpoint,
                    checkpoint_s=1e-9, before_step=fault_hook("nan@7", rank=0))
    assert summary.rollbacks == 1 and len(seen) > 3 and all(ok for _, ok in seen), seen


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch, one_thread):
    trainer = _tiny_trainer()
    path = tmp_path / "checkpoint.pt"
    kw = dict(config={"arch": "biggan"}, train_seconds=1.0, n_classes=3, classes=["a", "b", "c"])
    save_checkpoint(str(path), trainer, **kw)
    old = _sha(path)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        with pytest.raises(OSError):
            save_checkpoint(str(path), trainer, **kw)
    assert _sha(path) == old and not (tmp_path / "checkpoint.pt.tmp").exists()
    assert Resumed.read(str(path), arch={"arch": "biggan"}).payload["train_seconds"] == 1.0
    with pytest.raises(UsageError, match="arch='biggan', this run 'dcgan'"):
        Resumed.read(str(path), arch={"arch": "dcgan"})


class _FakeExtractor:
    """Stands in for the Inception extractor: random 2048-d features."""
    dim, device = 2048, "cpu"

    def features_and_logits(self, images):
        return np.random.default_rng(0).random((len(images), self.dim), dtype=np.float32), None


def test_reserve_covers_the_frechet_sqrtm(one_thread):
    """With Inception weights the self-check estimate adds the features and the dim^3 sqrtm (~10-60 s on 2 cores) to the
    pixel copy check's; without them the copy check alone is measured."""
    trainer = _tiny_trainer()
    crops = np.random.default_rng(0).integers(0, 256, (64, 64, 64, 3), dtype=np.uint8)
    est = {}
    for fid in (True, False):
        sampler = Sampler(model=trainer.generator_to_ship, z_dim=trainer.z_dim, truncation=2.0, label_counts=np.ones(3),
                          amp_dtype=None, device=torch.device("cpu"), batch=16)
        est[fid], info = measure_finish_seconds(
            sampler, n_images=1000, workers=1, disk_bytes_per_s=1e8, checkpoint_state=trainer.state_dict(),
            self_check=True, extractor=_FakeExtractor() if fid else None, n_reference=100, crops=crops)
    assert est[True]["self_check"] - est[False]["self_check"] > 2.0, est  # (2048/512)^3 x a 512 sqrtm
    assert 0 < est[False]["self_check"] and set(est[False]) == {"generate", "zip", "checkpoint", "self_check"}
    assert info["batch"] == 16 and info["zip_bytes"] > 1000 * 1000 and info["checkpoint_bytes"] > 0


def test_keyboard_interrupt_in_the_loop_is_an_interrupt(one_thread):
    """In a notebook an interrupt may come as a KeyboardInterrupt inside training: it stops and ships like a signal."""
    trainer = _tiny_trainer()
    step = trainer.step

    def step_then_interrupt():
        step()
        if trainer.step_count == 3:
            raise KeyboardInterrupt

    trainer.step = step_then_interrupt
    ev, d = threading.Event(), Deadline(3600)
    summary = _loop(trainer, d, 60, ev, check_every=2, tick_s=1e9)
    assert summary.reason == "interrupted" and summary.total_steps == 3 and ev.is_set()


# interrupts and resume


def test_sigterm_ships_a_zip_within_30s(interrupted_run):
    out, code, after_signal, log = interrupted_run
    assert code == 0, log[-3000:]
    assert "SIGTERM: stopping training" in log and "training stopped (interrupted: SIGTERM)" in log
    print(f"SIGTERM -> exit {code} after {after_signal:.1f}s")
    assert after_signal <= 30, f"{after_signal:.1f}s from SIGTERM to exit"
    verify_zip(out / "images.zip", n_expected=10000)
    assert _report(out)["train"]["reason"] == "interrupted"
    ckpt = Resumed.read(str(out / "checkpoint.pt"), arch={})
    assert not ckpt.complete  # the checkpoint after an interrupt


def test_second_signal_exits_at_once(tmp_path):
    # 300 s: the run ends at the second signal; the budget only keeps it training until the first one
    kernel = _Kernel([*CHEAP, *NO_CHECK, "--time-budget", "300s", "--out", tmp_path / "out"], tmp_path / "log")
    kernel.wait_for("training started", timeout=60)
    kernel.proc.send_signal(signal.SIGINT)
    kernel.wait_for("SIGINT: stopping training", timeout=30)
    t_signal = time.monotonic()
    kernel.proc.send_signal(signal.SIGTERM)
    kernel.wait(timeout=30)
    assert kernel.t_exit - t_signal < 5
    assert kernel.proc.returncode == 128 + signal.SIGTERM and "second SIGTERM: exiting now" in kernel.log()
    assert not (tmp_path / "out" / "images.zip").exists()


def test_resume_continues_the_steps_within_the_plan_left(interrupted_run, tmp_path):
    """Resumed in place: the step count goes on, only the planned training left is trained, the old zip is replaced
    by a verified new one, within the new budget."""
    src, code, _, _ = interrupted_run
    assert code == 0
    out = tmp_path / "out"
    shutil.copytree(src, out)
    before = Resumed.read(str(out / "checkpoint.pt"), arch={}).payload
    left = before["plan_seconds"] - before["train_seconds"]
    old_zip = _sha(out / "images.zip")
    proc, wall = run_kernel([*CHEAP, *NO_CHECK, *FEWER, "--time-budget", "120s", "--out", out,
                             "--resume", out / "checkpoint.pt"], timeout=240, env=ENV)  # the plan left: up to ~70 s
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    step0 = before["trainer"]["step"]
    assert f"at step {step0}:" in proc.stdout and "training the remaining" in proc.stdout
    report = _report(out)
    assert report["resumed_from"]["step"] == step0 and report["train"]["total_steps"] > step0
    assert report["train"]["seconds"] <= left + 2.0, (report["train"]["seconds"], left)  # the plan's rest, not 120 s
    assert report["train"]["train_seconds_total"] == pytest.approx(before["plan_seconds"], abs=2.0)
    assert len(report["history"]["loss_d"]) > len(before["history"]["loss_d"])  # the loss curves carry on
    assert wall <= 120, wall
    verify_zip(out / "images.zip", n_expected=2000)
    assert _sha(out / "images.zip") != old_zip
    after = Resumed.read(str(out / "checkpoint.pt"), arch={}).payload
    assert after["trainer"]["step"] == report["train"]["total_steps"] and after["complete"]


# time


def test_a_slower_finish_keeps_the_budget(tmp_path):
    """The overrun of issue 13: the finish slows down far more than the steps (another job starts after the reserve
    was measured). fault slowgen: from the first step on, every generation batch sleeps 0.05 s (~3x slower on one
    core: +20 s for 400 batches, more than the reserve's safety and margin hold), the steps do not. The loop re-times a
    generation batch near the end, stops earlier, and the run ends within its budget with a verified zip."""
    out, budget = tmp_path / "out", 75
    proc, wall = run_kernel([*CHEAP, *NO_CHECK, "--time-budget", f"{budget}s", "--out", out,
                             "--set", "fault=slowgen@0.05"], timeout=budget + 120, env=ENV)
    _skip_if_refused(proc.returncode, proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"slow finish: exit 0 after {wall:.1f}s of {budget}s (measured from outside)")
    assert "slower than measured at start" in proc.stdout and wall <= budget, (wall, proc.stdout[-2000:])
    assert _report(out)["train"]["slowdown"] > 1.2
    verify_zip(out / "images.zip", n_expected=10000)


def test_budgets_hold_under_contention(budget_runs):
    """Budgets of 90, 180 and 300 s, three kernels on 2 cores at once (and the other tests' kernels beside them): each
    ends within its budget, measured from outside, with a verified zip; the 90 and 180 s runs may instead be refused
    up front (exit 2, one line: the finish measured under this contention has reached 2m12s on this machine). The 300 s
    run is never refused: its self-check runs, or (CI measured it at 3m18s under this contention) the plan leaves it
    out of the finish reserve and says so, or a finish re-timed slower near the end leaves it no time and the kernel
    says so then (seen once the finish got faster: a reserve of 2m30s that the re-timing grew to 5m13s)."""
    for budget, (out, kernel) in sorted(budget_runs.items()):
        wall, text = kernel.wait(timeout=budget + 120), kernel.log()
        print(f"budget {budget}s: exit {kernel.proc.returncode} after {wall:.1f}s (measured from outside)")
        assert wall <= budget, f"budget {budget}s took {wall:.1f}s:\n{text[-2000:]}"
        if budget < 300 and kernel.proc.returncode == 2 and "is too small" in text:  # refused up front, loaded box:
            warnings.warn(f"the {budget} s run was refused: {text.strip().splitlines()[-1]}")  # within budget all the same
            continue
        assert kernel.proc.returncode == 0, f"budget {budget}: {text[-3000:]}"
        verify_zip(out / "images.zip", n_expected=10000)
        report = _report(out)
        assert report["train"]["total_steps"] > 0 and report["wall_seconds"] <= budget
    out, kernel = budget_runs[300]
    if "self_check" not in _report(out)["phases"]:  # the self-check is optional: it may not fit beside training
        said = " ".join(_report(out)["warnings"])
        if "is left out of the finish reserve" in kernel.log():  # the plan left it out: the report says so too,
            assert "self-check not in the finish reserve" in said
        else:  # or it was planned, and a finish re-timed slower under the contention left it no time: said at the end
            assert "self-check skipped" in kernel.log() and "self-check skipped" in said, kernel.log()[-3000:]
        warnings.warn("the 300 s run's self-check did not fit under this contention")
