"""kernel.py's smoke path on an older torch, in a venv of its own (run by hand; not collected by pytest, not in CI).

    python tests/bench/bench_old_torch.py [--venv /tmp/oldtorch-venv] [--torch 2.1.2 --torchvision 0.16.2]
                                          [--presets kaggle,dcgan,dcgan5,dcgan-tricks] [--budget 300s]
                                          [--max-steps 20]

README promises torch >= 2.1 (P100 users need an older torch than Kaggle ships). This makes the venv when it is missing
(`pip install torch==X torchvision==Y "numpy<2"`: the PyPI wheels pull ~5 GB of CUDA packages, a few minutes; they are
needed even on CPU, since `import torch` 2.1 preloads them), then runs, for each preset,
`kernel.py --demo --preset P,smoke --set max_steps=N --set self_check=false` with the venv's python on one thread and
checks the zip with this interpreter. Prints a table: preset, exit code, wall seconds, steps, zip verified.
Too heavy for CI (the install alone is several GB); README says which versions it was run on.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.recipe.config import PRESETS  # noqa: E402
from modules.run.submission import verify_zip  # noqa: E402


def ensure_venv(venv, torch_version, torchvision_version):
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"making {venv} with torch {torch_version}, torchvision {torchvision_version} (several GB, minutes)")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version}",
                        f"torchvision=={torchvision_version}", "numpy<2", "scipy", "pillow"], check=True)
    probe = subprocess.run([str(python), "-c", "import torch, torchvision; print(torch.__version__, "
                            "torchvision.__version__)"], capture_output=True, text=True)
    if probe.returncode != 0:
        sys.exit(f"bench_old_torch: {venv}: torch does not import: {probe.stderr.strip().splitlines()[-1:]}")
    return python, probe.stdout.strip()


def run_preset(python, preset, *, budget, max_steps, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    args = [str(python), str(ROOT / "kernel.py"), "--demo", "--preset", f"{preset},smoke", "--time-budget", budget,
            "--out", str(out), "--set", "self_check=false", "--set", f"max_steps={max_steps}"]
    t0 = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=out.parent)
    wall = time.monotonic() - t0
    steps, verified = "-", "no"
    if proc.returncode == 0:
        try:
            verify_zip(out / "images.zip", n_expected=10000)
            verified = "yes"
        except Exception as exc:  # report it in the table, go on with the next preset
            verified = f"NO ({exc})"
        steps = json.loads((out / "report.json").read_text())["train"].get("total_steps", "-")
    else:
        print(f"--- {preset}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.returncode, wall, steps, verified


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "oldtorch-venv")
    p.add_argument("--torch", default="2.1.2")
    p.add_argument("--torchvision", default="0.16.2")
    p.add_argument("--presets", default=",".join(name for name in PRESETS if name != "smoke"))
    p.add_argument("--budget", default="300s")
    p.add_argument("--max-steps", type=int, default=20)
    args = p.parse_args()
    python, versions = ensure_venv(args.venv, args.torch, args.torchvision)
    print(f"torch/torchvision in {args.venv}: {versions}; kernel.py {ROOT / 'kernel.py'}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-old-torch-") as tmp:
        for preset in [s.strip() for s in args.presets.split(",") if s.strip()]:
            code, wall, steps, verified = run_preset(python, preset, budget=args.budget, max_steps=args.max_steps,
                                                     out=Path(tmp) / preset)
            rows.append((preset, code, wall, steps, verified))
            print(f"{preset:<14} exit {code:<3} wall {wall:6.1f}s  steps {steps!s:<5} zip verified: {verified}", flush=True)
    print(f"\n| preset | exit | wall s | steps | zip verified |  (torch {versions})\n| --- | --- | --- | --- | --- |")
    for preset, code, wall, steps, verified in rows:
        print(f"| {preset} | {code} | {wall:.1f} | {steps} | {verified} |")
    return 0 if all(r[1] == 0 and r[4] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
