"""End-to-end tests of the bundled kernel.py (not only of modules/): smoke runs, bad data, presets, --evaluate."""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import KERNEL, ROOT, run_kernel
from modules.data.demo import make_demo_dataset
from modules.data.dogs import load_dogs
from modules.recipe.config import Config
from modules.run.submission import verify_zip, write_submission

FAST = ["--set", "self_check=false"]
# Tests about something other than the 10,000-image zip (bad input, every preset) write 2,000 images: the finish is a
# fifth as long, and the suite stays inside CI's time (the 10,000-image runs are test_demo_runs_end_to_end and
# test_smoke_on_real_sample here, and every run of test_robustness).
FEWER = ["--set", "n_images=2000", "--set", "dev_counts=true"]


def _zip_images(path, n=200):
    with zipfile.ZipFile(path) as zf:
        return np.stack([np.asarray(Image.open(io.BytesIO(zf.read(f"{i}.png")))) for i in range(n)])


def _assert_valid_run(out, proc, n_images=10000):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    verify_zip(out / "images.zip", n_expected=n_images)
    imgs = _zip_images(out / "images.zip")
    distinct = len({im.tobytes() for im in imgs})
    assert distinct >= 0.95 * len(imgs), f"only {distinct} distinct images of {len(imgs)}"
    return json.loads((out / "report.json").read_text())


