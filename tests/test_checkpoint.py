"""modules/run/checkpoint.py: the round trip, the checks on reading, atomic writes, and a full disk said as such."""
import contextlib
import errno
import os
import threading
import time

import pytest
import torch

from conftest import CPU, tiny_cfg, tiny_data
from modules.recipe.train import build_trainer
from modules.recipe.utils import UsageError
from modules.run.checkpoint import Resumed, describe_write_error, read_checkpoint, save_checkpoint
from modules.run.rank import make_checkpointer
from modules.run.report import RunReport

ARCH = {"arch": "biggan", "g_ch": 2}


def _trainer(seed=0):
    torch.manual_seed(seed)
    return build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)


def _save(path, trainer, **kw):
    args = dict(config=dict(ARCH), train_seconds=12.5, n_classes=3, classes=["c0", "c1", "c2"], plan_seconds=20.0,
                complete=False, history={"loss_d": [(1.0, 0.5)]})
    save_checkpoint(str(path), trainer, **{**args, **kw})


def test_round_trip_restores_the_state(tmp_path):
    a = _trainer(0)
    a.step()
    _save(tmp_path / "c.pt", a)
    ckpt = Resumed.read(str(tmp_path / "c.pt"), arch=ARCH).payload
    assert ckpt["train_seconds"] == 12.5 and ckpt["plan_seconds"] == 20.0 and not ckpt["complete"]
    assert ckpt["history"]["loss_d"] == [(1.0, 0.5)] and "label_counts" not in ckpt
    _save(tmp_path / "c.pt", a, label_counts=[5, 0, 7])
    assert read_checkpoint(str(tmp_path / "c.pt"), arch=ARCH)["label_counts"] == [5, 0, 7]
    b = _trainer(1)
    Resumed.read(str(tmp_path / "c.pt"), arch=ARCH).restore(b, classes=["c0", "c1", "c2"])
    assert b.step_count == 1
    for k, v in a.G.state_dict().items():
        assert torch.equal(v, b.G.state_dict()[k]), k
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_checkpoints_are_one_line_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file"):
        Resumed.read(str(tmp_path / "none.pt"), arch=ARCH)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a readable checkpoint"):
        Resumed.read(str(tmp_path / "junk.pt"), arch=ARCH)
    torch.save({"something": 1}, tmp_path / "foreign.pt")
    with pytest.raises(UsageError, match="not a checkpoint written by this kernel"):
        Resumed.read(str(tmp_path / "foreign.pt"), arch=ARCH)
    _save(tmp_path / "c.pt", _trainer())
    with pytest.raises(UsageError, match="g_ch=2, this run 4"):
        Resumed.read(str(tmp_path / "c.pt"), arch={"g_ch": 4})
    with pytest.raises(UsageError, match="d_arch='biggan-pytorch', this run '2nd-place'"):  # from before d_arch
        Resumed.read(str(tmp_path / "c.pt"), arch={"d_arch": "2nd-place"})
    assert Resumed.read(str(tmp_path / "c.pt"), arch={"d_arch": "biggan-pytorch"}).payload
    with pytest.raises(UsageError, match="trained on 3 breeds, this data has 2"):
        Resumed.read(str(tmp_path / "c.pt"), arch=ARCH).restore(_trainer(), classes=["a", "b"])


@pytest.mark.parametrize("change, field", [
    ({"train_seconds": "12.5"}, "train_seconds"), ({"train_seconds": float("inf")}, "train_seconds"),
    ({"train_seconds": -1.0}, "train_seconds"), ({"plan_seconds": 1e300}, "plan_seconds"),
    ({"complete": "yes"}, "complete"), ({"n_classes": "3"}, "n_classes"), ({"classes": []}, "classes"),
    ({"classes": [1, 2, 3]}, "classes"), ({"history": {"loss_d": "x"}}, "history"),
    ({"trainer": {"G": {}}}, "trainer"), ({"trainer.step": 1.5}, "trainer.step"),
    ({"trainer.lr_scale": float("nan")}, "trainer.lr_scale"), ({"trainer.opt_g": [1]}, "trainer.opt_g"),
    ({"label_counts": [1, 2]}, "label_counts"), ({"label_counts": [0, 0, 0]}, "label_counts")])
def test_wrong_typed_or_absurd_fields_are_one_line_usage_errors(tmp_path, change, field):
    """Issue 19: a checkpoint that loads but carries a string for seconds, no classes, infinite seconds... is refused
    when read (before the data), naming the field, instead of crashing the run later."""
    _save(tmp_path / "c.pt", _trainer())
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    for key, value in change.items():
        if key.startswith("trainer."):
            ckpt["trainer"][key.split(".", 1)[1]] = value
        else:
            ckpt[key] = value
    torch.save(ckpt, tmp_path / "bad.pt")
    with pytest.raises(UsageError, match=f"damaged checkpoint: {field} is") as err:
        Resumed.read(str(tmp_path / "bad.pt"), arch=ARCH)
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def unblock_fifo_later(path, after_s=3.0):
    """A writer opens and closes the FIFO after after_s (for 30 s, whenever a reader waits): code that opens it reads
    EOF and fails there instead of hanging the test."""
    def writer():
        time.sleep(after_s)
        for _ in range(150):
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO while no reader has it open
            time.sleep(0.2)

    threading.Thread(target=writer, daemon=True).start()


def test_a_fifo_or_folder_is_refused_without_opening_it(tmp_path):
    """Issue 19: torch.load on a FIFO blocks until a writer comes; it is refused by stat before any open."""
    os.mkfifo(tmp_path / "fifo.pt")
    unblock_fifo_later(tmp_path / "fifo.pt")
    with pytest.raises(UsageError, match="is a FIFO"):
        Resumed.read(str(tmp_path / "fifo.pt"), arch=ARCH)
    with pytest.raises(UsageError, match="is a folder"):
        Resumed.read(str(tmp_path), arch=ARCH)


