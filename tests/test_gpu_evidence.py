"""tests/bench/gpu_evidence.py --dry-run: the first GPU's one command runs end to end on the CPU at tiny sizes, so that
call cannot fail on a typo. One subprocess shared by the module (its torch threads and seeds stay out of this
process), ~30 s; the scorer run back home (score_gpu_samples.py) on its samples; the pieces the dry run cannot show
(the two-GPU kill case, bench_speed's JSON when a variant dies, no trainer left alive between runs)."""
import gc
import json
import os
import subprocess
import sys
import weakref
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


sys.path.insert(0, str(ROOT / "tests" / "bench"))

import bench_speed  # noqa: E402
import gpu_evidence  # noqa: E402
from benchlib import recipe  # noqa: E402

from modules.data.demo import make_demo_dataset  # noqa: E402
from modules.run.submission import write_submission  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One --dry-run for the module: -> its output folder."""
    out = tmp_path_factory.mktemp("gpu-evidence") / "evidence"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_evidence.py"), "--dry-run", "--out",
                        str(out)], capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_gpu_evidence_dry_run(dry_run):
    out = dry_run
    doc = json.loads((out / "evidence.json").read_text())
    res = doc["results"]
    failed = {k: v.get("error") for k, v in res.items() if "traceback" in v}
    assert not failed, failed
    assert set(res) >= {"env", "cuda_checks", "quality", "kernel", "train", "finish", "memory", "kill2", "predict",
                        "speed", "tests", "make_npz"}
    # the order of value: quality right after the CUDA checks
    assert list(res)[list(res).index("env"):][:5] == ["env", "cuda_checks", "quality", "kernel", "train"]
    # the kernel's own backend and thread configuration was applied before measuring
    assert "torch CPU threads" in res["env"]["backends"] and res["env"]["torch_threads"] == 1
    assert "2 CUDA" not in res["kill2"]["skipped"] and "needs 2" in res["kill2"]["skipped"]
    quality = res["quality"]
    assert quality["ok"] and quality["amp"] == "fp16" and len(quality["points"]) == 3
    assert [p["step"] for p in quality["points"]] == sorted(p["step"] for p in quality["points"])
    for point in quality["points"]:
        with np.load(out / point["file"]) as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape == (20, 64, 64, 3)
            assert int(z["step"]) == point["step"]
    assert (out / "samples-grid.png").is_file()
    # at most 8 files come back from the device: everything this run leaves under --out is planned (the dry run's
    # demo photos and their .npz are made only because no --npz was given)
    left = {p.name for p in out.iterdir()} - {"demo-data", "demo.npz"}
    assert left == {"evidence.json", "evidence.md", "samples-1.npz", "samples-2.npz", "samples-3.npz",
                    "samples-grid.png", "curves.png"}, left
    # the .npz made through the kernel's loader is what the run trained on
    with np.load(out / "demo.npz") as z:
        assert z["images"].dtype == np.uint8 and z["images"].shape[1:] == (64, 64, 3)
        assert len(z["labels"]) == len(z["images"]) == res["make_npz"]["crops"]
    checks = res["cuda_checks"]
    assert checks["ok"], checks["failed"]
    assert checks["amp_fp16"]["dtype"] == "fp16" and checks["amp_fp16"]["scaler_enabled"]
    inf = checks["inf_gradient"]
    assert inf["halved"] and inf["g_weights_unchanged"]
    train = res["train"]
    for amp in ("fp16", "off"):
        r = train[amp]
        assert r["steps"] >= 1 and r["nonfinite"] == 0 and r["reason"] in ("budget", "steps"), r
        assert r["syncs"] and all(s["step"] >= 1 for s in r["syncs"])
    assert train["fp16"]["final_scale_g"] > 1 and train["off"]["final_scale_g"] == 1.0  # scaler on only for fp16
    assert 0 <= train["fp16"]["skipped_g"] <= train["fp16"]["steps"]
    kernel = train["fp16"].get("kernel_precision")
    if kernel and kernel.get("skipped_g") is not None:  # the kernel's own count (issue 18 part 1) agrees with ours
        assert (kernel["skipped_g"], kernel["skipped_d"]) == (train["fp16"]["skipped_g"], train["fp16"]["skipped_d"])
    assert res["finish"]["n_images"] == 100 and res["finish"]["non_training_s"] > 0
    mem = res["memory"]["rows"]
    assert mem and mem[0]["amp"] == "fp16" and mem[0]["saved_g"] > 0 and mem[0]["adam"] > 0
    assert res["predict"]["predicted"][0]["steps"][0] > 0
    speed = res["speed"]
    assert speed["rc"] == 0 and len(speed["result"]["rows"]) == 3, speed.get("stderr_tail")
    md = (out / "evidence.md").read_text()
    assert "DRY RUN" in md and "| train | ok |" in md


def test_score_gpu_samples_on_the_dry_run(dry_run, tmp_path):
    """The scorer run back home, on the dry run's samples against its demo photos' reference images."""
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("matplotlib")
    import mnv2
    if not mnv2.MODEL_PATH.is_file():
        pytest.skip(f"no MobileNet-v2 model at {mnv2.MODEL_PATH}")
    import score_gpu_samples
    out = tmp_path / "scored"
    assert score_gpu_samples.main([str(dry_run), "--data-dir", str(dry_run / "demo-data"), "--out", str(out),
                                   "--cpu-results", str(ROOT / "tests" / "bench" / "results" / "long20" /
                                                        "results.json")]) == 0
    doc = json.loads((out / "gpu-quality.json").read_text())
    assert [p["file"] for p in doc["gpu"]] == ["samples-1.npz", "samples-2.npz", "samples-3.npz"]
    assert all(p["n"] == 20 and np.isfinite(p["fid_mnv2"]) and 0 <= p["mem_mnv2"] <= 2 for p in doc["gpu"])
    assert doc["cpu"] == []  # the committed CPU curves are at n=1000: none at n=20
    assert "| samples-3.npz |" in (out / "gpu-quality.md").read_text()
    assert (out / "gpu-curve.png").is_file() and (out / "samples-grid.png").is_file()


def test_score_gpu_samples_without_samples_is_a_usage_error(tmp_path, capsys):
    sys.modules.pop("score_gpu_samples", None)
    pytest.importorskip("ai_edge_litert")
    import score_gpu_samples
    assert score_gpu_samples.main([str(tmp_path)]) == 2
    assert "no samples-<i>.npz" in capsys.readouterr().err


def test_train_for_leaves_no_reference_cycle_to_the_trainer(tmp_path):
    """The read_stats wrapper refers to the trainer: left on it, the trainer (and on a GPU its memory) outlives the
    run until a gc pass, into the next run's peak."""
    data_dir = make_demo_dataset(str(tmp_path / "demo"), seed=0)
    cfg = recipe(gpu_evidence.argparse.Namespace(preset="kaggle,smoke", set=[]), batch_size=4, check_every=2)
    from benchlib import load_data
    data = load_data(cfg, data_dir)[0]
    gc.collect()
    gc.disable()
    try:
        trainer, summary, history, syncs, skips = gpu_evidence.train_for(cfg, data, torch.device("cpu"), 0.5)
        assert syncs and summary.steps >= 1
        ref = weakref.ref(trainer)
        del trainer
        assert ref() is None
    finally:
        gc.enable()


