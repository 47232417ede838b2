"""Training speed of the kaggle model, ours against a plain implementation, in one process (run by hand; pytest does
not collect this file). Prints a table: it/s, peak memory, FLOPs and the fraction of the device's peak, steps that fit
in 9 h, and the times of data prep, sampling 10,000 images and writing the zip.

    python tests/bench/bench_speed.py                                  # GPU: kaggle model, batch 64
    python tests/bench/bench_speed.py --steps 3 --g-ch 8 --d-ch 8      # CPU: a few minutes

Variants (same model, losses, EMA and step structure; only the implementation differs):
  (a) Trainer, amp auto: uint8 data on the device, fp16/bf16 autocast, joint D forward, fused Adam, no per-step sync
  (b) Trainer, amp off (fp32)
  (c) naive: fp32; a DataLoader building each batch on the CPU from PIL crops (RandomHorizontalFlip, ToTensor,
      Normalize per item); separate D forwards on reals and fakes; default (non-fused) Adam; EMA by a per-parameter
      loop; `.item()` on both losses every step; cudnn.benchmark and TF32 matmuls at torch's defaults (off)
"""
import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchlib import count_params  # noqa: E402
from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.recipe.losses import LOSSES  # noqa: E402
from modules.recipe.models import build_models  # noqa: E402
from modules.recipe.device import resolve_amp  # noqa: E402
from modules.recipe.sample import generate_images  # noqa: E402
from modules.recipe.device import configure_backends  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.run.cli import parse_config  # noqa: E402
from modules.run.submission import write_submission  # noqa: E402

REAL_SAMPLE = ROOT.parent / "shared" / "data" / "dogs-1953"
FULL_DATASET = 20579  # images in Kaggle's all-dogs
NINE_HOURS_USABLE = 9 * 3600 * 0.9  # seconds of a 9 h kernel spent training (10% for start-up, sampling, zip)
# Dense peak TFLOP/s (fp32 without tensor cores, fp16 tensor cores; bf16 = fp16 where present). First match wins.
PEAK_TFLOPS = (("H200", 67.0, 989.0), ("H100 PCIe", 51.0, 756.0), ("H100", 67.0, 989.0), ("A100", 19.5, 312.0),
               ("V100", 15.7, 125.0), ("T4", 8.1, 65.0), ("P100", 9.3, 18.7))  # P100 PCIe (Kaggle): fp16 = 2x fp32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant, split over --rounds")
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds; it/s is the best round's")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 on CUDA, 2 on CPU)")
    p.add_argument("--g-ch", type=int, default=None, help="G width (default: the kaggle preset's)")
    p.add_argument("--d-ch", type=int, default=None, help="D width (default: the kaggle preset's)")
    p.add_argument("--data-dir", default=None, help=f"real images (default: {REAL_SAMPLE} when present)")
    p.add_argument("--synthetic", type=int, default=0, help="use N random uint8 images instead of real data")
    p.add_argument("--naive-workers", type=int, default=2, help="DataLoader workers of the naive variant")
    p.add_argument("--n-images", type=int, default=10000, help="images sampled and zipped")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--preset", default="kaggle", help="comma-separated presets, as kernel.py --preset (default kaggle)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a Config field")
    p.add_argument("--json", default="", help="also write the rows and timings to this JSON file")
    return p.parse_args(argv)


# helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def mem_reset(device):
    """Start a peak-memory window -> baseline bytes: CUDA allocated memory (peak stats reset), or the current RSS
    (the RSS high-water mark reset through Linux's clear_refs)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS, so each window gets its own peak
    except OSError:
        pass  # then the growth is against the high-water mark since start: later windows may read 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_peak(device, base):
    """Peak bytes above the baseline since mem_reset: CUDA max_memory_allocated, or ru_maxrss."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def device_peak(device):
    """-> (name, fp32 TFLOP/s, fp16 TFLOP/s) or (name, None, None)."""
    if device.type != "cuda":
        return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", None, None
    name = torch.cuda.get_device_name(device)
    for key, fp32, fp16 in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return name, fp32, fp16
    return name, None, None


def load_data(args, cfg):
    """-> (data with images/labels/classes, description, seconds to prep the full 20,579 or None)."""
    data_dir = args.data_dir or (str(REAL_SAMPLE) if REAL_SAMPLE.is_dir() else None)
    if args.synthetic or data_dir is None:
        n = args.synthetic or 2000
        rng = np.random.default_rng(0)
        data = argparse.Namespace(images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                                  labels=np.arange(n) % 120, classes=[f"breed{i}" for i in range(120)])
        return data, f"synthetic uint8, {n} images, 120 classes", None
    images_dir, annotation_dir = find_data_dir(data_dir)
    data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin, crop_styles=("box",),
                     workers=cfg.data_workers)
    found = data.stats["images_found"]
    desc = f"real, {found} images -> {len(data.images)} crops, {len(data.classes)} classes ({data_dir})"
    return data, desc, data.seconds * FULL_DATASET / max(found, 1)


