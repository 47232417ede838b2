"""fp32 vs fp16 vs bf16 on the CPU: the default recipe at a small width, trained from the same seed on the same data.

    OMP_NUM_THREADS=1 nice -n 10 python tests/bench/bench_precision.py --data-dir ../shared/data/dogs-1953 \\
        --steps 200 --batch 4 --out tests/bench/results/precision

The default recipe (the kaggle preset) at the smoke preset's widths (z 20, g_ch 2, d_ch 4, shared 8) by default: this
CPU has no fp16 arithmetic (fp16 convs ~40x slower than fp32), so wider nets do not fit a 20-minute bench in fp16.

Each variant goes through the kernel's own build_trainer and Trainer.step (amp = off | bf16 | fp16: autocast and, for
fp16, the two GradScalers, exactly the code a GPU runs) with torch seeded alike before the trainer is built, so the
batches, flips, noise and latents are drawn identically and only the arithmetic differs. A second fp32 run from
another seed (fp32-seed1) says how far apart two fp32 runs end: GAN training is chaotic, so a precision whose curves
end no further from fp32 than another seed's does is within the noise of training itself.

Output in --out: results.json (every step's losses, the fp16 scales), table.md, curves.png (loss_d and loss_g,
a 20-step moving average, all variants on one picture).

What CPU fp16 does NOT prove: CUDA's autocast casts other ops than the CPU's (the CPU keeps more in fp32 and has no
tensor cores; cuDNN picks other conv algorithms, with other accumulation orders), so a CUDA run's overflows, skipped
steps and drift can differ from these. What it does show: the code path (autocast regions, fp16 GradScalers, skipped
steps, fp32 master weights) runs, stays finite, and trains like fp32 at this scale. CPU-scale training is early training.
"""
import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.recipe.config import Config, apply_overrides  # noqa: E402
from modules.recipe.device import describe_amp  # noqa: E402
from modules.recipe.sample import generate_images  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402

VARIANTS = {"fp32": ("off", 0), "fp32-seed1": ("off", 1), "bf16": ("bf16", 0), "fp16": ("fp16", 0)}
SMOOTH = 20  # steps in the moving average of the curves and the end window of the table


def train_variant(name, data, *, amp, seed, widths, batch, steps):
    cfg = apply_overrides(Config(), {**widths, "batch_size": batch, "amp": amp, "seed": seed}, "bench")
    torch.manual_seed(seed)
    np.random.seed(seed)
    trainer = build_trainer(cfg, data, torch.device("cpu"))
    losses, scales, t0 = [], [], time.monotonic()
    for i in range(steps):
        trainer.step()
        ld, lg, bad = trainer.read_stats()  # one host sync per step: a bench, not the kernel's loop
        losses.append((ld, lg, bad))
        if trainer.scaler_d.is_enabled():
            scales.append((trainer.scaler_d.get_scale(), trainer.scaler_g.get_scale()))
        if (i + 1) % 25 == 0:
            print(f"{name}: step {i + 1}/{steps}  loss_d {ld:.4f}  loss_g {lg:.4f}  "
                  f"{(time.monotonic() - t0) / (i + 1):.2f} s/step", flush=True)
    seconds = time.monotonic() - t0
    labels = np.bincount(data.labels, minlength=len(data.classes))
    imgs = generate_images(trainer.G, n=64, z_dim=cfg.z_dim, label_counts=labels, truncation=cfg.truncation,
                           batch_size=64, device=torch.device("cpu"), seed=123)  # fp32 sampling: only weights differ
    return trainer, {"name": name, "amp": amp, "precision": describe_amp(trainer.amp_dtype), "seed": seed,
                     "seconds": seconds, "s_per_step": seconds / steps, "losses": losses, "scales": scales,
                     "skipped": dict(trainer.skipped), "images": imgs}


def smooth(x, k=SMOOTH):
    x = np.asarray(x, np.float64)
    return np.convolve(x, np.ones(k) / k, mode="valid") if len(x) >= k else x