def test_kill_command_and_outcome(tmp_path):
    cmd = gpu_evidence.kill_command(step=30, budget_s=120, out_dir=tmp_path)
    assert cmd[2:] == ["--gpus", "2", "--demo", "--preset", "smoke", "--set", "fault=kill@30", "--time-budget",
                       "120s", "--out", str(tmp_path)]
    images = np.zeros((5, 64, 64, 3), np.uint8)
    write_submission(images, str(tmp_path / "images.zip"), workers=1)
    (tmp_path / "report.json").write_text(json.dumps({"config": {"n_images": 5}, "degraded": True,
                                                      "failed_ranks": {"1": "killed by SIGKILL"}}))
    ok = gpu_evidence.kill_outcome(tmp_path, rc=0, wall_s=80.0, budget_s=120.0)
    assert ok["ok"] and ok["zip_verified"] and ok["degraded"] and ok["failed_ranks"] == {"1": "killed by SIGKILL"}
    late = gpu_evidence.kill_outcome(tmp_path, rc=0, wall_s=130.0, budget_s=120.0)
    assert not late["ok"] and not late["within_budget"]
    with zipfile.ZipFile(tmp_path / "images.zip", "a") as zf:  # a sixth image: the zip no longer verifies
        zf.writestr("extra.png", b"not a png")
    bad = gpu_evidence.kill_outcome(tmp_path, rc=0, wall_s=80.0, budget_s=120.0)
    assert not bad["ok"] and not bad["zip_verified"] and bad["zip_error"]
    hung = gpu_evidence.kill_outcome(tmp_path / "none", rc=124, wall_s=180.0, budget_s=120.0)
    assert not hung["ok"] and not hung["report"] and not hung["zip_verified"]


