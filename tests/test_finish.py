"""modules/finish.py: the finish writes a verified zip and report.json from keywords (no Config), skips the optional
parts when time is short, and the measured reserve has its parts; RunReport writes report.json's keys."""
import io
import json
import threading
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CPU, tiny_cfg, tiny_data
from modules.finish import finish, measure_finish_seconds, save_pictures
from modules.report import RunReport
from modules.submission import verify_zip
from modules.train import build_trainer
from modules.utils import Deadline, PhaseTimer


def _trainer():
    torch.manual_seed(0)
    return build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)


def _finish(trainer, out, *, budget=3600.0, stop=False, n=60):
    report = RunReport(config={}, device="cpu", torch=torch.__version__, history={"loss_d": [(1.0, 0.5), (2.0, 0.4)]})
    ev = threading.Event()
    if stop:
        ev.set()
    images = finish(trainer, data=tiny_data(), out_dir=str(out), n_images=n, z_dim=trainer.z_dim, truncation=2.0,
                    seed=0, workers=1, self_check_on=False, corrupt_zip=False, deadline=Deadline(budget),
                    extractor=None, timer=PhaseTimer(), report=report,
                    estimates={"generate": 1.0, "zip": 1.0, "checkpoint": 0.0}, batch=25, slowdown=1.0, stop_event=ev)
    return images, report


def test_finish_writes_the_zip_report_and_pictures(tmp_path):
    images, report = _finish(_trainer(), tmp_path)
    assert images.shape == (60, 64, 64, 3) and images.dtype == np.uint8
    verify_zip(tmp_path / "images.zip", n_expected=60)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["zip"] == str(tmp_path / "images.zip") and on_disk["history"]["loss_d"] == [[1.0, 0.5], [2.0, 0.4]]
    assert (tmp_path / "samples.png").is_file() and (tmp_path / "losses.png").is_file()
    assert report.samples_breeds == ["c0", "c1", "c2"] and not report.warnings
    assert set(on_disk) == {"config", "device", "torch", "warnings", "degraded", "history", "zip"}  # None parts left out


def test_finish_skips_the_pictures_when_interrupted_or_late(tmp_path):
    for sub, kw in (("stopped", dict(stop=True)), ("late", dict(budget=0.5))):
        _, report = _finish(_trainer(), tmp_path / sub, **kw)
        verify_zip(tmp_path / sub / "images.zip", n_expected=60)  # the zip is always written
        assert not (tmp_path / sub / "samples.png").exists() and report.samples_breeds is None
        assert any("pictures skipped" in w for w in report.warnings)


def test_save_pictures_keeps_the_generator_mode(tmp_path):
    trainer = _trainer()
    G = trainer.G.train()
    breeds = save_pictures(G, classes=["a", "b"], history={}, out_dir=str(tmp_path), z_dim=trainer.z_dim,
                           truncation=2.0, seed=0, device=CPU)
    assert breeds == ["a", "b"] and G.training and (tmp_path / "samples.png").is_file()


def test_measured_finish_has_its_parts():
    trainer = _trainer()
    est, info = measure_finish_seconds(
        trainer.generator_to_ship(), n_images=100, z_dim=trainer.z_dim, label_counts=np.ones(3), truncation=2.0,
        batch_size=25, device=CPU, amp_dtype=None, workers=1, disk_bytes_per_s=1e8,
        checkpoint_state=trainer.state_dict())
    assert set(est) == {"generate", "zip", "checkpoint"} and all(v > 0 for v in est.values())
    assert info["batch"] == 25 and info["zip_bytes"] > 100 * 1000 and info["checkpoint_bytes"] > 0


def test_pngs_are_encoded_while_generating_and_the_zip_holds_the_same_images(tmp_path, monkeypatch):
    """Issue 19, defect 9 (SIGTERM -> exit took 39 s, PNG encoding after generation among the causes): the finish
    encodes each generated batch on a thread while the next one is generated, and write_submission takes those PNGs
    instead of encoding the 10,000 images again after generation."""
    import modules.finish as finish_module
    import modules.submission as submission_module
    calls = []
    real = submission_module.encode_pngs
    monkeypatch.setattr(finish_module, "encode_pngs", lambda images, workers=2: calls.append(
        (threading.current_thread() is threading.main_thread(), len(images))) or real(images, workers))
    monkeypatch.setattr(submission_module, "encode_pngs", lambda *a, **k: pytest.fail("encoded after generation"))
    trainer = _trainer()
    G = trainer.generator_to_ship()
    layout = {k: v.stride() for k, v in G.state_dict().items()}
    images, _ = _finish(trainer, tmp_path, n=60)
    assert calls and not any(main for main, _ in calls) and sum(n for _, n in calls) == 60  # per batch, off the main thread
    assert {k: v.stride() for k, v in G.state_dict().items()} == layout  # channels-last only while generating
    with zipfile.ZipFile(tmp_path / "images.zip") as zf:
        back = np.stack([np.asarray(Image.open(io.BytesIO(zf.read(f"{i}.png")))) for i in range(60)])
    np.testing.assert_array_equal(back, images)
