"""Everything the first GPU should measure, in one process, in at most 9 minutes: one JSON and one markdown table.

    python tests/bench/gpu_evidence.py --make-npz tests/bench/runs/dogs64.npz   # here: the sample's crops (22.5 MiB)
    python tests/bench/gpu_evidence.py --dry-run --out /tmp/evidence             # the same script on the CPU, tiny, ~40 s
    python tests/bench/score_gpu_samples.py DIR --out tests/bench/results/gpu   # back here: score the samples

The device command (the `run` tool: carry ["tests/bench/runs/dogs64.npz"], timeout_s 580; checked here by appending
--dry-run with OUT=/tmp/out-dry):

    PYTHONUNBUFFERED=1 python3 tests/bench/gpu_evidence.py --npz tests/bench/runs/dogs64.npz --out "$OUT" > "$OUT/evidence.log" 2>&1; rc=$?; tail -n 40 "$OUT/evidence.log"; exit $rc

It leaves exactly 8 files under $OUT (what comes back): evidence.json, evidence.md, evidence.log, samples-1.npz,
samples-2.npz, samples-3.npz (uint8 [1000,64,64,3], compressed, < 12 MiB each), samples-grid.png, curves.png.
Everything else (bench_speed's JSON, the kill case's output, zips) goes to temporary folders.

--make-npz runs the kernel's own data loader (modules/data.load_dogs, the recipe's crop settings) on --data-dir
(default ../shared/data/dogs-1953) and stores the uint8 crops [N,64,64,3], labels and breed names. The GPU run reads that
file and drives the kernel's build_trainer / train_loop / build_sampler / write_submission directly (as bench_quality.py
does), so it needs neither the photos nor the annotations. Before measuring it applies the kernel's own backend and
thread configuration (modules/speed.configure_backends, configure_threads: cuDNN autotuning, TF32 on Ampere+).

Sections, in order of value (each one's failure is recorded and the next one runs; the JSON and the table are rewritten
after every section, so a run cut short still leaves what it measured). Budget on the H200, in seconds: "need" is what
a section must have left of --budget-s (default 540) to start, else it is skipped and says so:
  section      expected  need  what
  (start)          ~15     -   imports, CUDA initialisation, the .npz
  env               ~2     0   torch, CUDA, cuDNN, the GPU, the backends set, what amp=auto resolves to
  cuda_checks      ~15    20   tiny widths: fp16 steps with the GradScalers on and finite losses; an injected inf
                               gradient makes that optimiser step skipped (scale halves, weights unchanged); fused Adam
  quality         ~255   260   the recipe at amp=fp16 (Kaggle's T4: fp16 + GradScalers) on the crops for 240 s of
                               training; at --quality-points (60,150,240 s) --quality-n (1000) images from the shipped
                               generator as the finish makes them -> samples-<i>.npz, and samples-grid.png (a row each)
  kernel           ~60    70   kernel.py --demo --preset smoke --gpus 1 --time-budget 60s on the device: exit 0, zip
                               verified, within budget, report.json's finish reserve vs its measured phases
  train            ~40    45   --train-s (15) s each with amp=fp16 and amp=off, same seed: loss curves, scales, skipped
                               steps, non-finite losses, roll-backs, it/s, peak memory (curves.png)
  finish           ~20    30   the fp16 run's generator: 10,000 images, the zip written and verified; build + finish time
  speed           <=80    60   bench_speed.py (amp auto vs fp32 vs naive), subprocess killed at
                               100 s or when only 55 s are left (~80 s here); its JSON is written after every variant and chunk
  memory           ~30    40   bench_memory.measure at 32/64/128 images per rank (fp16, fp32) vs the CPU prediction
  kill2              0  0|180  two visible GPUs only (else skipped, as on the one-GPU H200): kernel.py --gpus 2 --demo
                               --preset smoke --set fault=kill@30 in a 120 s budget: rc, wall time, zip verified,
                               report.json's degraded and failed_ranks
  predict           ~5    10   FLOPs per step, the utilisation reached here, the P100 / two-T4 predictions re-stated
  tests          rest     30   the GPU-relevant test files (pytest on that machine's CPU), if time is left
  measured on the H200, 2026-12-04 (torch 2.11): env 11, cuda_checks 71, quality 243, kernel 38, train 29, finish 5,
  speed 88 (killed while compiling G and D; then 72 s without compiling, run on its own): the first steps of each new trainer
  took 12-16 s there, which cuda_checks pays three times
  total           ~535         of 540 (speed takes what memory and predict leave); the command's timeout_s 580
                               leaves ~5 of the 15 device minutes for the machine's start
"""
import argparse
import copy
import dataclasses
import gc
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flops  # noqa: E402
import bench_memory  # noqa: E402
from benchlib import ROOT, add_recipe_args, load_data, load_npz, md_table, mib, recipe, save_npz  # noqa: E402

from modules.data.demo import make_demo_dataset  # noqa: E402
from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.recipe.loop import build_loop_settings, train_loop  # noqa: E402
from modules.recipe.device import resolve_amp  # noqa: E402
from modules.recipe.sample import build_sampler  # noqa: E402
from modules.recipe.device import configure_backends, configure_threads  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import Deadline, seed_everything  # noqa: E402
from modules.run.budget import Pace, TrainPlan  # noqa: E402
from modules.run.distributed import DistContext  # noqa: E402
from modules.run.finish import fast_inference  # noqa: E402
from modules.run.report import save_grid  # noqa: E402
from modules.run.submission import verify_zip, write_submission  # noqa: E402

