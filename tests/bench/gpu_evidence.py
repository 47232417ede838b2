"""Everything the first GPU should measure, in one process, in at most ~8 minutes: one JSON and one markdown table.

    python tests/bench/gpu_evidence.py --make-npz dogs64.npz                 # here: the sample's crops -> .npz (~25 MB)
    python tests/bench/gpu_evidence.py --npz dogs64.npz --out evidence/      # on the GPU machine (no ../shared there)
    python tests/bench/gpu_evidence.py --dry-run --out /tmp/evidence          # the same script on the CPU, tiny, ~30 s

--make-npz runs the kernel's own data loader (modules/data.load_dogs, the recipe's crop settings) on --data-dir
(default ../shared/data/dogs-1953) and stores the uint8 crops [N,64,64,3], labels and breed names. The GPU run reads that
file and drives the kernel's build_trainer / train_loop / build_sampler / write_submission directly (as bench_quality.py does),
so it needs neither the photos nor the annotations.

Sections, in order of importance (each one's failure is recorded and the next one runs; the JSON and the table are
rewritten after every section, so a run cut short still leaves what it measured):
  env          torch, CUDA, cuDNN, the GPU, what amp=auto resolves to, whether torch.compile is allowed
  cuda_checks  tiny-width checks on the device: fp16 steps with the GradScalers on and finite losses; an injected inf
               gradient makes that optimiser step skipped (scale halves, weights unchanged); fused Adam; generation
  train        the recipe (--preset/--set) for --train-s seconds each with amp=fp16 and amp=off, same seed and data:
               loss curves, scaler scales, skipped steps, non-finite losses, roll-backs, it/s, peak memory
  finish       the fp16 run's generator: 10,000 images on the device, the zip written and verified; build + finish time
  memory       bench_memory.measure at 32/64/128 images per rank (fp16 and fp32): max_memory_allocated per step vs the
               CPU prediction in tests/bench/results/memory/results.json
  predict      FLOPs per step (bench_flops), the utilisation reached here, and the P100 / two-T4 predictions re-stated
  speed        tests/bench/bench_speed.py at full width (amp auto vs fp32 vs naive, compiled where allowed), subprocess
  tests        the GPU-relevant test files (pytest, subprocess; they run on the CPU of that machine)
"""
import argparse
import copy
import dataclasses
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flops  # noqa: E402
import bench_memory  # noqa: E402
from benchlib import ROOT, add_recipe_args, load_data, load_npz, md_table, mib, recipe, save_npz  # noqa: E402

from modules.data import find_data_dir, load_dogs  # noqa: E402
from modules.demo import make_demo_dataset  # noqa: E402
from modules.distributed import DistContext  # noqa: E402
from modules.loop import build_loop_settings, train_loop  # noqa: E402
from modules.pace import Pace  # noqa: E402
from modules.plan import TrainPlan  # noqa: E402
from modules.sample import build_sampler  # noqa: E402
from modules.speed import compile_support  # noqa: E402
from modules.submission import verify_zip, write_submission  # noqa: E402
from modules.precision import resolve_amp  # noqa: E402
from modules.train import build_trainer  # noqa: E402
from modules.utils import Deadline, seed_everything  # noqa: E402

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
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers, keep_reference=False)
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


def train_for(cfg, data, device, seconds):
    """The kernel's train_loop for `seconds`, through a plan spanning them; -> (trainer, summary, history, syncs)."""
    seed_everything(cfg.seed)
    trainer = build_trainer(cfg, data, device)
    skips = {"g": count_skips(trainer.scaler_g), "d": count_skips(trainer.scaler_d)}
    syncs = []
    read = trainer.read_stats

    def read_stats():  # the loop's host syncs: record the scalers' state there (already a sync)
        out = read()
        syncs.append({"step": trainer.step_count, "loss_d": out[0], "loss_g": out[1], "nonfinite": out[2],
                      "scale_g": trainer.scaler_g.get_scale(), "scale_d": trainer.scaler_d.get_scale(),
                      "skipped_g": int(skips["g"]["n"]), "skipped_d": int(skips["d"]["n"])})
        return out
    trainer.read_stats = read_stats
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    history = {}
    deadline = Deadline(seconds + 3600.0, start=time.monotonic())
    plan = TrainPlan(budget_s=seconds + 3600.0, estimates={}, finish_s=0.0, margin_s=0.0, train_until=seconds,
                     prior_train_s=0.0, plan_s=seconds, inherited=False, first_step_s=0.0,
                     gen_batch=cfg.sample_batch, gen_batch_s=0.0)
    summary = train_loop(trainer, settings=dataclasses.replace(build_loop_settings(cfg), checkpoint_s=0.0, max_steps=0),
              pace=Pace(plan, deadline), ctx=DistContext(), stop_event=None, checkpoint_fn=None,
              history=history, before_step=None)
    sync(device)
    return trainer, summary, history, syncs, skips


# sections

