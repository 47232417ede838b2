"""torch CPU threads: 1 vs N for a generation batch and a training step at smoke widths (run by hand; not collected).

    python tests/bench/bench_threads.py [--threads 1,2] [--reps 15] [--preset smoke]

One process; the thread counts alternate rep by rep, so that load from other processes falls on each alike. Prints,
per thread count, the median and the worst seconds of a generation batch (Config.sample_batch images) and of a step.
The figures depend on what else runs on the machine: say so next to them. speed.choose_threads holds the decision.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import CPU, tiny_data  # noqa: E402
from modules.recipe.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.recipe.sample import build_sampler  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import cpu_count  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", default="1,2")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--preset", default="smoke")
    args = p.parse_args()
    cfg = Config()
    for name in args.preset.split(","):
        cfg = apply_overrides(cfg, PRESETS[name], name)
    data = tiny_data(n=64, n_classes=6)
    torch.manual_seed(0)
    trainer = build_trainer(cfg, data, CPU)
    sampler = build_sampler(cfg, trainer, data)  # the kernel's: a batch is Config.sample_batch images
    threads = [int(t) for t in args.threads.split(",")]
    times = {(n, part): [] for n in threads for part in ("generate", "step")}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for n in threads:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            sampler(sampler.batch)
            t1 = time.perf_counter()
            trainer.step()
            trainer.read_stats()
            t2 = time.perf_counter()
            if rep:
                times[n, "generate"].append(t1 - t0)
                times[n, "step"].append(t2 - t1)
    print(f"preset {args.preset}, sample_batch {cfg.sample_batch}, batch {cfg.batch_size}, {cpu_count()} cores, "
          f"{args.reps} reps, torch {torch.__version__}")
    print(f"{'threads':>7}  {'generate median':>15}  {'generate max':>12}  {'step median':>11}  {'step max':>8}")
    for n in threads:
        g, s = times[n, "generate"], times[n, "step"]
        print(f"{n:>7}  {statistics.median(g):>14.4f}s  {max(g):>11.4f}s  {statistics.median(s):>10.4f}s  "
              f"{max(s):>7.4f}s")


if __name__ == "__main__":
    main()