def _torch_disk_full(*args, **kwargs):  # what torch.save raises when the disk fills mid-write
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1234 vs 1200\n"
                       "PytorchStreamWriter failed writing file data/3: file write failed")


@pytest.mark.parametrize("failure", ["torch", "oserror"])
def test_full_disk_logs_one_disk_full_line_and_keeps_the_old_checkpoint(tmp_path, monkeypatch, capsys, failure):
    trainer = _trainer()
    path = tmp_path / "checkpoint.pt"
    report = RunReport(config=dict(ARCH), device="cpu", torch=torch.__version__)
    checkpoint = make_checkpointer(str(path), trainer, config=dict(ARCH), classes=["c0", "c1", "c2"], report=report)
    assert checkpoint(1.0, 10.0, False) and path.is_file()
    old = path.read_bytes()
    capsys.readouterr()

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", _torch_disk_full if failure == "torch" else enospc)
    assert checkpoint(2.0, 10.0, False) is False  # the run goes on
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "WARNING: checkpoint not written: disk full:" in out[0], out
    assert "inline_container" not in out[0] and "MiB free" in out[0]
    assert path.read_bytes() == old and not (tmp_path / "checkpoint.pt.tmp").exists()


def test_other_write_errors_keep_their_first_line():
    msg = describe_write_error(PermissionError(errno.EACCES, "Permission denied"), "/x/checkpoint.pt")
    assert "disk full" not in msg and msg.startswith("PermissionError")
    assert describe_write_error(OSError(errno.EDQUOT, "Disk quota exceeded"), "/x/c.pt").startswith("disk full")


def test_resume_keeps_this_devices_adam(tmp_path):
    """A GPU run's checkpoint holds fused Adam's flags (fused=True, foreach=None) and float32 step counters; resumed
    on the CPU, the optimisers keep the CPU's foreach Adam (torch < 2.4 has no fused CPU Adam) and a step runs. The
    other way (a CPU checkpoint into fused Adam, as on a GPU): fused stays, the step counters follow it."""
    a = _trainer(0)
    a.step()
    state = a.state_dict()
    for key in ("opt_g", "opt_d"):  # as a GPU run writes them
        for group in state[key]["param_groups"]:
            group.update(fused=True, foreach=None, capturable=False)
        for s in state[key]["state"].values():
            s["step"] = s["step"].to(torch.float32)
    a.state_dict = lambda: state
    _save(tmp_path / "gpu.pt", a)
    b = _trainer(1)
    Resumed.read(str(tmp_path / "gpu.pt"), arch=ARCH).restore(b, classes=["c0", "c1", "c2"])
    for opt in (b.opt_g, b.opt_d):
        assert all(g["foreach"] is True and not g["fused"] for g in opt.param_groups), opt.param_groups[0]
    b.step()
    assert b.step_count == 2 and all(torch.isfinite(p).all() for p in b.G.parameters())

    c = _trainer(2)
    c.opt_g = torch.optim.Adam(c.G.parameters(), lr=1e-4, betas=(0.0, 0.99), fused=True)  # as _adam builds on CUDA
    c.opt_d = torch.optim.Adam(c.D.parameters(), lr=1e-4, betas=(0.0, 0.99), fused=True)
    cpu = _trainer(3)
    cpu.step()
    _save(tmp_path / "cpu.pt", cpu)
    Resumed.read(str(tmp_path / "cpu.pt"), arch=ARCH).restore(c, classes=["c0", "c1", "c2"])
    for opt in (c.opt_g, c.opt_d):
        assert all(g["fused"] is True and not g["foreach"] for g in opt.param_groups)
    c.step()
    assert c.step_count == 2 and all(s["step"] == 2 for s in c.opt_g.state.values())


def test_grad_scalers_go_through_the_checkpoint(tmp_path):
    """fp16 (issue 18): the GradScalers' scales and growth trackers are restored by --resume; a checkpoint of a run
    without them (fp32 on the CPU, bf16) resumes in fp16 with fresh scalers, and an fp16 one resumes in fp32."""
    def trainer(amp):
        torch.manual_seed(0)
        return build_trainer(tiny_cfg(batch_size=2, attention=False, amp=amp), tiny_data(), CPU)

    a = trainer("fp16")
    a.step()
    a.scaler_d.load_state_dict({**a.scaler_d.state_dict(), "scale": 256.0, "_growth_tracker": 7})
    _save(tmp_path / "fp16.pt", a)
    b = trainer("fp16")
    Resumed.read(str(tmp_path / "fp16.pt"), arch=ARCH).restore(b, classes=["c0", "c1", "c2"])
    assert b.scaler_d.state_dict() == a.scaler_d.state_dict() and b.scaler_g.state_dict() == a.scaler_g.state_dict()
    assert b.scaler_d.get_scale() == 256.0
    _save(tmp_path / "fp32.pt", trainer("off"))
    c = trainer("fp16")
    Resumed.read(str(tmp_path / "fp32.pt"), arch=ARCH).restore(c, classes=["c0", "c1", "c2"])
    assert c.scaler_g.get_scale() == c.scaler_d.get_scale() == 65536.0  # torch's initial scale
    d = trainer("off")
    Resumed.read(str(tmp_path / "fp16.pt"), arch=ARCH).restore(d, classes=["c0", "c1", "c2"])
    assert not d.scaler_g.is_enabled() and d.step_count == 1
