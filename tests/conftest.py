"""Shared fixtures: the repo root, the bundled kernel, a runner for it, and the real data sample when present."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "kernel.py"
REAL_DATA = Path(os.environ.get("DOGS_DATA", ROOT.parent / "shared" / "data" / "dogs-1953"))

if str(ROOT) not in sys.path:  # plain `pytest` as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def real_data():
    if not (REAL_DATA / "all-dogs").is_dir():
        pytest.skip(f"real data sample not found at {REAL_DATA} (set DOGS_DATA)")
    return REAL_DATA


def run_kernel(args, *, timeout=400, env=None, script=KERNEL):
    """Run `python kernel.py ARGS` in a subprocess -> (CompletedProcess, wall seconds measured from outside)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)
    return proc, time.monotonic() - t0