# the naive reference

class NaiveDogs(Dataset):
    """The 64x64 crops kept as PIL images (decode-free); torchvision transforms build each item on the CPU."""

    def __init__(self, images, labels):
        self.images = [Image.fromarray(im) for im in images]
        self.labels = labels
        self.tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                      transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.tf(self.images[i]), int(self.labels[i])


class NaiveGAN:
    """The same model, losses, EMA and step structure as Trainer.step, written plainly (see the module docstring)."""

    def __init__(self, cfg, data, device, workers):
        self.cfg, self.device = cfg, device
        G, D = build_models(cfg, len(data.classes))
        self.G, self.D = G.to(device), D.to(device)
        self.ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2))
        self.d_loss, self.g_loss = LOSSES[cfg.loss]
        self.labels = torch.from_numpy(data.labels).long()
        self.loader = DataLoader(NaiveDogs(data.images, data.labels), batch_size=cfg.batch_size, shuffle=True,
                                 drop_last=True, num_workers=workers)
        self.lead_in = 2 * workers  # batches the workers prefetch at the start (prefetch_factor 2 per worker)
        self.it = None
        self.losses = []

    def restart(self):
        self.it = iter(self.loader)

    def stop(self):
        self.it = None  # shuts the workers down

    def batch(self):
        if self.it is None:
            self.restart()
        try:
            return next(self.it)
        except StopIteration:  # a new epoch (workers restart: persistent_workers is off by default)
            self.restart()
            return next(self.it)

    def fake_labels(self, n):
        return self.labels[torch.randint(len(self.labels), (n,))].to(self.device)

    def step(self):
        cfg, dev, B = self.cfg, self.device, self.cfg.batch_size
        real, y_real = self.batch()
        real, y_real = real.to(dev), y_real.to(dev)
        real = real + torch.rand_like(real) * cfg.real_noise
        y_fake = self.fake_labels(B)
        with torch.no_grad():
            fake = self.G(torch.randn(B, cfg.z_dim, device=dev), y_fake)
        real_logits, cls_real = self.D(real, y_real)
        fake_logits, _ = self.D(fake, y_fake)
        loss_d = self.d_loss(real_logits, fake_logits, real_target=cfg.real_label, margin=cfg.margin)
        if cls_real is not None and cfg.aux_weight:
            loss_d = loss_d + cfg.aux_weight * F.cross_entropy(cls_real, y_real)
        self.opt_d.zero_grad()
        loss_d.backward()
        self.opt_d.step()
        y_fake = self.fake_labels(B)
        fake_logits, cls_fake = self.D(self.G(torch.randn(B, cfg.z_dim, device=dev), y_fake), y_fake)
        loss_g = self.g_loss(real_logits.detach(), fake_logits)
        if cls_fake is not None and cfg.aux_weight:
            loss_g = loss_g + cfg.aux_weight * F.cross_entropy(cls_fake, y_fake)
        self.opt_g.zero_grad()
        loss_g.backward()
        self.opt_g.step()
        with torch.no_grad():
            for pe, p in zip(self.ema.parameters(), self.G.parameters()):
                pe.mul_(cfg.ema_decay).add_(p, alpha=1 - cfg.ema_decay)
            for be, b in zip(self.ema.buffers(), self.G.buffers()):
                be.copy_(b)
        self.losses.append((loss_d.item(), loss_g.item()))


# measuring

def build_variant(name, build, *, warmup, device, backends):
    """Build a variant and run its warm-up steps; its peak memory is measured over exactly this (the other variants'
    persistent memory is the baseline, subtracted)."""
    backends()
    base = mem_reset(device)
    t0 = time.perf_counter()
    obj = build()
    step = obj.step if isinstance(obj, NaiveGAN) else trainer_step(obj)
    for _ in range(warmup):
        step()
    finish(obj, device)
    v = {"name": name, "obj": obj, "step": step, "backends": backends, "peak": mem_peak(device, base),
         "warmup_s": time.perf_counter() - t0, "amp": getattr(obj, "amp_dtype", None), "rates": []}
    if isinstance(obj, NaiveGAN):
        obj.stop()
    print(f"  built {name}: warm-up {v['warmup_s']:.1f}s, peak {fmt_bytes(v['peak'])}", flush=True)
    return v


