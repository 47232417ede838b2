"""Does the recipe learn the breeds? tests/test_learning.py's run (the kaggle recipe at a small width on a set whose
breeds differ in colour, samples drawn per breed by the run's Sampler, classified by nearest mean colour) for several
seeds and step counts, and its negative control: labels shuffled before training, where the accuracy should fall to
chance (1/4). The logic lives in tests/test_learning.py (one copy); this prints a table.

    python tests/bench/bench_learning.py --seeds 0 1 2
    python tests/bench/bench_learning.py --seeds 0 --shuffle-labels

Measured (2 cores shared with other work, load average 2-4; 200 steps, width 4, batch 8): true labels, seeds 0 / 1 / 2:
0.998 / 0.976 / 0.890 (35-140 s each, by the load); shuffled labels, seeds 0 / 1: 0.240 / 0.178 (chance 0.25).
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: test_learning and its conftest

import benchlib  # noqa: E402,F401  (puts the repository root on sys.path)

from test_learning import LEARNING_STEPS, learned_accuracy  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=LEARNING_STEPS)
    p.add_argument("--shuffle-labels", action="store_true", help="negative control: train on permuted labels")
    args = p.parse_args(argv)
    print("| seed | steps | labels | accuracy (chance 0.25) | seconds | load average |\n|---|---|---|---|---|---|")
    for seed in args.seeds:
        t0 = time.monotonic()
        acc = learned_accuracy(seed, steps=args.steps, shuffle_labels=args.shuffle_labels)
        print(f"| {seed} | {args.steps} | {'shuffled' if args.shuffle_labels else 'true'} | {acc:.3f} | "
              f"{time.monotonic() - t0:.0f} | {os.getloadavg()[0]:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
