"""modules/run/generate.py and sheets.py: --generate samples a checkpoint's generator without training (images.zip,
breeds.png, interpolation.png, report.json; --sweep), and refuses a bad checkpoint or a training setting with one line,
writing nothing. The checkpoints are a one-step tiny trainer's, saved through save_checkpoint."""
import dataclasses
import json
import os
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CPU, KERNEL, tiny_cfg
from modules.recipe.train import build_trainer
from modules.recipe.utils import UsageError
from modules.run.checkpoint import save_checkpoint
from modules.run.cli import parse_config
from modules.run.main import main
from modules.run.report import breed_label
from modules.run.submission import verify_zip

BREEDS = ["n02085620-Chihuahua", "n02106662-German_shepherd", "n02110958-pug"]
SMALL = ["--device", "cpu", "--set", "n_images=40", "--set", "dev_counts=true", "--set", "sample_batch=20"]


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A checkpoint of a tiny biggan after one step; its own sampling settings differ from the defaults (truncation
    1.5, sample_bn running), so that what --generate inherits shows."""
    torch.manual_seed(0)
    cfg = tiny_cfg(batch_size=4, truncation=1.5, sample_bn="running")
    data = types.SimpleNamespace(images=_images(12), labels=np.arange(12) % 3, classes=BREEDS, reference=_images(12))
    trainer = build_trainer(cfg, data, CPU)
    trainer.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(str(path), trainer, config=dataclasses.asdict(cfg), train_seconds=1.0, n_classes=3, classes=BREEDS,
                    complete=True, label_counts=[5, 1, 10])
    return path


def _variant(ckpt, path, *, drop=(), **config_changes):
    """ckpt's payload with these config fields changed and the top-level keys `drop` left out, saved at path."""
    payload = torch.load(ckpt, weights_only=True)
    payload["config"].update(config_changes)
    for key in drop:
        del payload[key]
    torch.save(payload, path)
    return path