def time_chunk(v, steps, device):
    """Time `steps` steps of one variant, synchronised at both ends; appends its it/s to v["rates"]."""
    v["backends"]()
    obj = v["obj"]
    if isinstance(obj, NaiveGAN):  # fresh workers, and the prefetch burst they start with is not timed
        obj.restart()
        for _ in range(obj.lead_in):
            v["step"]()
    finish(obj, device)
    t0 = time.perf_counter()
    for _ in range(steps):
        v["step"]()
    finish(obj, device)
    v["rates"].append(steps / (time.perf_counter() - t0))
    if isinstance(obj, NaiveGAN):
        obj.stop()  # idle workers would prefetch (and use CPU) while the other variants are timed


def trainer_step(trainer, check_every=50):
    def step():
        trainer.step()
        if trainer.step_count % check_every == 0:
            trainer.read_stats()  # the loop's periodic sync
    return step


def finish(obj, device):
    if not isinstance(obj, NaiveGAN):
        obj.read_stats()
    sync(device)


def count_step_flops(cfg, data, device):
    """FLOPs of one full GAN step (D step + G step, forward and backward) as counted by FlopCounterMode."""
    trainer = build_trainer(dataclasses.replace(cfg, amp="off"), data, device)
    trainer.step()
    with FlopCounterMode(display=False) as counter:
        trainer.step()
    sync(device)
    return counter.get_total_flops()


def write_json(path, meta, rows, *, done):
    """--json after every variant's build and every timed chunk, so a slow variant that is killed leaves
    the rows measured before it; `done` says the run reached its end. Rows without a timed chunk have it_s null."""
    if not path:
        return
    out = dict(meta, done=done, rows=[{"name": r["name"], "it_s": max(r["rates"]) if r["rates"] else None,
                                       "rates": r["rates"], "peak_bytes": r["peak"], "warmup_s": r["warmup_s"],
                                       "amp": str(r["amp"])} for r in rows])
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, path)