TEST_FILES = ("tests/test_train.py", "tests/test_speed.py", "tests/test_sample.py", "tests/test_loop.py",
              "tests/test_checkpoint.py")
MEMORY_PREDICTION = ROOT / "tests" / "bench" / "results" / "memory" / "results.json"


# data

def make_npz(path, cfg, data_dir):
    images_dir, annotation_dir = find_data_dir(data_dir)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                     crop_styles=tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip()),
                     include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers)
    save_npz(path, data, source=data_dir, images_found=data.stats.get("images_found", len(data.images)))
    return {"path": str(path), "crops": len(data.images), "classes": len(data.classes),
            "bytes": os.path.getsize(path)}


# helpers

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_skips(scaler):
    """Wrap scaler.update: a step whose gradients held an inf/NaN is skipped and the scale backs off (halves), so the
    scale's decreases count the skipped steps, accumulated on the device (no host sync per step). -> the counter."""
    box = {"n": torch.zeros((), dtype=torch.int64)}
    orig = scaler.update

    def update(new_scale=None):
        before = scaler._scale.clone() if getattr(scaler, "_scale", None) is not None else None
        orig(new_scale)
        if before is not None:
            box["n"] = box["n"].to(before.device) + (scaler._scale < before).to(torch.int64).sum()
    scaler.update = update
    return box


def instrument(trainer):
    """Record the loop's host syncs (read_stats, already a sync) with the scalers' state and skipped steps.
    -> (syncs, skips, detach): detach() removes the wrapper, which refers to the trainer and would otherwise keep it
    (and its device memory) alive in a reference cycle until the next gc."""
    skips = {"g": count_skips(trainer.scaler_g), "d": count_skips(trainer.scaler_d)}
    syncs = []
    read = trainer.read_stats

    def read_stats():
        out = read()
        syncs.append({"step": trainer.step_count, "loss_d": out[0], "loss_g": out[1], "nonfinite": out[2],
                      "scale_g": trainer.scaler_g.get_scale(), "scale_d": trainer.scaler_d.get_scale(),
                      "skipped_g": int(skips["g"]["n"]), "skipped_d": int(skips["d"]["n"])})
        return out
    trainer.read_stats = read_stats

    def detach():
        del trainer.read_stats  # the instance attribute: the class's method shows through again
        for scaler in (trainer.scaler_g, trainer.scaler_d):
            del scaler.update
    return syncs, skips, detach


def loop_segment(trainer, cfg, *, seconds, prior_train_s, plan_s, history):
    """The kernel's train_loop for `seconds` more, on a time plan of plan_s seconds in all (the LR schedule follows it
    as in a kernel run); no finish, no checkpoints (as bench_quality.train_segment)."""
    deadline = Deadline(seconds + 3600.0, start=time.monotonic())
    plan = TrainPlan(budget_s=seconds + 3600.0, estimates={}, finish_s=0.0, margin_s=0.0, train_until=seconds,
                     prior_train_s=prior_train_s, plan_s=plan_s, inherited=False, first_step_s=0.0,
                     gen_batch=cfg.sample_batch, gen_batch_s=0.0)
    return train_loop(trainer, settings=dataclasses.replace(build_loop_settings(cfg), checkpoint_s=0.0, max_steps=0),
                      pace=Pace(plan, deadline), ctx=DistContext(), stop_event=None, checkpoint_fn=None,
                      history=history, before_step=None)


def train_for(cfg, data, device, seconds):
    """The kernel's train_loop for `seconds`, through a plan spanning them; -> (trainer, summary, history, syncs,
    skips), the trainer free of this script's wrappers."""
    seed_everything(cfg.seed)
    trainer = build_trainer(cfg, data, device)
    syncs, skips, detach = instrument(trainer)
    history = {}
    summary = loop_segment(trainer, cfg, seconds=seconds, prior_train_s=0.0, plan_s=seconds, history=history)
    sync(device)
    detach()
    return trainer, summary, history, syncs, skips


