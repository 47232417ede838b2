"""modules/run/finish.py: the finish writes a verified zip and report.json from a Sampler and its settings (no Config),
skips the optional parts when time is short (the Pace says); RunReport writes report.json's keys."""
import io
import json
import dataclasses
import threading
import types
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CPU, tiny_cfg, tiny_data
from test_evaluate import TinyClassifierFeatures
from modules.recipe.sample import build_sampler
from modules.recipe.train import build_trainer
from modules.recipe.utils import Deadline, PhaseTimer
from modules.run.budget import Pace
from modules.run.evaluate import NO_FID
from modules.run.finish import FinishSettings, build_finish_settings, finish, save_pictures
from modules.run.report import RunReport
from modules.run.submission import verify_zip


def _trainer():
    torch.manual_seed(0)
    return build_trainer(tiny_cfg(batch_size=4, attention=False), tiny_data(), CPU)


def _finish(trainer, out, *, budget=3600.0, stop=False, n=60, self_check=False, extractor=None):
    report = RunReport(config={}, device="cpu", torch=torch.__version__, history={"loss_d": [(1.0, 0.5), (2.0, 0.4)]})
    ev = threading.Event()
    if stop:
        ev.set()
    plan = types.SimpleNamespace(estimates={"generate": 1.0, "zip": 1.0, "checkpoint": 0.0},  # what Pace.need reads
                                 gen_batch=25, gen_batch_s=0.01)
    images = finish(_sampler(trainer).with_batch(25), data=tiny_data(), out_dir=str(out),
                    settings=FinishSettings(n_images=n, seed=0, workers=1, corrupt_zip=False, self_check=self_check),
                    extractor=extractor,
                    pace=Pace(plan, Deadline(budget)), timer=PhaseTimer(), report=report, stop_event=ev)
    return images, report


def _sampler(trainer):
    return build_sampler(dataclasses.replace(tiny_cfg(), z_dim=trainer.z_dim, truncation=2.0), trainer, tiny_data())


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


def test_the_self_check_without_inception_weights_is_the_copy_check_and_one_line(tmp_path, capsys):
    """No extractor (no Inception weights): nearest.png and the copy check in report.json, one line saying there is no
    FID, and no number in any other feature space."""
    _, report = _finish(_trainer(), tmp_path, self_check=True)
    keys = report.to_dict()  # what report.json will hold (run.ship writes it again after the finish)
    assert "metrics" not in keys and keys["self_check"]["n_near_copies"] == 0
    assert report.self_check["n_crops_searched"] == len(tiny_data().images) and (tmp_path / "nearest.png").is_file()
    assert not report.warnings
    lines = [line for line in capsys.readouterr().out.splitlines() if "FID" in line]
    assert [line.split("] ", 1)[1] for line in lines] == [NO_FID]


def test_the_self_check_with_inception_weights_adds_fid_and_mifid(tmp_path, capsys):
    """An extractor (Inception's stand-in here): report.metrics holds FID, MiFID and the memorization distance in its
    feature space, the copy check is there as without weights, and no line says there is no FID."""
    _, report = _finish(_trainer(), tmp_path, self_check=True, extractor=TinyClassifierFeatures())
    assert {"fid", "mifid_public", "mifid_private", "memorization_distance"} <= set(report.metrics)
    assert report.metrics["feature_space"] == "tiny (test)" and report.self_check["n_crops_searched"] == 16
    assert (tmp_path / "nearest.png").is_file() and not report.warnings and NO_FID not in capsys.readouterr().out


def test_save_pictures_keeps_the_generator_mode(tmp_path):
    trainer = _trainer()
    G = trainer.G.train()
    breeds = save_pictures(_sampler(trainer).with_model(G), classes=["a", "b"], history={}, out_dir=str(tmp_path),
                           seed=0)
    assert breeds == ["a", "b"] and G.training and (tmp_path / "samples.png").is_file()
    with Image.open(tmp_path / "breeds.png") as sheet:  # a conditional G: every breed, one labelled row each
        assert sheet.height == 2 * 66 + 2


def test_finish_settings_come_from_the_config():
    s = build_finish_settings(tiny_cfg(n_images=40, seed=7, data_workers=3, fault="zipfail", self_check=False))
    assert s == FinishSettings(n_images=40, seed=7, workers=3, corrupt_zip=True, self_check=False)
    assert not build_finish_settings(tiny_cfg(fault="")).corrupt_zip


def test_pngs_are_encoded_while_generating_and_the_zip_holds_the_same_images(tmp_path, monkeypatch):
    """Issue 19, defect 9 (SIGTERM -> exit took 39 s, PNG encoding after generation among the causes): the finish
    encodes each generated batch on a thread while the next one is generated, and write_submission takes those PNGs
    instead of encoding the 10,000 images again after generation."""
    import modules.run.finish as finish_module
    import modules.run.submission as submission_module
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
