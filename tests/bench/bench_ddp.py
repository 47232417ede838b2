"""Data-parallel throughput: one process against N ranks (torch.distributed + DDP, as kernel.py --gpus N runs them),
the same global batch, the same Trainer.step (run by hand; pytest does not collect this file). Prints a table: steps/s,
images/s and the speed-up over one process.

    python tests/bench/bench_ddp.py                          # CPU/gloo, 1 vs 2 ranks, smoke widths
    python tests/bench/bench_ddp.py --ranks 1,2,4 --g-ch 8   # more ranks, wider nets
    python tests/bench/bench_ddp.py --device cuda            # one rank per visible GPU (NCCL); not run by the author

On the CPU the N ranks share the cores (each gets cores // N threads), so the figure is about overhead (all-reduce,
per-rank batch), not a speed-up: only N separate devices can give one. Timings on a shared machine are noisy.
"""
import argparse
import dataclasses
import multiprocessing
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.recipe.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import cpu_count  # noqa: E402
from modules.run.distributed import DistContext, make_training_group  # noqa: E402
from modules.run.distributed import _free_port  # noqa: E402


def _data(n=256, n_classes=6):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    import types
    return types.SimpleNamespace(images=images, labels=np.arange(n) % n_classes,
                                 classes=[f"c{i}" for i in range(n_classes)], reference=images)


def _cfg(args):
    cfg = apply_overrides(Config(), PRESETS[args.preset], args.preset)
    return dataclasses.replace(cfg, batch_size=args.batch, g_ch=args.g_ch, d_ch=args.d_ch, ema_start=0)


def _rank(rank, world, port, args, threads, queue):
    import torch.distributed as dist
    torch.set_num_threads(threads)
    device = torch.device(f"cuda:{rank}" if args.device == "cuda" else "cpu")
    trainer_kw = {}
    if world > 1:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
        trainer_kw = dict(rank=rank, world_size=world)
    torch.manual_seed(0)
    trainer = build_trainer(_cfg(args), _data(), device, **trainer_kw)
    if world > 1:
        trainer.attach_group(make_training_group(DistContext(rank=rank, world_size=world), 120.0))
    for _ in range(args.warmup):
        trainer.step()
    trainer.read_stats()
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.step()
    trainer.read_stats()  # the host sync (and all-reduce of the stats) closes the timed steps
    dt = time.perf_counter() - t0
    if rank == 0:
        queue.put(dt)
    if world > 1:
        dist.destroy_process_group()


def measure(world, args):
    threads = max(1, (args.threads or cpu_count()) // world) if args.device == "cpu" else 1
    ctx = multiprocessing.get_context("fork")
    queue, port = ctx.Queue(), _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args, threads, queue)) for r in range(world)]
    for p in procs:
        p.start()
    dt = queue.get(timeout=3600)
    for p in procs:
        p.join()
    return dt, threads


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="kaggle")
    p.add_argument("--batch", type=int, default=16, help="global batch (split over the ranks)")
    p.add_argument("--g-ch", type=int, default=4)
    p.add_argument("--d-ch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="CPU threads to share over the ranks (0 = all cores)")
    args = p.parse_args()
    rows = []
    for world in [int(r) for r in args.ranks.split(",")]:
        dt, threads = measure(world, args)
        rows.append((world, threads, args.steps / dt, args.steps * args.batch / dt))
    base = rows[0][2]
    print(f"torch {torch.__version__}, {args.device}, {cpu_count()} cores, preset {args.preset}, g_ch {args.g_ch}, "
          f"d_ch {args.d_ch}, global batch {args.batch}, {args.steps} timed steps after {args.warmup}")
    print(f"{'ranks':>5} {'threads/rank':>12} {'steps/s':>8} {'images/s':>9} {'vs 1 rank':>9}")
    for world, threads, sps, ips in rows:
        print(f"{world:>5} {threads:>12} {sps:>8.2f} {ips:>9.1f} {sps / base:>8.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