def _generate(capsys, ckpt, out, *extra):
    """main(argv) in this process, as a notebook cell calls it -> (exit code, stdout + stderr)."""
    code = main(["--generate", str(ckpt), "--out", str(out), *SMALL, *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_generate_writes_a_verified_zip_of_10000_and_the_pictures(ckpt, tmp_path, capsys):
    """The checkpoint's own truncation and sample_bn, breeds drawn with its counts. (In this process: the bundled
    kernel runs --generate in the Jupyter test below.)"""
    out = tmp_path / "out"
    code = main(["--generate", str(ckpt), "--out", str(out), "--device", "cpu"])
    text = "".join(capsys.readouterr())
    assert code == 0 and "wrote" in text and "10000 verified PNGs" in text, text[-2000:]
    verify_zip(out / "images.zip", n_expected=10000)
    report = _report(out)
    assert report["generate"]["weights"] == "ema" and report["generate"]["breed_frequencies"] == "the training set's"
    assert report["settings"]["truncation"] == 1.5 and report["settings"]["sample_bn"] == "running"
    assert sorted(report["files"]) == sorted(str(out / n) for n in ("images.zip", "breeds.png", "interpolation.png"))
    with Image.open(out / "breeds.png") as img:  # one row per breed: 3 rows of 64 pixels and their gaps
        assert img.height == 3 * 66 + 2 and img.width > 6 * 66
    with Image.open(out / "interpolation.png") as img:  # 3 rows within a breed, 3 from breed to breed
        assert img.height == 6 * 66 + 2
    assert not (out / "checkpoint.pt").exists()


def test_breed_labels_come_from_the_annotation_folders():
    assert [breed_label(b) for b in BREEDS] == ["Chihuahua", "German shepherd", "pug"]
    assert breed_label("dog") == "dog"


def test_truncation_and_sample_bn_given_apply_and_a_notebooks_argument_is_ignored(ckpt, tmp_path, capsys):
    code, text = _generate(capsys, ckpt, tmp_path / "out", "--set", "truncation=0.7", "--set", "sample_bn=batch",
                           "--seed", "3", "-f", "/tmp/kernel-1.json")  # Jupyter's own argument in a notebook
    assert code == 0, text
    settings = _report(tmp_path / "out")["settings"]
    assert (settings["truncation"], settings["sample_bn"], settings["seed"]) == (0.7, "batch", 3)
    verify_zip(tmp_path / "out" / "images.zip", n_expected=40)


@pytest.mark.parametrize("argv, field", [
    (["--set", "lr_g=0.1"], "lr_g"), (["--time-budget", "1h"], "time_budget"), (["--preset", "smoke"], "preset"),
    (["--resume", "x.pt"], "resume"), (["--demo"], "demo")])
def test_a_training_setting_is_refused_naming_it(ckpt, tmp_path, capsys, argv, field):
    code, text = _generate(capsys, ckpt, tmp_path / "out", *argv)
    assert code == 2 and not (tmp_path / "out").exists()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"setting {field} cannot be changed with --generate" in errors[0], text
    assert "Traceback" not in text


def _damaged(ckpt, tmp_path, kind):
    path = tmp_path / f"{kind}.pt"
    if kind == "junk":
        path.write_bytes(b"not a checkpoint")
    elif kind == "foreign":
        torch.save({"state_dict": {}}, path)
    elif kind == "truncated":
        data = ckpt.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif kind == "other-arch":  # an architecture this kernel does not build
        _variant(ckpt, path, arch="stylegan")
    elif kind == "misfit":  # the stored settings do not fit the weights
        _variant(ckpt, path, g_ch=8)
    return path


@pytest.mark.parametrize("kind, says", [
    ("missing", "no such file"), ("junk", "not a readable checkpoint"), ("truncated", "not a readable checkpoint"),
    ("foreign", "not a checkpoint written by this kernel"), ("other-arch", "cannot build the checkpoint's model"),
    ("misfit", "do not fit its own settings")])
def test_a_bad_checkpoint_is_one_line_and_leaves_the_earlier_zip(ckpt, tmp_path, capsys, kind, says):
    out = tmp_path / "out"
    out.mkdir()
    (out / "images.zip").write_bytes(b"an earlier submission")
    code, text = _generate(capsys, _damaged(ckpt, tmp_path, kind), out)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--generate" in errors[0] and says in errors[0], text
    assert sorted(p.name for p in out.iterdir()) == ["images.zip"]
    assert (out / "images.zip").read_bytes() == b"an earlier submission"


def test_a_sweep_without_inception_weights_writes_a_sheet_per_value_and_says_it_could_not_score(
        ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modules.run.generate.build_feature_extractor", lambda path, device: None)
    out = tmp_path / "out"
    code, text = _generate(capsys, ckpt, out, "--sweep", "truncation=0.5,1,2")
    assert code == 0, text
    assert "could not score it" in text
    for value in ("0.5", "1", "2"):
        assert (out / f"breeds-truncation-{value}.png").is_file()
    report = _report(out)
    assert not report["sweep"]["scored"] and report["settings"]["truncation"] == 1.5  # the configured value's zip
    verify_zip(out / "images.zip", n_expected=40)


class ShortFeatures:
    """Stands in for Inception: 6-d features and 4 logits from the first pixels."""
    name, dim = "short (test)", 6

    def features_and_logits(self, images_uint8):
        x = images_uint8.reshape(len(images_uint8), -1)[:, :self.dim].astype(np.float32)
        return x, x[:, :4] / 50.0


def test_a_scored_sweep_prints_a_table_and_ships_the_best_value(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("modules.run.generate.build_feature_extractor", lambda path, device: ShortFeatures())
    reference = types.SimpleNamespace(reference=_images(60, seed=1))
    monkeypatch.setattr("modules.run.generate.load_training_data", lambda cfg: (reference, None))
    out = tmp_path / "out"
    code, text = _generate(capsys, ckpt, out, "--sweep", "truncation=0.5,2")
    assert code == 0, text
    assert "MiFID priv" in text and "not Kaggle's score" in text
    sweep = _report(out)["sweep"]
    assert sweep["scored"] and [row["truncation"] for row in sweep["rows"]] == [0.5, 2.0]
    best = min(sweep["rows"], key=lambda row: row["mifid_private"])["truncation"]
    assert sweep["shipped"] == best and _report(out)["settings"]["truncation"] == best


@pytest.mark.parametrize("argv, says", [
    (["--generate", "c.pt", "--sweep", "truncation=0.5,20"], "--sweep: setting truncation=20.0 is not allowed"),
    (["--generate", "c.pt", "--sweep", "lr_g=0.1,0.2"], "with NAME one of truncation, sample_bn"),
    (["--generate", "c.pt", "--sweep", "sample_bn=batch,mean"], "setting sample_bn='mean' is not allowed"),
    (["--sweep", "truncation=1"], "pass --generate CHECKPOINT")])
def test_a_bad_sweep_is_refused_when_parsed(argv, says):
    with pytest.raises(UsageError) as err:
        parse_config(argv)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_an_older_checkpoint_without_counts_draws_breeds_uniformly_and_says_so(ckpt, tmp_path, capsys):
    old = _variant(ckpt, tmp_path / "old.pt", drop=("label_counts",))
    code, text = _generate(capsys, old, tmp_path / "out")
    assert code == 0, text
    assert "no per-breed image counts" in text
    report = _report(tmp_path / "out")
    assert report["generate"]["breed_frequencies"] == "uniform" and report["warnings"]


def test_generate_in_a_jupyter_cell_writes_the_zip_and_the_next_cell_runs(ckpt, tmp_path):
    """The whole kernel.py in one cell of a real Jupyter kernel, argv set in the cell before, as on Kaggle."""
    nbformat, nbclient = pytest.importorskip("nbformat"), pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    out = tmp_path / "out"
    argv = ["kernel.py", "--generate", str(ckpt), "--out", str(out), *SMALL]
    cells = [f"import sys\nsys.argv = {argv!r}", KERNEL.read_text(encoding="utf-8"), "print('AFTER')"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in cells])
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})  # raises CellExecutionError on any cell error
    verify_zip(out / "images.zip", n_expected=40)
    assert (out / "breeds.png").is_file() and "AFTER" in nb.cells[2].outputs[0]["text"]