def s_env(ctx):
    dev = ctx.device
    out = {"torch": torch.__version__, "python": platform.python_version(), "device": str(dev),
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
           else None, "amp_auto": str(resolve_amp("auto", dev)), "compile": compile_support(dev),
           "cpu_count": os.cpu_count()}
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   gpus_visible=torch.cuda.device_count(), bf16=torch.cuda.is_bf16_supported())
    return out


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
        if ctx.device.type == "cuda":
            torch.cuda.empty_cache()
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
    js = ctx.out / "speed.json"
    cmd = [sys.executable, str(ROOT / "tests" / "bench" / "bench_speed.py"), "--json", str(js), "--device",
           str(ctx.device), "--preset", ctx.speed_preset] + [a for s in ctx.args.set for a in ("--set", s)]
    cmd += ctx.speed_args
    t0 = time.perf_counter()
    p = run_capped(cmd, timeout=min(ctx.speed_timeout, ctx.left() - 5))
    out = {"command": " ".join(cmd[1:]), "rc": p.returncode, "seconds": time.perf_counter() - t0,
           "stdout_tail": p.stdout[-4000:], "stderr_tail": p.stderr[-2000:]}
    if js.is_file():
        out["result"] = json.loads(js.read_text())
    out["ok"] = p.returncode == 0
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


SECTIONS = (("env", s_env, 0), ("cuda_checks", s_cuda_checks, 20), ("train", s_train, None), ("finish", s_finish, 30),
            ("memory", s_memory, 40), ("predict", s_predict, 10), ("speed", s_speed, None), ("tests", s_tests, None))


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
            rows.append([name, "ok" if r.get("ok", True) else "CHECK", summarize(name, r).replace("|", "/")])
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
                f"{r['torch']}, CUDA {r['cuda']}, cuDNN {r['cudnn']}; amp auto -> {r['amp_auto']}; compile "
                f"{r['compile'][0]}")
    if name == "cuda_checks":
        inf = r["inf_gradient"]
        return (f"amp auto {r['amp_auto']['dtype']} finite {r['amp_auto']['finite']}, fp16 finite "
                f"{r['amp_fp16']['finite']}, fused Adam {r['amp_auto']['fused_adam']}; inf gradient: scale "
                f"{inf['scale_before']:g} -> {inf['scale_after']:g}, G unchanged {inf['g_weights_unchanged']}"
                + (f"; FAILED: {r['failed']}" if r["failed"] else ""))
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
        return f"rc {r['rc']} in {r['seconds']:.0f}s: " + ", ".join(
            f"{x['name']} {x['it_s']:.2f} it/s" for x in res.get("rows", []))
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
    p.add_argument("--train-s", type=float, default=90.0, help="training seconds per precision (default 90)")
    p.add_argument("--budget-s", type=float, default=480.0, help="wall time for all sections (default 480)")
    p.add_argument("--dry-run", action="store_true", help="the same script on the CPU at tiny sizes (the test suite)")
    args = p.parse_args(argv)
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
        torch.set_num_threads(1)
        cfg = recipe(argparse.Namespace(preset=args.preset + ",smoke", set=args.set),
                     batch_size=4, sample_batch=50, check_every=2, snapshot_every=4, tick_s=5)
        ctx.tiny_cfg, ctx.tiny_steps = dataclasses.replace(cfg, batch_size=4), 1
        ctx.train_s, ctx.n_images, ctx.mem_batches, ctx.mem_amps = 2.0, 100, (4,), ("fp16",)
        ctx.speed_args = ["--batch", "4", "--steps", "1", "--rounds", "1", "--warmup", "0", "--n-images", "20",
                          "--synthetic", "32", "--naive-workers", "0", "--compile", "off", "--set", "sample_batch=20"]
        ctx.speed_preset = args.preset + ",smoke"
        ctx.test_files = ()
        ctx.speed_timeout, ctx.tests_timeout = 120, 60
    else:
        ctx.tiny_cfg = dataclasses.replace(recipe(args, g_ch=8, d_ch=8, z_dim=20, shared_dim=8), batch_size=8)
        ctx.tiny_steps = 3
        ctx.train_s, ctx.n_images, ctx.mem_batches, ctx.mem_amps = args.train_s, 10000, (32, 64, 128), ("fp16", "off")
        ctx.speed_args = ["--batch", str(cfg.batch_size), "--steps", "30", "--rounds", "3", "--synthetic", "2085"]
        ctx.speed_preset = args.preset
        ctx.test_files = TEST_FILES
        ctx.speed_timeout, ctx.tests_timeout = 240, 150
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
                "data": desc, "config": dataclasses.asdict(cfg), "train_s": ctx.train_s}
    print(f"gpu_evidence: device {device}, data {desc}, out {out}", flush=True)
    for name, fn, need in SECTIONS:
        left = args.budget_s - (time.monotonic() - t_start)
        need = need if need is not None else {"train": 2 * ctx.train_s + 20, "speed": 60, "tests": 30}[name]
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