def fmt_bytes(n):
    return f"{n / 2**20:,.0f} MiB" if n >= 0 else "n/a"


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    warmup = args.warmup if args.warmup is not None else (10 if device.type == "cuda" else 2)
    cfg = parse_config(["--preset", args.preset] + [a for s in args.set for a in ("--set", s)])[0]
    cfg = dataclasses.replace(cfg, batch_size=args.batch, g_ch=args.g_ch or cfg.g_ch, d_ch=args.d_ch or cfg.d_ch)
    name, peak32, peak16 = device_peak(device)
    torch_defaults = (torch.backends.cudnn.benchmark, torch.get_float32_matmul_precision())

    def ours_backends():
        configure_backends(device)

    def naive_backends():
        torch.backends.cudnn.benchmark, precision = torch_defaults
        torch.set_float32_matmul_precision(precision)

    print(f"device {name} | torch {torch.__version__} | python {platform.python_version()}", flush=True)
    data, data_desc, prep_full_s = load_data(args, cfg)
    G0, D0 = build_models(cfg, len(data.classes))
    print(f"model: preset {args.preset} {' '.join('--set ' + s for s in args.set)} ({cfg.arch}, loss {cfg.loss}), g_ch {cfg.g_ch} d_ch {cfg.d_ch}, "
          f"G {count_params(G0) / 1e6:.2f}M D {count_params(D0) / 1e6:.2f}M params, batch {cfg.batch_size}, "
          f"joint D forward {D0.joint_ok} | data: {data_desc}")
    print(f"measuring: {warmup} warm-up steps, then {args.steps} timed steps per variant in "
          f"{max(1, min(args.rounds, args.steps))} round-robin rounds", flush=True)
    del G0, D0

    ours_backends()
    flops = count_step_flops(cfg, data, device)  # also primes the process (allocator, thread pools) before measuring
    builds = [("(a) Trainer, amp auto", lambda: build_trainer(dataclasses.replace(cfg, amp="auto"), data, device),
               ours_backends),
              ("(b) Trainer, amp off", lambda: build_trainer(dataclasses.replace(cfg, amp="off"), data, device),
               ours_backends),
              (f"(c) naive, {args.naive_workers} workers", lambda: NaiveGAN(cfg, data, device, args.naive_workers),
               naive_backends)]
    meta = {"device": name, "torch": torch.__version__, "batch": cfg.batch_size, "g_ch": cfg.g_ch, "d_ch": cfg.d_ch,
            "flops_per_step": flops, "peak_tflops": {"fp32": peak32, "fp16": peak16}, "n_images": args.n_images,
            "prep_full_s": prep_full_s}
    variants = []
    for vname, build, backends in builds:
        variants.append(build_variant(vname, build, warmup=warmup,
                                      device=device, backends=backends))
        write_json(args.json, meta, variants, done=False)
    rounds = max(1, min(args.rounds, args.steps))
    chunk = math.ceil(args.steps / rounds)
    for r in range(rounds):  # round-robin, so a slow spell on a shared machine hits every variant alike
        for v in variants:
            time_chunk(v, chunk, device)
            write_json(args.json, meta, variants, done=False)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{v['name'][:3]} {v['rates'][-1]:.3f}" for v in variants)
              + " it/s", flush=True)
    rows = [{k: v[k] for k in ("name", "peak", "warmup_s", "amp", "rates")} for v in variants]
    for row in rows:
        row["it_s"] = max(row["rates"])  # best round: the least disturbed
    del variants
    gc.collect()

    G = build_models(cfg, len(data.classes))[0].to(device)
    label_counts = np.bincount(data.labels, minlength=len(data.classes))
    generate_images(G, n=min(args.n_images, 2 * cfg.sample_batch), z_dim=cfg.z_dim, label_counts=label_counts,
                    truncation=cfg.truncation, batch_size=cfg.sample_batch, device=device,
                    amp_dtype=resolve_amp("auto", device))  # warm-up
    t0 = time.perf_counter()
    images = generate_images(G, n=args.n_images, z_dim=cfg.z_dim, label_counts=label_counts,
                             truncation=cfg.truncation, batch_size=cfg.sample_batch, device=device,
                             amp_dtype=resolve_amp("auto", device))
    sample_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="bench-zip-") as tmp:
        t0 = time.perf_counter()
        write_submission(images, str(Path(tmp) / "images.zip"), workers=cfg.data_workers)
        zip_s = time.perf_counter() - t0

    naive = next(r for r in rows if r["name"].startswith("(c)"))["it_s"]
    print()
    print(f"device: {name} | torch {torch.__version__} | batch {cfg.batch_size} | g_ch {cfg.g_ch} d_ch {cfg.d_ch} | "
          f"{args.steps} timed steps in {len(rows[0]['rates'])} rounds after {warmup} warm-up")
    print(f"FLOPs per GAN step (D step + G step, fwd + bwd, convs/matmuls; FlopCounterMode): {flops / 1e9:,.2f} GFLOP")
    head = f"{'variant':34} {'it/s':>8} {'spread':>7} {'ms/step':>8} {'x naive':>8} {'peak mem':>10} {'warm-up':>8} " \
           f"{'TFLOP/s':>8} {'% peak':>7} {'steps in 9h':>12}"
    print(head)
    print("-" * len(head))
    for r in rows:
        tflops = flops * r["it_s"] / 1e12
        peak = peak16 if r["amp"] in (torch.float16, torch.bfloat16) else peak32
        frac = f"{100 * tflops / peak:.1f}%" if peak else "n/a"
        spread = 100 * (max(r["rates"]) - min(r["rates"])) / max(r["rates"])
        print(f"{r['name']:34} {r['it_s']:8.3f} {spread:6.0f}% {1000 / r['it_s']:8.1f} {r['it_s'] / naive:7.2f}x "
              f"{fmt_bytes(r['peak']):>10} {r['warmup_s']:7.1f}s {tflops:8.3f} {frac:>7} "
              f"{r['it_s'] * NINE_HOURS_USABLE:12,.0f}")
    mem_kind = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "ru_maxrss growth"
    peaks = (f"of {peak16:g} TFLOP/s (fp16) for autocast rows, else of {peak32:g} (fp32; with TF32 on Ampere+ "
             f"an fp32 row can exceed 100%)") if peak32 else "n/a (no peak known for this device)"
    print(f"it/s: best of {len(rows[0]['rates'])} round-robin rounds (spread: (best - worst) / best); peak mem: "
          f"{mem_kind}, over build + warm-up, above the other variants' memory;\n% peak: {peaks}; "
          f"steps in 9h = it/s x 9 h x 0.9")
    prep = f"{prep_full_s:.1f}s (load_dogs on the sample, scaled to {FULL_DATASET:,} images)" if prep_full_s else \
        "n/a (no real sample)"
    print(f"data prep: {prep}")
    print(f"sampling {args.n_images:,} images (generate_images, batch {cfg.sample_batch}): {sample_s:.1f}s")
    print(f"writing the verified zip (write_submission, {cfg.data_workers} workers): {zip_s:.1f}s")
    meta.update(sample_s=sample_s, zip_s=zip_s)
    write_json(args.json, meta, rows, done=True)

if __name__ == "__main__":
    main()