def test_kernel_command_and_a_run_without_a_failed_rank(tmp_path):
    cmd = gpu_evidence.kernel_command(device=torch.device("cuda"), budget_s=60, out_dir=tmp_path)
    assert cmd[1].endswith("kernel.py") and cmd[2:] == ["--demo", "--preset", "smoke", "--device", "cuda", "--gpus",
                                                        "1", "--time-budget", "60s", "--out", str(tmp_path)]
    write_submission(np.zeros((5, 64, 64, 3), np.uint8), str(tmp_path / "images.zip"), workers=1)
    (tmp_path / "report.json").write_text(json.dumps({"config": {"n_images": 5}, "degraded": False,
                                                      "reserve": {"generate": 1.0}, "phases": {"train": 40.0}}))
    run = gpu_evidence.kernel_outcome(tmp_path, rc=0, wall_s=50.0, budget_s=60.0)
    assert run["zip_verified"] and run["within_budget"] and run["reserve"] == {"generate": 1.0}
    assert run["phases"] == {"train": 40.0}
    assert not gpu_evidence.kill_outcome(tmp_path, rc=0, wall_s=50.0, budget_s=60.0)["ok"]  # no rank was lost


def test_bench_speed_json_keeps_the_rows_measured_before_a_failing_variant(tmp_path, monkeypatch):
    """A variant that dies (a failure, a kill at the timeout) must not lose the rows before it."""
    class Broken(bench_speed.NaiveGAN):
        def __init__(self, *a, **k):
            raise RuntimeError("variant failed")
    monkeypatch.setattr(bench_speed, "NaiveGAN", Broken)
    js = tmp_path / "speed.json"
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="variant failed"):
            bench_speed.main(["--json", str(js), "--device", "cpu", "--preset", "kaggle,smoke", "--batch", "4",
                              "--steps", "1", "--rounds", "1", "--warmup", "0", "--n-images", "20", "--synthetic",
                              "32", "--naive-workers", "0", "--set", "sample_batch=20"])
    finally:
        torch.set_num_threads(threads)
    doc = json.loads(js.read_text())
    assert doc["done"] is False and [r["name"][:3] for r in doc["rows"]] == ["(a)", "(b)"]


def test_markdown_survives_a_speed_bench_killed_before_any_row(tmp_path):
    """On the H200 the speed bench was killed while compiling, before any variant was timed: its rows had it_s None,
    the table's summary raised, and the script died before memory, predict and tests ran. The table now says so."""
    speed = {"command": "bench_speed.py", "rc": 124, "seconds": 88.4, "ok": False,
             "result": {"rows": [{"name": "(a) Trainer, amp auto", "it_s": None, "rates": []},
                                 {"name": "(b) Trainer, amp off", "it_s": 15.8, "rates": [15.8]}]}}
    meta = {"dry_run": False, "command": "gpu_evidence.py", "started": "now", "wall_s": 1.0}
    text = gpu_evidence.markdown({"speed": speed}, meta)
    assert "(a) Trainer, amp auto not measured" in text and "(b) Trainer, amp off 15.80 it/s" in text
    broken = {"rc": 0}  # a section whose record lacks what its summary reads: the table still comes out
    text = gpu_evidence.markdown({"finish": broken}, meta)
    assert "no summary: KeyError" in text
