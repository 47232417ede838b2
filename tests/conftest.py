"""Shared fixtures and helpers: the repo root, the bundled kernel, a runner for it, the real data sample when present,
and tiny in-process training pieces (CPU, tiny_data, tiny_cfg, window_plan, loop_kwargs)."""
import dataclasses
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL = ROOT / "kernel.py"
REAL_DATA = Path(os.environ.get("DOGS_DATA", ROOT.parent / "shared" / "data" / "dogs-1953"))

if str(ROOT) not in sys.path:  # plain `pytest` as well as `python -m pytest`
    sys.path.insert(0, str(ROOT))

from modules.recipe.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.recipe.loop import LoopSettings, build_loop_settings, train_loop  # noqa: E402
from modules.run.budget import Pace, TrainPlan  # noqa: E402 (after the path above)
from modules.run.distributed import DistContext  # noqa: E402
from modules.run.rank import fault_hook  # noqa: E402


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


# in-process training pieces at smoke widths (used by test_train, test_loop, test_checkpoint, test_finish, ...)

CPU = torch.device("cpu")


def tiny_data(n=16, n_classes=3, seed=0):
    """A stand-in for DogData: n random uint8 crops [n,64,64,3], labels cycling over n_classes breeds."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    labels = np.arange(n) % n_classes
    return types.SimpleNamespace(images=images, labels=labels, classes=[f"c{i}" for i in range(n_classes)],
                                 reference=images)


def tiny_cfg(**kw):
    """The smoke preset's Config with overrides."""
    cfg = apply_overrides(Config(), PRESETS["smoke"], "smoke")
    return dataclasses.replace(cfg, **kw)


def window_plan(deadline, seconds, *, finish_s=0.0, prior_train_s=0.0, plan_s=None, gen_batch=25, gen_batch_s=0.01):
    """A TrainPlan whose training window is the next `seconds` on deadline's clock (no finish measured)."""
    now = deadline.elapsed()
    return TrainPlan(budget_s=deadline.budget_s, estimates={"generate": 0.0, "zip": 0.0, "checkpoint": 0.0},
                     finish_s=finish_s, margin_s=0.0, train_until=now + seconds, prior_train_s=prior_train_s,
                     plan_s=plan_s or prior_train_s + seconds, inherited=False, first_step_s=0.0, gen_batch=gen_batch,
                     gen_batch_s=gen_batch_s)


def loop_kwargs(cfg, **kw):
    """run_loop's keywords from a Config, as run.train passes them (no checkpoints, no finish probe; the faults of
    cfg.fault injected), + overrides."""
    base = {**dataclasses.asdict(build_loop_settings(cfg)), "checkpoint_fn": None, "history": {}, "finish_probe": None,
            "before_step": fault_hook(cfg.fault, rank=0)}
    return {**base, **kw}


def run_loop(trainer, *, plan, deadline, stop_event, ctx=None, **kw):
    """train_loop on one rank, its LoopSettings and Pace made from loop_kwargs()-style keywords."""
    settings = LoopSettings(**{f.name: kw.pop(f.name) for f in dataclasses.fields(LoopSettings)})
    pace = Pace(plan, deadline, probe=kw.pop("finish_probe"))
    return train_loop(trainer, settings=settings, pace=pace, ctx=ctx or DistContext(), stop_event=stop_event, **kw)