def test_print_config_shows_the_recipe():
    proc, _ = run_kernel(["--print-config", "-f", "/tmp/jupyter-kernel.json"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["arch"] == "biggan" and cfg["loss"] == "rals" and cfg["preset"] == "kaggle"
    assert cfg["d_arch"] == "2nd-place" and cfg["max_steps"] == 50000  # the D table by name; the recipe's horizon


def test_empty_dir_exits_2_with_one_line(tmp_path):
    (tmp_path / "data").mkdir()  # empty; the output folder beside it (inside it is refused first, issue 19)
    proc, wall = run_kernel(["--data-dir", tmp_path / "data", "--out", tmp_path / "out", "--preset", "smoke"],
                            timeout=60)
    # refused before any data work: seconds (torch's import on a loaded box)
    assert proc.returncode == 2 and "inside the data folder" not in proc.stderr and wall < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path) in lines[0] and "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()  # a usage error leaves no empty output folder


def test_budget_too_small_exits_2(tmp_path):
    proc, _ = run_kernel(["--demo", "--out", tmp_path, "--time-budget", "10s"], timeout=60)
    assert proc.returncode == 2 and "too small" in proc.stderr and "Traceback" not in proc.stderr


def test_full_width_budget_too_small_is_refused_inside_the_budget(tmp_path):
    """The default preset on the CPU with 60 s: the finish's measurement stops at its first timed generation batch
    (10,000 full-width images take minutes here) and the run ends with the "too small" line inside the budget, not
    after minutes of measuring; no output folder is left."""
    out = tmp_path / "out"
    proc, wall = run_kernel(["--demo", "--out", out, "--time-budget", "60s", "--device", "cpu"], timeout=400)
    assert proc.returncode == 2 and "is too small" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    assert wall < 60, wall


def test_absurd_budgets_are_refused_and_kaggle_is_warned_past_9h(tmp_path, monkeypatch, capsys):
    """Issue 19: 1e300 s is one line (exit 2), not a 300-digit duration in the log; inside a Kaggle session a budget
    over its 9 hours is warned about (this run then stops at the empty data folder)."""
    from modules.run.main import main
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--time-budget", "1e300"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "up to a week" in err
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--time-budget", "10h"]) == 2
    assert "more than a Kaggle session's 9h" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_out_inside_the_data_folder_is_refused(tmp_path, capsys):
    """Issue 19: --out equal to or inside --data-dir would put samples.png and losses.png among the training images."""
    from modules.run.main import main
    data = tmp_path / "data"
    (data / "all-dogs").mkdir(parents=True)
    for out, why in ((data, "is the data folder"), (data / "all-dogs" / "out", "is inside the data folder")):
        assert main(["--data-dir", str(data), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and why in err and "pass another --out" in err
    assert not (data / "all-dogs" / "out").exists()
    os.symlink(data, tmp_path / "link")  # the same folder by another name
    assert main(["--data-dir", str(tmp_path / "link"), "--out", str(data / "x")]) == 2
    assert "inside the data folder" in capsys.readouterr().err


def test_runs_sharing_an_out_folder_keep_their_own_temp_files(tmp_path):
    """Issue 19: each process writes images.zip/checkpoint.pt through its own temporary name, and a run starting in
    the folder removes only the leftovers of processes that are gone, not a live run's file being written."""
    from modules.run.setup import prepare_out_dir
    from modules.recipe.utils import atomic_file
    with atomic_file(str(tmp_path / "images.zip")) as f:
        f.write(b"x")
        assert os.listdir(tmp_path) == [f"images.zip.tmp{os.getpid()}"]
    live, dead = f"images.zip.tmp{os.getppid()}", "checkpoint.pt.tmp999999999"
    for name in (live, dead, "images.zip.tmp", "images.zip.tmpnotes"):
        (tmp_path / name).write_bytes(b"partial")
    prepare_out_dir(str(tmp_path), resume="")
    assert sorted(os.listdir(tmp_path)) == sorted(["images.zip", live, "images.zip.tmpnotes"])


def test_refused_plan_leaves_no_folder_and_one_clock(tmp_path):
    """Refused after the output folder was made (no training window left): the folder goes again, and the error's
    "took" is on the log's clock: at or just after the last line logged before the finish was measured."""
    out = tmp_path / "out"
    proc, _ = run_kernel(["--demo", "--preset", "smoke", "--out", out, "--time-budget", "40s",
                          "--set", "reserve_margin_s=100", *FAST], timeout=120)
    assert proc.returncode == 2 and "too small: start-up and loading took" in proc.stderr, proc.stderr
    assert not out.exists()
    logged = float(re.findall(r"^\[\s*([\d.]+)s\]", proc.stdout, flags=re.M)[-1])
    took = float(re.search(r"loading took ([\d.]+)s", proc.stderr).group(1))
    assert logged - 0.05 <= took <= logged + 1.0, (logged, took)


def test_failure_before_the_first_step_exits_2_and_ships_nothing(tmp_path):
    """A failure before any training step completed (here an injected one, --set fault=raise@0) is a setup problem:
    one stderr line naming the error and where it was raised, exit 2, no zip, and no output folder when the run made
    it; a folder that was there before stays, with what it held."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    for out in (tmp_path / "new", kept):
        proc, _ = run_kernel(["--demo", "--preset", "smoke", "--device", "cpu", "--out", out, "--time-budget", "120s",
                              "--set", "fault=raise@0", *FAST], timeout=200, env={"OMP_NUM_THREADS": "1"})
        err = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(err) == 1, proc.stderr
        assert err[0].startswith("error: training failed in step 1, before any step completed (RuntimeError: injected "
                                 "fault at step 0") and "kernel.py:" in err[0] and "in before_step" in err[0], err[0]
        assert "Traceback" not in proc.stdout + proc.stderr and "shipping" not in proc.stdout
    assert not (tmp_path / "new").exists()
    assert sorted(os.listdir(kept)) == ["notes.txt"]


def test_smoke_on_real_sample(real_data, tmp_path):
    """Smoke preset on the 1,953-image sample, with every report file: the self-check's nearest.png included.

    40 steps in a 180 s budget: the finish (10,000 images, zip, self-check) measured 1m10s on this 2-core machine, idle,
    and its reserve (the self-check's estimate is about twice its real time on CPU) 1m44s-2m26s, so the 120 s of the
    first version of this test was refused up front on a slow day, or, on a loaded one, left no time for the
    self-check (the kernel then skips it, by design, and writes no nearest.png). So the run ends by its step count, and
    its 600 s budget only has to hold the finish and the self-check however loaded the machine is."""
    out = tmp_path / "out"
    proc, wall = run_kernel(["--data-dir", real_data, "--out", out, "--preset", "smoke", "--time-budget", "600s",
                             "--set", "max_steps=40"], timeout=700,  # ends at step 40; the budget holds the finish
                            env={"TORCH_HOME": str(tmp_path / "torch")})  # an empty hub cache: no Inception weights
    report = _assert_valid_run(out, proc)
    assert wall <= 600, wall
    for name in ("samples.png", "losses.png", "nearest.png", "report.json"):
        assert (out / name).stat().st_size > 0, name
    assert report["data"]["images_read"] > 1900 and report["train"]["total_steps"] > 10
    assert "metrics" not in report and report["self_check"]["nearest_png"] == str(out / "nearest.png")  # no weights
    assert sum("FID" in line for line in proc.stdout.splitlines()) == 1 and "no FID computed" in proc.stdout
    assert "done:" in proc.stdout.splitlines()[-1]
    assert re.search(r"finish reserve .* training until \S+ or step 40, whichever comes first", proc.stdout)


def _salt(root):
    """One file of every bad-input class, in the Kaggle layout under root (all-dogs/ + Annotation/<breed>/)."""
    imgs, ann = root / "all-dogs", root / "Annotation"
    breed = sorted(p for p in ann.iterdir())[0]
    src_xml = next(breed.iterdir()).read_text()
    good = Image.new("RGB", (200, 150), (120, 80, 40))

    def add(name, writer, xml=src_xml):
        writer(imgs / f"{name}.jpg")
        if xml is not None:
            (breed / name).write_text(xml)

    add("zero", lambda p: p.write_bytes(b""))
    add("corrupt", lambda p: p.write_bytes(b"\xff\xd8\xff\xe0garbage" * 10))
    buf = io.BytesIO()
    good.save(buf, format="JPEG")
    add("truncated", lambda p: p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2]))
    add("grey", lambda p: good.convert("L").save(p, format="JPEG"))
    add("cmyk", lambda p: good.convert("CMYK").save(p, format="JPEG"))
    add("palette", lambda p: good.convert("P").save(p, format="PNG"))
    add("rgba", lambda p: good.convert("RGBA").save(p, format="PNG"))
    add("gif", lambda p: good.save(p, format="GIF"))
    add("noxml", lambda p: good.save(p, format="JPEG"), xml=None)
    add("badxml", lambda p: good.save(p, format="JPEG"), xml="<annotation><object><bndbox>")
    add("noobject", lambda p: good.save(p, format="JPEG"), xml="<annotation><size></size></annotation>")
    box = "<annotation><object><name>x</name><bndbox><xmin>{}</xmin><ymin>{}</ymin><xmax>{}</xmax><ymax>{}</ymax>" \
          "</bndbox></object></annotation>"
    add("outofrange", lambda p: good.save(p, format="JPEG"), xml=box.format(150, 100, 900, 900))
    add("zeroarea", lambda p: good.save(p, format="JPEG"), xml=box.format(50, 50, 50, 90))
    add("inverted", lambda p: good.save(p, format="JPEG"), xml=box.format(120, 100, 20, 10))
    add("tinybox", lambda p: good.save(p, format="JPEG"), xml=box.format(50, 50, 51, 51))
    add("namespaced", lambda p: good.save(p, format="JPEG"), xml=box.format(20, 20, 150, 140).replace(
        "<annotation>", '<annotation xmlns="urn:voc">'))
    (breed / "orphan_annotation").write_text(src_xml)
    (ann / "000-stray").mkdir()  # an empty folder sorting first must not drop the annotations


def test_salted_bad_input_is_skipped_and_counted(real_data, tmp_path):
    data = tmp_path / "data"
    (data / "all-dogs").mkdir(parents=True)
    # a 300-image subset of the real sample, with its annotations, then one file of every bad-input class
    annotations = {p.name: p for p in (real_data / "Annotation").glob("*/*")}
    for img in sorted((real_data / "all-dogs").iterdir())[:300]:
        shutil.copy(img, data / "all-dogs" / img.name)
        a = annotations[img.stem]
        (data / "Annotation" / a.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(a, data / "Annotation" / a.parent.name / a.name)
    _salt(data)
    out = tmp_path / "out"
    proc, wall = run_kernel(["--data-dir", data, "--out", out, "--preset", "smoke", "--time-budget", "45s", *FAST,
                              *FEWER])
    report = _assert_valid_run(out, proc, n_images=2000)
    skipped = report["data"]["skipped"]
    assert sum(skipped.values()) >= 8 and "no_annotation" in skipped and "no_image" in skipped, skipped
    assert skipped.get("box_too_small") == 1 and report["data"]["fixed"].get("xml_namespace") == 1, report["data"]
    assert "skipped" in proc.stdout and " 1 classes" not in proc.stdout and wall <= 45


def test_presets_run_the_smoke_path(tmp_path):
    """Every recipe runs from the same bundled kernel at smoke widths to a valid zip within its budget (run together)."""
    data = make_demo_dataset(tmp_path / "demo")
    presets = ["dcgan", "dcgan5", "dcgan-tricks"]
    procs = {}
    for name in presets:
        args = [sys.executable, str(KERNEL), "--data-dir", data, "--out", tmp_path / name, "--preset", f"{name},smoke",
                "--time-budget", "60s", *FAST, *FEWER]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # three kernels share the cores: one thread each
        procs[name] = (subprocess.Popen(list(map(str, args)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, cwd=ROOT, env=env), time.monotonic())
    for name, (p, t0) in procs.items():
        log, _ = p.communicate(timeout=300)
        wall = time.monotonic() - t0
        assert p.returncode == 0, f"{name}: {log[-3000:]}"
        assert wall <= 60, f"{name} took {wall:.0f}s"
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert report["config"]["arch"] in name and report["train"]["total_steps"] > 0
        verify_zip(tmp_path / name / "images.zip", n_expected=2000)


def test_evaluate_flags_copies_and_format(tmp_path):
    data = make_demo_dataset(tmp_path / "demo")
    cfg = Config()  # the crops the kernel trains on (and --evaluate compares with): its default style and filter
    d = load_dogs(data / "all-dogs", data / "Annotation", crop_styles=tuple(cfg.crop_styles.split(",")),
                  resize=cfg.crop_filter)
    copies = np.resize(d.images, (10000, 64, 64, 3))  # 10,000 copies of training crops: pure memorization
    write_submission(copies, str(tmp_path / "copies.zip"))
    no_weights = {"TORCH_HOME": str(tmp_path / "torch")}  # an empty hub cache: no Inception weights, no FID
    proc, _ = run_kernel(["--data-dir", data, "--evaluate", tmp_path / "copies.zip"], timeout=300, env=no_weights)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["format"]["ok"] and result["self_check"]["n_near_copies"] == 10000 and "fid" not in result

    with zipfile.ZipFile(tmp_path / "bad.zip", "w") as zf:
        for i in range(3):
            buf = io.BytesIO()
            Image.new("RGB", (32, 32)).save(buf, format="PNG")
            zf.writestr(f"{i}.png", buf.getvalue())
    proc, _ = run_kernel(["--data-dir", data, "--evaluate", tmp_path / "bad.zip"], timeout=300)
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert not result["format"]["ok"] and "size" in json.dumps(result["format"])
    assert proc.returncode == 1 and "would be rejected" in proc.stderr  # a script can tell (issue 19)


def test_demo_runs_end_to_end(tmp_path):
    # 60 steps (past ema_start 20): the run ends well before its budget (filling a budget is test_robustness's job);
    # the self-check of a kernel run is test_smoke_on_real_sample's
    # (it ends by its step count: the 400 s budget only has to admit the finish of 10,000 images on a loaded box)
    proc, wall = run_kernel(["--demo", "--out", tmp_path, "--preset", "smoke", "--time-budget", "400s",
                             "--set", "max_steps=60", *FAST], timeout=500)
    _assert_valid_run(tmp_path, proc)
    assert wall <= 400 and "demo" in proc.stdout


def test_fp16_on_the_cpu_runs_end_to_end(tmp_path):
    """amp=fp16 forced on the CPU (issue 18): the GPU's autocast + GradScaler path from the bundled kernel to a verified
    zip; the log and report.json count the optimiser steps the scalers skipped. This CPU has no fp16 kernels (fp16
    convs ran ~40x slower than fp32), so the run is small: 6 steps at batch 4, 200 images. (Not a parametrisation of
    test_demo_runs_end_to_end: its 10,000 images took 2m40s to generate in fp16 here.)"""
    proc, wall = run_kernel(["--demo", "--preset", "smoke", "--set", "amp=fp16", "--device", "cpu", "--out", tmp_path,
                             "--time-budget", "300s", "--set", "max_steps=6", "--set", "batch_size=4",
                             "--set", "n_images=200", "--set", "dev_counts=true", *FAST],
                            env={"OMP_NUM_THREADS": "1"})  # no 1-vs-2-thread measurement
    report = _assert_valid_run(tmp_path, proc, n_images=200)
    p = report["precision"]
    assert p["amp"] == "fp16 autocast + GradScalers" and p["grad_scalers"] and p["g_steps"] == p["d_steps"] == 6
    assert 0 <= p["skipped_g"] <= 6 and 0 <= p["skipped_d"] <= 6 and p["scale_g"] > 0
    assert "precision: fp16 autocast + GradScalers (amp=fp16)" in proc.stdout
    assert f"GradScalers skipped {p['skipped_g']} of 6 G steps and {p['skipped_d']} of 6 D steps" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["scaler_g"]["scale"] == p["scale_g"]  # what --resume carries on from
    assert "memory" not in report and "memory: needs" not in proc.stdout  # no estimate: an early OOM says it (exit 2)


@pytest.mark.parametrize("until", ["preset smoke", "training started"])
def test_a_reader_that_goes_away_does_not_end_the_run(tmp_path, until):
    """`kernel.py | head -1`: stdout's reader exits before the data is read, or once training started; the run goes on
    to its verified zip and exit 0, with no traceback and no "Exception ignored" at exit."""
    out = tmp_path / "out"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(KERNEL), "--demo", "--preset", "smoke", "--time-budget", "600s",
                                 "--set", "max_steps=10", "--out", str(out)],  # ends by its steps, not the clock
                                stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:  # the log lines as they come
            if until in line:
                break
        proc.stdout.close()  # the reader is gone: the next write gets EPIPE
        code = proc.wait(timeout=400)
    stderr = (tmp_path / "stderr").read_text()
    assert code == 0, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "BrokenPipe" not in stderr
    verify_zip(out / "images.zip", n_expected=Config().n_images)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("when", ["demo: synthetic dataset", "torch CPU threads"])
def test_a_stop_before_training_ends_with_130_and_one_line(tmp_path, sig, when):
    """SIGTERM or SIGINT once the data phase (the demo's data made, its crops being read) or the finish measurement
    (after the output folder was created) began: exit 130, one line on stderr, no output folder, no demo temp folder."""
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, str(KERNEL), "--demo", "--preset", "smoke", "--time-budget", "600s",
                                 "--out", str(out)], stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmp)})
        lines = []
        for line in proc.stdout:  # the log lines as they come
            lines.append(line)
            if when in line:
                proc.send_signal(sig)
                break
        lines += proc.stdout.read().splitlines()
        code = proc.wait(timeout=400)
    assert not any("training started" in line for line in lines), "the signal came after training started"
    assert code == 130 and (tmp_path / "stderr").read_text().splitlines() == ["interrupted"]
    assert not out.exists() and not [p for p in tmp.iterdir() if p.name.startswith("dogs-demo-")]
