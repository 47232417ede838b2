"""Step cost of every preset at one batch size, on the current device (run by hand; not collected by pytest).

    python tests/bench/bench_presets.py [--batch 64] [--steps 2] [--presets kaggle,dcgan,...] [--device auto]

Full widths of each preset, synthetic uint8 data (speed does not depend on the pixels).
Prints a table: preset, arch, G/D parameters, seconds per step, it/s, and the peak CUDA memory where there is a GPU.
"""
import argparse
import dataclasses
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchlib import count_params  # noqa: E402
from modules.recipe.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import check_device  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_preset(name, *, batch, steps, device):
    cfg = dataclasses.replace(apply_overrides(Config(), PRESETS[name], name), batch_size=batch)
    rng = np.random.default_rng(0)
    n_classes = 120
    data = types.SimpleNamespace(images=rng.integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8),
                                 labels=np.arange(2000) % n_classes, classes=[str(i) for i in range(n_classes)])
    torch.manual_seed(0)
    trainer = build_trainer(cfg, data, device)
    trainer.set_progress(1.0)  # schedules: their end (speed is the same)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer.step()  # warm-up: allocator, cudnn autotune
    trainer.read_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.step()
    trainer.read_stats()
    _sync(device)
    sec = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {"preset": name, "arch": cfg.arch, "G params": count_params(trainer.G), "D params": count_params(trainer.D),
            "s/step": sec, "it/s": 1 / sec, "peak GiB": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--presets", default="kaggle,dcgan,dcgan5,dcgan-tricks")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = check_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"{args.steps} timed steps after 1 warm-up")
    print(f"| {'preset':<13} | {'arch':<7} | {'G params':>10} | {'D params':>10} | {'s/step':>8} | {'it/s':>7} | peak GiB |")
    print(f"|{'-' * 15}|{'-' * 9}|{'-' * 12}|{'-' * 12}|{'-' * 10}|{'-' * 9}|{'-' * 10}|")
    for name in args.presets.split(","):
        r = bench_preset(name.strip(), batch=args.batch, steps=args.steps, device=device)
        print(f"| {r['preset']:<13} | {r['arch']:<7} | {r['G params']:>10,} | {r['D params']:>10,} | {r['s/step']:>8.2f} | "
              f"{r['it/s']:>7.3f} | {r['peak GiB']:>8.2f} |", flush=True)


if __name__ == "__main__":
    main()