def compare(results, trainers):
    ref, ref_g = results["fp32"], [p.detach() for p in trainers["fp32"].G.parameters()]
    rows = []
    for name, r in results.items():
        ld, lg = (np.array([l[i] for l in r["losses"]]) for i in (0, 1))
        rd, rg = (np.array([l[i] for l in ref["losses"]]) for i in (0, 1))
        gp = [p.detach() for p in trainers[name].G.parameters()]
        w_dist = float(torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(gp, ref_g)))
                       / torch.sqrt(sum((b ** 2).sum() for b in ref_g)))
        rows.append({
            "name": name, "precision": r["precision"], "s_per_step": r["s_per_step"],
            "end_loss_d": float(ld[-SMOOTH:].mean()), "end_loss_g": float(lg[-SMOOTH:].mean()),
            "end_gap_d": float(abs(ld[-SMOOTH:].mean() - rd[-SMOOTH:].mean())),
            "end_gap_g": float(abs(lg[-SMOOTH:].mean() - rg[-SMOOTH:].mean())),
            "max_gap_d": float(np.max(np.abs(smooth(ld) - smooth(rd)))),
            "max_gap_g": float(np.max(np.abs(smooth(lg) - smooth(rg)))),
            "step1_gap_d": float(abs(ld[0] - rd[0])), "g_weight_rel_dist": w_dist,
            "pixel_gap": float(np.abs(r["images"].astype(np.float64) - ref["images"].astype(np.float64)).mean()),
            "non_finite": int(sum(l[2] for l in r["losses"])),
            "skipped_d": r["skipped"]["d"], "skipped_g": r["skipped"]["g"],
            "final_scale_d": r["scales"][-1][0] if r["scales"] else None,
        })
    return rows


def plot(results, path, steps):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, r in results.items():
        for ax, i, what in ((axes[0], 0, "loss_d"), (axes[1], 1, "loss_g")):
            y = smooth([l[i] for l in r["losses"]])
            ax.plot(np.arange(len(y)) + SMOOTH, y, label=f"{name} ({r['precision']})", lw=1.2,
                    ls="--" if name == "fp32-seed1" else "-")
            ax.set_title(f"{what}, {SMOOTH}-step moving average")
            ax.set_xlabel("G step")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"default recipe at small width on the CPU, {steps} steps (early training, CPU scale)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[3] / "shared" / "data" / "dogs-1953"))
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--g-ch", type=int, default=2)
    p.add_argument("--d-ch", type=int, default=4)
    p.add_argument("--z-dim", type=int, default=20)
    p.add_argument("--shared-dim", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "precision"))
    args = p.parse_args()
    torch.set_num_threads(1)
    images_dir, annotation_dir = find_data_dir(args.data_dir)
    data = load_dogs(images_dir, annotation_dir, size=64, margin=0.1, crop_styles=("box",), include_whole=False,
                     min_aspect=0.0, max_aspect=float("inf"), workers=2)
    results, trainers = {}, {}
    for name in args.variants.split(","):
        amp, seed = VARIANTS[name]
        widths = {"g_ch": args.g_ch, "d_ch": args.d_ch, "z_dim": args.z_dim, "shared_dim": args.shared_dim}
        trainers[name], results[name] = train_variant(name, data, amp=amp, seed=seed, widths=widths, batch=args.batch,
                                                      steps=args.steps)
    rows = compare(results, trainers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "curves.png", args.steps)
    cmd = " ".join(["python", "tests/bench/bench_precision.py", *sys.argv[1:]])
    lines = [f"Command: `OMP_NUM_THREADS=1 nice -n 10 {cmd}`  ",
             f"torch {torch.__version__}, CPU ({torch.backends.cpu.get_cpu_capability()}), 1 thread, shared 2-core box. "
             f"Default recipe at g_ch {args.g_ch}, d_ch {args.d_ch}, z {args.z_dim}, shared {args.shared_dim}, batch "
             f"{args.batch}, {args.steps} steps, "
             f"{len(data.images)} crops of the real sample. Early training at CPU scale, not a GPU result.", "",
             f"End = mean over the last {SMOOTH} steps; gaps are |variant - fp32| (fp32-seed1: another seed, same "
             f"precision, the noise of training itself); max gap over the {SMOOTH}-step moving averages; G weights: "
             "||G - G_fp32|| / ||G_fp32||; pixels: mean |difference| (0-255) of 64 images from the same latents.", "",
             "| variant | s/step | end loss_d | end loss_g | end gap d | end gap g | max gap d | max gap g | step-1 gap d "
             "| G weights dist | pixel gap | non-finite | skipped D/G | final D scale |",
             "|" + " --- |" * 14]
    for r in rows:
        lines.append(f"| {r['name']} ({r['precision']}) | {r['s_per_step']:.2f} | {r['end_loss_d']:.4f} | "
                     f"{r['end_loss_g']:.4f} | {r['end_gap_d']:.4f} | {r['end_gap_g']:.4f} | {r['max_gap_d']:.4f} | "
                     f"{r['max_gap_g']:.4f} | {r['step1_gap_d']:.2e} | {r['g_weight_rel_dist']:.4f} | "
                     f"{r['pixel_gap']:.2f} | {r['non_finite']} | {r['skipped_d']}/{r['skipped_g']} | "
                     f"{r['final_scale_d'] if r['final_scale_d'] is not None else '-'} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    dump = {"args": vars(args), "torch": torch.__version__, "rows": rows,
            "runs": {k: {kk: vv for kk, vv in v.items() if kk != "images"} for k, v in results.items()}}
    (out / "results.json").write_text(json.dumps(dump, indent=1, default=float))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
