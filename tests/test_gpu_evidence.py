"""tests/bench/gpu_evidence.py --dry-run: the first GPU's one command runs end to end on the CPU at tiny sizes, so that
call cannot fail on a typo. One subprocess (its torch threads and seeds stay out of this process), ~40 s."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_evidence_dry_run(tmp_path):
    out = tmp_path / "evidence"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "bench" / "gpu_evidence.py"), "--dry-run", "--out",
                        str(out)], capture_output=True, text=True, timeout=600, cwd=str(ROOT), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "evidence.json").read_text())
    res = doc["results"]
    failed = {k: v.get("error") for k, v in res.items() if "traceback" in v}
    assert not failed, failed
    assert set(res) >= {"env", "cuda_checks", "train", "finish", "memory", "predict", "speed", "tests", "make_npz"}
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