def free_device(device):
    """Between runs: collect what is unreachable (cycles included) and return the cached blocks, then restart the peak
    counter, so the next run's peak is its own."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# sections

def s_env(ctx):
    dev = ctx.device
    out = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "amp_auto": str(resolve_amp("auto", dev)),
           "cpu_count": os.cpu_count(), "backends": ctx.backends,
           "cudnn_benchmark": torch.backends.cudnn.benchmark, "matmul_precision": torch.get_float32_matmul_precision(),
           "torch_threads": torch.get_num_threads()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   gpus_visible=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
        out["fork_probe"] = fork_probe()
    return out


FORK_PROBE = '''
import json, os, sys
sys.path.insert(0, sys.argv[1])
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
import torch
from modules.run.distributed import cuda_driver_initialised, visible_cuda_devices
seen = {"after_import": cuda_driver_initialised()}
seen["gpus_nvml"] = visible_cuda_devices()
seen["after_nvml_count"] = cuda_driver_initialised()
os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
torch.cuda.is_available()
seen["after_runtime_is_available"] = cuda_driver_initialised()
seen["torch_is_initialized"] = torch.cuda.is_initialized()
torch.zeros(1, device="cuda")
seen["after_cuda_op"] = cuda_driver_initialised()
print(json.dumps(seen))
'''


def fork_probe():
    """The kernel's check before it forks ranks (launch.cuda_driver_initialised), in a fresh process: False after
    import and the NVML count (the kernel may fork), True once an earlier notebook cell's plain
    torch.cuda.is_available() started the driver (it must not), True after a CUDA op. Only a real driver can say."""
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE, str(ROOT)], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    seen["as_expected"] = (not seen["after_import"] and not seen["after_nvml_count"]
                           and seen["after_runtime_is_available"] and seen["after_cuda_op"])
    return seen


def s_cuda_checks(ctx):
    """Tiny widths on the device: the reduced-precision path as a Kaggle GPU runs it."""
    dev, out = ctx.device, {}
    tiny, data = ctx.tiny_cfg, ctx.data
    for amp in ("auto", "fp16", "off"):
        cfg = dataclasses.replace(tiny, amp=amp)
        seed_everything(0)
        t = build_trainer(cfg, data, dev)
        for _ in range(ctx.tiny_steps):
            t.step()
        ld, lg, nonfinite = t.read_stats()
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(t.amp_dtype, "fp32")
        out[f"amp_{amp}"] = {"dtype": dtype, "scaler_enabled": t.scaler_g.is_enabled(),
                             "loss_d": ld, "loss_g": lg, "nonfinite": nonfinite, "finite": math.isfinite(ld + lg),
                             "fused_adam": bool(t.opt_g.defaults.get("fused"))}
    # an inf gradient under fp16: the G optimiser step is skipped, its scale halves, G's weights do not change
    cfg = dataclasses.replace(tiny, amp="fp16")
    seed_everything(0)
    t = build_trainer(cfg, data, dev)
    t.step()
    before = [p.detach().clone() for p in t.G.parameters()]
    scale0 = t.scaler_g.get_scale()
    hook = next(t.G.parameters()).register_hook(lambda g: g * float("inf"))
    t.step()
    hook.remove()
    scale1 = t.scaler_g.get_scale()
    unchanged = all(torch.equal(a, b.detach()) for a, b in zip(before, t.G.parameters()))
    out["inf_gradient"] = {"scale_before": scale0, "scale_after": scale1, "halved": scale1 == scale0 / 2,
                           "g_weights_unchanged": unchanged, "applies": t.scaler_g.is_enabled()}
    t0 = time.perf_counter()
    imgs = build_sampler(cfg, t, data).with_batch(16)(16)
    out["generate"] = {"shape": list(imgs.shape), "dtype": str(imgs.dtype), "seconds": time.perf_counter() - t0}
    bad = [k for k, v in out.items() if k.startswith("amp_") and not v["finite"]]
    if out["inf_gradient"]["applies"] and not (out["inf_gradient"]["halved"] and unchanged):
        bad.append("inf_gradient")
    out["ok"] = not bad
    out["failed"] = bad
    return out


def s_train(ctx):
    out = {}
    for amp in ("fp16", "off"):
        cfg = dataclasses.replace(ctx.cfg, amp=amp)
        free_device(ctx.device)
        t0 = time.perf_counter()
        trainer, summary, history, syncs, skips = train_for(cfg, ctx.data, ctx.device, ctx.train_s)
        r = {"amp": amp, "dtype": str(trainer.amp_dtype), "steps": summary.steps, "seconds": summary.seconds,
             "it_s": summary.it_per_s, "reason": summary.reason, "error": summary.error,
             "rollbacks": summary.rollbacks, "batch": trainer.batch_per_rank, "wall_s": time.perf_counter() - t0,
             "loss_d": history.get("loss_d", []), "loss_g": history.get("loss_g", []), "syncs": syncs,
             "nonfinite": sum(s["nonfinite"] for s in syncs),
             "skipped_g": int(skips["g"]["n"]), "skipped_d": int(skips["d"]["n"]),
             "final_scale_g": trainer.scaler_g.get_scale(), "final_scale_d": trainer.scaler_d.get_scale(),
             "kernel_precision": trainer.precision_summary() if hasattr(trainer, "precision_summary") else None}
        if ctx.device.type == "cuda":
            r["peak_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
            r["reserved_gib"] = torch.cuda.memory_reserved(ctx.device) / 2**30
        out[amp] = r
        if amp == "fp16":  # the finish samples this generator; the rest is freed before the fp32 run's peak
            ctx.fp16_sampler = build_sampler(cfg, trainer, ctx.data).with_model(
                copy.deepcopy(trainer.generator_to_ship()))
        del trainer
        free_device(ctx.device)
        ctx.results["train"] = out
        ctx.save()
    ends = {a: (out[a]["loss_d"][-1][1] if out[a]["loss_d"] else None) for a in out}
    out["final_loss_d"] = ends
    out["ok"] = all(out[a]["nonfinite"] == 0 and out[a]["reason"] in ("budget", "steps") for a in ("fp16", "off"))
    try:
        plot_curves(out, ctx.out / "curves.png")
        out["plot"] = "curves.png"
    except ImportError:
        out["plot"] = "matplotlib missing: no curves.png (the curves are in evidence.json)"
    return out


def s_quality(ctx):
    """The default recipe at amp=fp16 (Kaggle's T4: fp16 with GradScalers) for the last of ctx.quality_points seconds
    of training, on one time plan; at each point ctx.quality_n images from the shipped generator exactly as the finish
    makes them (Sampler.ready, fast_inference, the run's seed) -> samples-<i>.npz (uint8, compressed); one grid png
    with a row per point. score_gpu_samples.py scores the .npz files back home."""
    cfg = dataclasses.replace(ctx.cfg, amp="fp16")
    free_device(ctx.device)
    seed_everything(cfg.seed)
    trainer = build_trainer(cfg, ctx.data, ctx.device)
    syncs, skips, detach = instrument(trainer)
    sampler = build_sampler(cfg, trainer, ctx.data)
    plan_s, history, trained, points = ctx.quality_points[-1], {}, 0.0, []
    out = {"amp": "fp16", "plan_s": plan_s, "n": ctx.quality_n, "batch": trainer.batch_per_rank, "points": points,
           "syncs": syncs}
    grid = []
    for i, at in enumerate(ctx.quality_points, 1):
        summary = loop_segment(trainer, cfg, seconds=max(at - trained, 0.5), prior_train_s=trained, plan_s=plan_s,
                               history=history)
        trained += summary.seconds
        t0 = time.perf_counter()
        ready = sampler.ready()
        with fast_inference(ready.model(), ready.device):
            images = ready(ctx.quality_n, cfg.seed)  # [n,64,64,3] uint8, the same z at every point
        sample_s = time.perf_counter() - t0
        name = f"samples-{i}.npz"
        np.savez_compressed(ctx.out / name, images=images, train_s=trained, step=trainer.step_count,
                            seed=cfg.seed, amp="fp16", preset=cfg.preset)
        grid.append(images[:16])
        points.append({"file": name, "train_s": trained, "step": trainer.step_count, "n": len(images),
                       "sample_s": sample_s, "reason": summary.reason, "error": summary.error,
                       "rollbacks": summary.rollbacks, "it_s": summary.it_per_s, "bytes": (ctx.out / name).stat().st_size})
        out.update(steps=trainer.step_count, skipped_g=int(skips["g"]["n"]), skipped_d=int(skips["d"]["n"]),
                   nonfinite=sum(s["nonfinite"] for s in syncs), final_scale_g=trainer.scaler_g.get_scale(),
                   final_scale_d=trainer.scaler_d.get_scale(), loss_d=history.get("loss_d", []),
                   loss_g=history.get("loss_g", []))
        if ctx.device.type == "cuda":
            out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**30
        ctx.results["quality"] = out
        ctx.save()  # a run cut short keeps the points it made
        if summary.reason not in ("budget", "steps"):
            out["stopped"] = f"{summary.reason}: {summary.error}"
            break
    save_grid(np.concatenate(grid), ctx.out / "samples-grid.png", nrow=16)
    out["grid"] = "samples-grid.png (one row of 16 per point, the first images of each .npz)"
    detach()
    del trainer, sampler
    free_device(ctx.device)
    out["ok"] = "stopped" not in out and out["nonfinite"] == 0 and len(points) == len(ctx.quality_points)
    return out


def kill_command(*, step, budget_s, out_dir):
    """The two-GPU kill case (issue 26 §1): rank 1 dies by SIGKILL at `step`; rank 0 must still ship a verified zip
    within the budget."""
    return [sys.executable, str(ROOT / "kernel.py"), "--gpus", "2", "--demo", "--preset", "smoke", "--set",
            f"fault=kill@{step}", "--time-budget", f"{budget_s:g}s", "--out", str(out_dir)]


def kernel_outcome(out_dir, *, rc, wall_s, budget_s):
    """What a kernel.py run left in out_dir: exit code, wall time vs its budget, whether its zip verified, and from
    report.json degraded, failed_ranks, the finish reserve and the measured phases. -> (dict, report)."""
    out = {"rc": rc, "wall_s": wall_s, "budget_s": budget_s, "within_budget": wall_s <= budget_s}
    report_path, zip_path = Path(out_dir) / "report.json", Path(out_dir) / "images.zip"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    n_images = (report.get("config") or {}).get("n_images") or 10000
    out.update(report=report_path.is_file(), degraded=report.get("degraded"), failed_ranks=report.get("failed_ranks"),
               n_images=n_images, reserve=report.get("reserve"), phases=report.get("phases"),
               train=report.get("train"), precision=report.get("precision"), warnings=report.get("warnings"))
    if zip_path.is_file():
        try:
            verify_zip(str(zip_path), n_expected=n_images)
            out["zip_verified"] = True
        except Exception as exc:  # SubmissionError, or a zip that cannot be opened
            out["zip_verified"], out["zip_error"] = False, f"{type(exc).__name__}: {exc}"
    else:
        out["zip_verified"] = False
    return out


def kill_outcome(out_dir, *, rc, wall_s, budget_s):
    """The killed run: exit 0, a verified zip within the budget, and rank 1 named in report.json's failed_ranks."""
    out = kernel_outcome(out_dir, rc=rc, wall_s=wall_s, budget_s=budget_s)
    out["ok"] = rc == 0 and out["zip_verified"] and out["within_budget"] and bool(out["failed_ranks"])
    return out


def kernel_command(*, device, budget_s, out_dir):
    """The bundled kernel end to end on one device: the demo photos at the smoke preset's widths."""
    return [sys.executable, str(ROOT / "kernel.py"), "--demo", "--preset", "smoke", "--device", str(device), "--gpus",
            "1", "--time-budget", f"{budget_s:g}s", "--out", str(out_dir)]


def s_kernel(ctx):
    """kernel.py itself on the device (its main, finish, report: what no other section runs): exit 0, a verified zip,
    within its --time-budget, and its finish reserve beside the phases it measured."""
    if not ctx.kernel_budget_s:
        return {"skipped": "dry run: the suite runs the kernel end to end (tests/test_main.py)"}
    budget = ctx.kernel_budget_s
    with tempfile.TemporaryDirectory(prefix="evidence-kernel-") as tmp:
        cmd = kernel_command(device=ctx.device, budget_s=budget, out_dir=tmp)
        t0 = time.perf_counter()
        p = run_capped(cmd, timeout=min(budget + 30, ctx.left() - 5))
        out = kernel_outcome(tmp, rc=p.returncode, wall_s=time.perf_counter() - t0, budget_s=budget)
    out.update(command=" ".join(cmd[1:]), stdout_tail=p.stdout[-3000:], stderr_tail=p.stderr[-2000:])
    out["ok"] = p.returncode == 0 and out["zip_verified"] and out["within_budget"] and not out["degraded"]
    return out


def s_kill2(ctx):
    n = torch.cuda.device_count() if ctx.device.type == "cuda" else 0
    if n < 2:
        return {"skipped": f"{n} CUDA device(s) visible: the two-GPU kill case needs 2"}
    budget = ctx.kill_budget_s
    with tempfile.TemporaryDirectory(prefix="evidence-kill-") as tmp:
        cmd = kill_command(step=ctx.kill_step, budget_s=budget, out_dir=tmp)
        t0 = time.perf_counter()
        p = run_capped(cmd, timeout=min(budget + 60, ctx.left() - 5))
        out = kill_outcome(tmp, rc=p.returncode, wall_s=time.perf_counter() - t0, budget_s=budget)
    out.update(command=" ".join(cmd[1:]), stdout_tail=p.stdout[-2000:], stderr_tail=p.stderr[-2000:])
    return out


def plot_curves(train, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), dpi=80)
    for amp in ("fp16", "off"):
        r = train[amp]
        for ax, key in zip(axes, ("loss_d", "loss_g")):
            if r[key]:
                ax.plot([p[0] for p in r[key]], [p[1] for p in r[key]], label=f"amp={amp} ({r['steps']} steps)")
    for ax, key in zip(axes, ("loss_d", "loss_g")):
        ax.set_xlabel("training seconds")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def s_finish(ctx):
    sampler = ctx.fp16_sampler  # the fp16 run's shipped generator, as the kernel samples it (batch cfg.sample_batch)
    if sampler is None:
        return {"skipped": "no fp16 generator (the train section failed)"}
    dev, cfg, n = ctx.device, ctx.cfg, ctx.n_images
    t0 = time.perf_counter()
    images = sampler(n, cfg.seed)
    sync(dev)
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="evidence-zip-") as tmp:
        path = os.path.join(tmp, "images.zip")
        t0 = time.perf_counter()
        write_submission(images, path, workers=cfg.data_workers)
        zip_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        verify_zip(path, n_expected=n)
        verify_s = time.perf_counter() - t0
        size = os.path.getsize(path)
    fp16 = ctx.results.get("train", {}).get("fp16", {})
    build_s = ctx.build_s + fp16.get("wall_s", 0.0) - fp16.get("seconds", 0.0)  # data + the trainer's build
    return {"n_images": n, "generate_s": gen_s, "zip_s": zip_s, "verify_s": verify_s, "zip_mib": mib(size),
            "images_per_s": n / gen_s, "non_training_s": build_s + gen_s + zip_s + verify_s,
            "build_s": build_s,
            "note": "non_training_s = loading the data + building the trainer + generating + zipping + verifying; "
                    "a kernel run adds decoding the photos and its self-check"}


