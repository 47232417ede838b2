"""Peak memory of one training step of a recipe, by component, at several batches per rank (run by hand; pytest does
not collect this file). Prints a markdown table and writes table.md / results.json into --out.

    OMP_NUM_THREADS=2 python tests/bench/bench_memory.py                       # default recipe, full width, 32/64/128
    python tests/bench/bench_memory.py --batches 32,64 --set amp=bf16           # autocast: 16-bit activations
    python tests/bench/bench_memory.py --preset kaggle,smoke --batches 8 --out /tmp/m   # seconds

Per batch: the kernel's own build_trainer(cfg, data, device), one step at batch 2 (Adam's states and the gradients
exist from then on, as in a run), then one step at the batch measured. Components:
  persistent (exact tensor bytes): G and D parameters and buffers (spectral norm's u/v, BN statistics), both Adam
  states, the EMA copy of G, the roll-back snapshot (trainer.snapshot(): a deep copy of the whole state), the uint8
  crop cache on the device (this data's, and scaled to Kaggle's 20,579 images), and the gradients of G and D;
  saved activations: bytes of the tensors autograd saves for backward (saved_tensors_hooks, storages counted once,
  parameters excluded), in the D step and in the G step (whose graph also runs through D);
  step peak: the highest memory the step itself allocated and held at once (gradients, saved tensors, temporaries,
  Adam's scratch): on the CPU from the profiler's memory timeline (torch.profiler, profile_memory), on CUDA
  torch.cuda.max_memory_allocated over the step minus what was allocated before it.
Predicted total = persistent (less the gradients, which the step re-allocates: set_to_none) + step peak. A GPU adds its
CUDA context (~0.3-0.5 GB, outside max_memory_allocated), cuDNN workspaces and the caching allocator's slack.
"""
import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import FULL_DATASET, ROOT, add_recipe_args, count_params, load_data, md_table, mib, recipe  # noqa: E402

from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import check_device  # noqa: E402

GPU_MEMORY_GIB = (("T4", 15.0), ("P100", 16.0))  # usable per GPU (T4: 16 GB card, ~15.0 GiB visible to torch)


def tensor_bytes(obj):
    """Bytes of every tensor in a nested dict/list (a state dict, a snapshot), storages counted once."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, torch.Tensor):
            key = (o.untyped_storage().data_ptr(), o.device)
            if key not in seen:
                seen.add(key)
                total += o.untyped_storage().nbytes()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return total


def module_bytes(m):
    return tensor_bytes(list(m.parameters())) + tensor_bytes(list(m.buffers()))


def persistent_bytes(trainer):
    G, D = trainer.G, trainer.D
    adam = sum(tensor_bytes([v for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0])
               for opt in (trainer.opt_g, trainer.opt_d) for st in opt.state.values())
    snap = trainer.snapshot()
    out = {"params_g": tensor_bytes(list(G.parameters())), "params_d": tensor_bytes(list(D.parameters())),
           "buffers": tensor_bytes(list(G.buffers()) + list(D.buffers())), "adam": adam,
           "ema": module_bytes(trainer.ema.model) if trainer.ema is not None else 0,
           "swa": module_bytes(trainer.swa) if trainer.swa is not None else 0,
           "snapshot": tensor_bytes(snap), "crop_cache": trainer.batches.images.untyped_storage().nbytes(),
           "grads": tensor_bytes([p.grad for p in list(G.parameters()) + list(D.parameters()) if p.grad is not None])}
    del snap
    return out


class SavedTensors:
    """saved_tensors_hooks that add up what autograd keeps for backward, per phase: "d" until the D step's
    scaler_d.update() (called whether or not the GradScaler skipped that optimiser step), then "g"."""

    def __init__(self, trainer):
        self.params = {p.untyped_storage().data_ptr() for m in (trainer.G, trainer.D) for p in m.parameters()}
        self.phase, self.seen, self.bytes = "d", set(), {"d": 0, "g": 0}
        self.trainer, update = trainer, trainer.scaler_d.update

        def switching_update(*args, **kw):
            update(*args, **kw)
            self.switch("g")
        trainer.scaler_d.update = switching_update

    def remove(self):
        del self.trainer.scaler_d.update  # the class's method again

    def switch(self, phase):
        self.phase, self.seen = phase, set()

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and (ptr, self.phase) not in self.seen:
            self.seen.add((ptr, self.phase))
            self.bytes[self.phase] += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def profiled_step_peak(trainer):
    """CPU: one step under torch.profiler -> the highest total of the memory the step allocated and held at once."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # the data behind export_memory_timeline
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        trainer.step()
    _times, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(torch.device("cpu"))
    return int(np.asarray(sizes).sum(axis=1).max()) if len(sizes) else 0