def s_memory(ctx):
    rows, errors = [], {}
    for amp in ctx.mem_amps:
        cfg = dataclasses.replace(ctx.cfg, amp=amp)
        for b in ctx.mem_batches:
            try:
                rows.append(bench_memory.measure(cfg, ctx.data, ctx.device, b, crops_per_image=ctx.crops_per_image,
                                                 profile=not ctx.args.dry_run))  # CUDA: max_memory_allocated
            except torch.cuda.OutOfMemoryError as exc:
                errors[f"{amp}@{b}"] = f"out of memory: {str(exc).splitlines()[0]}"
                torch.cuda.empty_cache()
    predicted = {}
    if MEMORY_PREDICTION.is_file():
        pred = json.loads(MEMORY_PREDICTION.read_text())
        predicted = {r["batch"]: r for r in pred["rows"]}
    for r in rows:
        p = predicted.get(r["batch"])
        if p and r["amp"] == "fp32":
            r["cpu_predicted_total"] = p["total"]
            r["cpu_predicted_step_peak"] = p["step_peak"]
    return {"rows": rows, "errors": errors, "prediction_file": str(MEMORY_PREDICTION) if predicted else None}


def s_predict(ctx):
    cfg = dataclasses.replace(ctx.cfg, amp="off")
    at = {}
    for b in (4, 8):
        torch.manual_seed(0)
        at[b] = bench_flops.step_flops(build_trainer(dataclasses.replace(cfg, batch_size=b), ctx.data, ctx.device))
    slope = (at[8] - at[4]) / 4
    per_step = {n: at[4] + slope * (ctx.cfg.batch_size // n - 4) for n in (1, 2)}
    out = {"flops_per_step": per_step, "batch": ctx.cfg.batch_size}
    train = ctx.results.get("train", {})
    env = ctx.results.get("env", {})
    name = env.get("gpu", "")
    peak = next(((fp32, fp16) for key, fp32, fp16 in bench_flops_peaks() if key.lower() in name.lower()), None)
    for amp, i in (("fp16", 1), ("off", 0)):
        r = train.get(amp)
        if r and r.get("it_s") and peak:
            used = per_step[1] * r["it_s"] / 1e12
            out[f"utilisation_{amp}"] = used / peak[i]
            out[f"tflops_{amp}"] = used
    window = bench_flops.parse_duration("8h45m") - bench_flops.NON_TRAINING_S
    t = build_trainer(cfg, ctx.data, ctx.device)
    grads = 4 * sum(p.numel() for m in (t.G, t.D) for p in m.parameters())  # fp32 gradients all-reduced per step
    out["predicted"] = bench_flops.predict(per_step, grad_bytes=grads, window_s=window)
    out["note"] = ("PREDICTIONS: the utilisation reached on this GPU (a different chip) says which end of each assumed "
                   "range is nearer; it does not measure a P100 or a T4")
    return out


def bench_flops_peaks():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_speed
    return bench_speed.PEAK_TFLOPS


def s_speed(ctx):
    js = Path(tempfile.mkdtemp(prefix="evidence-speed-")) / "speed.json"  # not under --out: it goes into evidence.json
    cmd = [sys.executable, str(ROOT / "tests" / "bench" / "bench_speed.py"), "--json", str(js), "--device",
           str(ctx.device), "--preset", ctx.speed_preset] + [a for s in ctx.args.set for a in ("--set", s)]
    cmd += ctx.speed_args
    t0 = time.perf_counter()
    p = run_capped(cmd, timeout=min(ctx.speed_timeout, ctx.left() - 55))  # 55 s: memory and predict still run
    out = {"command": " ".join(cmd[1:]), "rc": p.returncode, "seconds": time.perf_counter() - t0,
           "stdout_tail": p.stdout[-4000:], "stderr_tail": p.stderr[-2000:]}
    if js.is_file():
        out["result"] = json.loads(js.read_text())
    out["ok"] = p.returncode == 0 and out.get("result", {}).get("done", False)
    return out


def run_capped(cmd, *, timeout):
    """subprocess.run in the repository root; past `timeout` the child is killed, rc 124 (what it printed is kept)."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=str(ROOT))
    except subprocess.TimeoutExpired as exc:
        def text(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return subprocess.CompletedProcess(cmd, 124, text(exc.stdout),
                                           text(exc.stderr) + f"\n[killed after {timeout:.0f}s]")


def s_tests(ctx):
    if not ctx.test_files:
        return {"skipped": "dry run: the suite runs these files itself"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *ctx.test_files]
    t0 = time.perf_counter()
    p = run_capped(cmd, timeout=min(ctx.tests_timeout, ctx.left() - 5))
    return {"command": " ".join(cmd[1:]), "rc": p.returncode, "seconds": time.perf_counter() - t0,
            "summary": (p.stdout.strip().splitlines() or [""])[-1], "stdout_tail": p.stdout[-3000:],
            "ok": p.returncode == 0}


# name, function, seconds it needs (a function of the context): a section that would not fit in what is left of
# --budget-s is skipped, recorded as such; the order is the order of value
SECTIONS = (("env", s_env, lambda c: 0), ("cuda_checks", s_cuda_checks, lambda c: 20),
            ("quality", s_quality, lambda c: c.quality_points[-1] + 20),
            ("kernel", s_kernel, lambda c: c.kernel_budget_s + 10),
            ("train", s_train, lambda c: 2 * c.train_s + 15), ("finish", s_finish, lambda c: 30),
            ("speed", s_speed, lambda c: 60), ("memory", s_memory, lambda c: 40),
            ("kill2", s_kill2, lambda c: c.kill_budget_s + 60 if c.gpus >= 2 else 0),
            ("predict", s_predict, lambda c: 10), ("tests", s_tests, lambda c: 30))


# output

def markdown(results, meta):
    lines = [f"# GPU evidence ({'DRY RUN on the CPU: tiny widths, not evidence' if meta['dry_run'] else 'measured'})",
             "", f"`{meta['command']}`, {meta['started']}, {meta['wall_s']:.0f} s", ""]
    rows = []
    for name, _fn, _need in SECTIONS:
        r = results.get(name)
        if r is None:
            rows.append([name, "not run", ""])
        elif "traceback" in r:
            rows.append([name, "FAILED", r["error"][:160].replace("|", "/")])
        elif "skipped" in r:
            rows.append([name, "skipped", r["skipped"]])
        else:
            try:  # a summary that cannot be written must not end the run: evidence.json holds the whole result
                text = summarize(name, r)
            except Exception as exc:  # noqa: BLE001
                text = f"(no summary: {type(exc).__name__}: {exc}; see evidence.json)"
            rows.append([name, "ok" if r.get("ok", True) else "CHECK", text.replace("|", "/")])
    lines += [md_table(["section", "status", "result"], rows), ""]
    mem = results.get("memory", {}).get("rows")
    if mem:
        lines += ["Memory of one training step (max_memory_allocated on this device; CPU prediction from "
                  "tests/bench/results/memory):", ""]
        lines += [md_table(["images/rank", "precision", "step peak", "allocated at peak", "CPU-predicted total (fp32)"],
                           [[r["batch"], r["amp"], f"{mib(r['step_peak']):,.0f} MiB",
                             f"{r.get('cuda_max_allocated', r['total']) / 2**30:.2f} GiB",
                             f"{r['cpu_predicted_total'] / 2**30:.2f} GiB" if "cpu_predicted_total" in r else ""]
                            for r in mem]), ""]
    pred = results.get("predict", {}).get("predicted")
    if pred:
        lines += ["Predicted (not measured) steps in 8h45m:", ""]
        lines += [md_table(["setup", "utilisation assumed", "steps"],
                           [[p["setup"], f"{100 * p['util'][0]:.0f}-{100 * p['util'][1]:.0f}%",
                             f"{p['steps'][0] / 1e3:,.0f}k-{p['steps'][1] / 1e3:,.0f}k"] for p in pred]), ""]
    return "\n".join(lines) + "\n"


def summarize(name, r):
    if name == "env":
        return (f"{r.get('gpu', r['device'])} (sm {r.get('capability', '-')}, {r.get('memory_gib', 0):.1f} GiB), torch "
                f"{r['torch']}, CUDA {r['cuda']}, cuDNN {r['cudnn']}; amp auto -> {r['amp_auto']}")
    if name == "cuda_checks":
        inf = r["inf_gradient"]
        return (f"amp auto {r['amp_auto']['dtype']} finite {r['amp_auto']['finite']}, fp16 finite "
                f"{r['amp_fp16']['finite']}, fused Adam {r['amp_auto']['fused_adam']}; inf gradient: scale "
                f"{inf['scale_before']:g} -> {inf['scale_after']:g}, G unchanged {inf['g_weights_unchanged']}"
                + (f"; FAILED: {r['failed']}" if r["failed"] else ""))
    if name == "quality":
        return (f"amp=fp16, batch {r['batch']}: " + ", ".join(
            f"{p['file']} at {p['train_s']:.0f}s/step {p['step']} (n={p['n']}, sampled in {p['sample_s']:.1f}s)"
            for p in r["points"]) + f"; skipped G/D {r['skipped_g']}/{r['skipped_d']}, non-finite {r['nonfinite']}"
            + (f", peak {r['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in r else "")
            + (f"; STOPPED {r['stopped']}" if "stopped" in r else ""))
    if name == "kernel":
        res = r.get("reserve") or {}
        return (f"rc {r['rc']} in {r['wall_s']:.0f}s of {r['budget_s']:g}s, zip verified {r['zip_verified']}, "
                f"degraded {r['degraded']}; reserve {json.dumps(res)[:120]}; phases {json.dumps(r.get('phases'))[:120]}")
    if name == "kill2":
        return (f"rc {r['rc']} in {r['wall_s']:.0f}s of {r['budget_s']:g}s, zip verified {r['zip_verified']}, "
                f"degraded {r['degraded']}, failed ranks {r['failed_ranks']}")
    if name == "train":
        return "; ".join(f"amp={a}: {r[a]['steps']} steps in {r[a]['seconds']:.0f}s ({r[a]['it_s']:.2f} it/s, batch "
                         f"{r[a]['batch']}), skipped G/D {r[a]['skipped_g']}/{r[a]['skipped_d']}"
                         + (f" (kernel's count {r[a]['kernel_precision'].get('skipped_g')}/"
                            f"{r[a]['kernel_precision'].get('skipped_d')})" if r[a].get("kernel_precision") else "")
                         + ", scale G "
                         f"{r[a]['final_scale_g']:g}, non-finite {r[a]['nonfinite']}, roll-backs {r[a]['rollbacks']}, "
                         f"end {r[a]['reason']}"
                         + (f", peak {r[a]['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in r[a] else "")
                         for a in ("fp16", "off") if a in r)
    if name == "finish":
        return (f"{r['n_images']:,} images in {r['generate_s']:.1f}s, zip {r['zip_s']:.1f}s + verify "
                f"{r['verify_s']:.1f}s ({r['zip_mib']:.0f} MiB); non-training total {r['non_training_s']:.0f}s")
    if name == "memory":
        return ", ".join(f"{x['amp']}@{x['batch']}: {mib(x['step_peak']):,.0f} MiB step" for x in r["rows"]) + \
            (f"; errors {r['errors']}" if r["errors"] else "")
    if name == "predict":
        u = [f"{k}: {100 * v:.1f}%" for k, v in r.items() if k.startswith("utilisation_")]
        return f"{r['flops_per_step'][1] / 1e9:,.1f} GFLOP/step at {r['batch']}; utilisation here " + \
            (", ".join(u) or "n/a (no known peak)")
    if name == "speed":
        res = r.get("result", {})
        return f"rc {r['rc']} in {r['seconds']:.0f}s: " + ", ".join(  # it_s is None for a variant killed unmeasured
            f"{x['name']} " + (f"{x['it_s']:.2f} it/s" if x.get("it_s") is not None else "not measured")
            for x in res.get("rows", []))
    if name == "tests":
        return f"rc {r['rc']} in {r['seconds']:.0f}s: {r['summary']}"
    return ""


class Context:
    def __init__(self, args, out):
        self.args, self.out, self.results = args, out, {}
        self.fp16_sampler, self.meta = None, {}

    def left(self):
        return self.args.budget_s - (time.monotonic() - self.t0)

    def save(self):
        self.meta["wall_s"] = time.monotonic() - self.t0
        (self.out / "evidence.json").write_text(json.dumps({"meta": self.meta, "results": self.results}, indent=1,
                                                           default=str))
        (self.out / "evidence.md").write_text(markdown(self.results, self.meta))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--npz", default="", help="training crops made by --make-npz")
    p.add_argument("--make-npz", default="", metavar="PATH", help="write the crops of --data-dir to PATH and exit")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dogs-1953"))
    p.add_argument("--out", default="", help="output folder (default tests/bench/runs/evidence-<time>)")
    p.add_argument("--device", default="auto", help="auto (cuda when present) | cpu | cuda:N")
    p.add_argument("--train-s", type=float, default=15.0, help="train: seconds per precision (default 15)")
    p.add_argument("--quality-points", default="60,150,240", metavar="S,S,S",
                   help="quality: training seconds at which 1,000 samples are saved (default 60,150,240)")
    p.add_argument("--quality-n", type=int, default=1000, help="quality: images per point (default 1000)")
    p.add_argument("--kill-step", type=int, default=30, help="kill2: the step at which rank 1 is killed (default 30)")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall time for all sections (default 540)")
    p.add_argument("--dry-run", action="store_true", help="the same script on the CPU at tiny sizes (the test suite)")
    args = p.parse_args(argv)
    try:
        points = tuple(float(x) for x in args.quality_points.split(",") if x.strip())
    except ValueError:
        points = ()
    if not points or any(b <= a for a, b in zip((0.0,) + points, points)):
        p.error(f"--quality-points {args.quality_points!r}: give increasing positive seconds, e.g. 60,150,240")
    t_start = time.monotonic()
    cfg = recipe(args)
    if args.make_npz:
        info = make_npz(args.make_npz, cfg, args.data_dir)
        print(f"wrote {info['path']}: {info['crops']} crops, {info['classes']} classes, {mib(info['bytes']):.1f} MiB")
        return info
    out = Path(args.out or ROOT / "tests" / "bench" / "runs" / time.strftime("evidence-%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args, out)
    ctx.t0 = t_start
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if args.dry_run:  # the recipe at the smoke preset's widths, a few steps of everything
        device = torch.device("cpu")
        cfg = recipe(argparse.Namespace(preset=args.preset + ",smoke", set=args.set),
                     batch_size=4, sample_batch=50, check_every=2, snapshot_every=4, tick_s=5)
        ctx.tiny_cfg, ctx.tiny_steps = dataclasses.replace(cfg, batch_size=4), 1
        ctx.train_s, ctx.n_images, ctx.mem_batches, ctx.mem_amps = 2.0, 100, (4,), ("fp16",)
        ctx.speed_args = ["--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "0", "--n-images", "20",
                          "--synthetic", "32", "--naive-workers", "0", "--set", "sample_batch=20"]
        ctx.speed_preset = args.preset + ",smoke"
        ctx.quality_points, ctx.quality_n = (1.0, 2.0, 3.0), 20
        ctx.test_files = ()
        ctx.speed_timeout, ctx.tests_timeout = 120, 60
    else:
        ctx.tiny_cfg = dataclasses.replace(recipe(args, g_ch=8, d_ch=8, z_dim=20, shared_dim=8), batch_size=8)
        ctx.tiny_steps = 3
        ctx.train_s, ctx.n_images, ctx.mem_batches, ctx.mem_amps = args.train_s, 10000, (32, 64, 128), ("fp16", "off")
        ctx.speed_args = ["--batch", str(cfg.batch_size), "--steps", "30", "--rounds", "3", "--synthetic", "2085"]
        ctx.speed_preset = args.preset
        ctx.quality_points, ctx.quality_n = points, args.quality_n
        ctx.test_files = TEST_FILES
        ctx.speed_timeout, ctx.tests_timeout = 100, 150
    ctx.kill_step, ctx.kill_budget_s = args.kill_step, 120.0
    ctx.kernel_budget_s = 0.0 if args.dry_run else 60.0
    ctx.gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    # the kernel's own configuration (modules/run/setup.py does the same): cuDNN autotuning, TF32 on Ampere+, threads
    ctx.backends = f"{configure_backends(device)}; {configure_threads(cfg.threads, device)}"
    ctx.device, ctx.cfg = device, cfg
    t0 = time.perf_counter()
    if args.dry_run and not args.npz:  # exercise --make-npz on the kernel's synthetic demo photos
        root = make_demo_dataset(str(out / "demo-data"), seed=0)
        info = make_npz(out / "demo.npz", cfg, root)
        args.npz = str(out / "demo.npz")
        ctx.results["make_npz"] = info
    if args.npz:
        ctx.data = load_npz(args.npz)
        ctx.crops_per_image = ctx.data.crops_per_image
        desc = f"{args.npz}: {len(ctx.data.images)} crops, {len(ctx.data.classes)} classes"
    else:
        ctx.data, desc, ctx.crops_per_image = load_data(cfg, args.data_dir if Path(args.data_dir).exists() else None)
    ctx.build_s = time.perf_counter() - t0  # the data part of the non-training time (the trainer's build is added)
    ctx.meta = {"command": "python tests/bench/gpu_evidence.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "dry_run": args.dry_run,
                "data": desc, "config": dataclasses.asdict(cfg), "train_s": ctx.train_s,
                "quality_points": ctx.quality_points, "quality_n": ctx.quality_n}
    print(f"gpu_evidence: device {device}, data {desc}, out {out}", flush=True)
    for name, fn, need in SECTIONS:
        left = args.budget_s - (time.monotonic() - t_start)
        need = need(ctx)
        if left < need and not args.dry_run:
            ctx.results[name] = {"skipped": f"out of time ({left:.0f}s left of --budget-s {args.budget_s:g})"}
            continue
        t0 = time.perf_counter()
        try:
            ctx.results[name] = fn(ctx)
        except Exception as exc:  # recorded; the next section runs
            ctx.results[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}
        ctx.results[name]["section_s"] = time.perf_counter() - t0
        print(f"  {name}: {time.perf_counter() - t0:.1f}s "
              f"{'ERROR ' + ctx.results[name]['error'] if 'error' in ctx.results[name] else ''}", flush=True)
        ctx.save()
    ctx.save()
    print((out / "evidence.md").read_text())
    return ctx.results


if __name__ == "__main__":
    main()