def measure(cfg, data, device, batch, *, crops_per_image=None, profile=True):
    """One recipe at one batch per rank -> dict of bytes (see the module docstring). profile=False on the CPU: no
    step peak (0; the profiler's timeline takes seconds even at tiny widths), the rest as always."""
    cfg = dataclasses.replace(cfg, batch_size=batch, batch_per_gpu=0)
    gc.collect()
    torch.manual_seed(cfg.seed)
    trainer = build_trainer(cfg, data, device)
    trainer.batch_per_rank = 2  # the first steps make the gradients and Adam's states (their size does not depend on B);
    for _ in range(20):  # under fp16 the GradScaler skips the first steps (inf at its initial scale): no Adam state yet
        trainer.step()
        if trainer.opt_g.state and trainer.opt_d.state:
            break
    trainer.batch_per_rank = batch
    row = {"batch": batch, "g_params": count_params(trainer.G), "d_params": count_params(trainer.D),
           "amp": {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(trainer.amp_dtype, "fp32")}
    row.update(persistent_bytes(trainer))
    n_crops = trainer.batches.n
    row["crop_cache_full"] = int(row["crop_cache"] / n_crops * FULL_DATASET * (crops_per_image or 1.0))
    saved = SavedTensors(trainer)
    t0 = time.perf_counter()
    with saved.hooks():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            trainer.step()
            torch.cuda.synchronize(device)
            row["step_peak"] = torch.cuda.max_memory_allocated(device) - base
            row["cuda_max_allocated"] = torch.cuda.max_memory_allocated(device)
            row["cuda_reserved"] = torch.cuda.memory_reserved(device)
        elif profile:
            row["step_peak"] = profiled_step_peak(trainer)
        else:
            trainer.step()
            row["step_peak"] = 0
    saved.remove()
    row["step_s"] = time.perf_counter() - t0
    row["saved_d"], row["saved_g"] = saved.bytes["d"], saved.bytes["g"]
    persistent = sum(row[k] for k in ("params_g", "params_d", "buffers", "adam", "ema", "swa", "snapshot"))
    row["persistent_no_cache"] = persistent
    row["total"] = persistent + row["crop_cache"] + row["step_peak"]
    row["total_full_cache"] = persistent + row["crop_cache_full"] + row["step_peak"]
    del trainer, saved
    gc.collect()
    return row


def format_rows(rows):
    head = ["images/rank", "precision", "G+D params", "buffers", "grads", "Adam (2 states)", "EMA", "snapshot",
            "crop cache (this data / 20,579 images)", "saved activations D step / G step", "step peak",
            "predicted total (full cache)", "of 16 GB (T4 ~15.0 GiB usable)"]
    out = []
    for r in rows:
        f = "{:,.0f} MiB".format
        out.append([r["batch"], r["amp"], f(mib(r["params_g"] + r["params_d"])), f(mib(r["buffers"])),
                    f(mib(r["grads"])), f(mib(r["adam"])), f(mib(r["ema"] + r["swa"])), f(mib(r["snapshot"])),
                    f"{f(mib(r['crop_cache']))} / {f(mib(r['crop_cache_full']))}",
                    f"{f(mib(r['saved_d']))} / {f(mib(r['saved_g']))}", f(mib(r["step_peak"])),
                    f"{r['total_full_cache'] / 2**30:.2f} GiB",
                    f"{100 * r['total_full_cache'] / 2**30 / 15.0:.0f}%"])
    return md_table(head, out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--batches", default="32,64,128", help="images per rank, comma-separated (default 32,64,128)")
    p.add_argument("--data-dir", default=None, help="real images or a crops .npz (default: the sample when present)")
    p.add_argument("--synthetic", type=int, default=0, help="N random crops instead of real data")
    p.add_argument("--device", default="cpu", help="cpu (default) | cuda")
    p.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "memory"))
    args = p.parse_args(argv)
    cfg = recipe(args)
    device = check_device(args.device)
    data, desc, per_image = load_data(cfg, args.data_dir, synthetic=args.synthetic)
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | recipe --preset "
          f"{args.preset} {' '.join('--set ' + s for s in args.set)} (g_ch {cfg.g_ch}, d_ch {cfg.d_ch}, "
          f"arch {cfg.arch})"
          f" | data {desc}", flush=True)
    rows = []
    for b in [int(x) for x in args.batches.split(",") if x.strip()]:
        rows.append(measure(cfg, data, device, b, crops_per_image=per_image))
        print(f"  batch {b}: step peak {mib(rows[-1]['step_peak']):,.0f} MiB, total "
              f"{rows[-1]['total_full_cache'] / 2**30:.2f} GiB ({rows[-1]['step_s']:.0f}s)", flush=True)
    table = format_rows(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python tests/bench/bench_memory.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "config": dataclasses.asdict(cfg), "data": desc}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    (out / "table.md").write_text(f"`{meta['command']}` ({meta['device']}, torch {meta['torch']}; {desc})\n\n"
                                  + table + "\n")
    print(f"written: {out}")
    return rows


if __name__ == "__main__":
    main()
