"""Learning curves in a pretrained feature space: train recipes for equal wall time each and score them (by hand).

    pip install -r tests/bench/requirements-bench.txt
    python tests/bench/bench_quality.py --data-dir ../shared/data/dogs-1953 --minutes 5 --score-every 150 \\
        --variant kaggle8=kaggle:g_ch=8,d_ch=8,batch_size=32 --variant dcgan32=dcgan:g_ch=32,d_ch=32,batch_size=32

Each --variant is NAME=PRESETS[:FIELD=VALUE,...] (PRESETS comma-separated as for kernel.py --preset; the optional part
after ':' are --set overrides). The variants train one after another, each for --minutes of training wall time, in one
process with the same threads, through the kernel's own build_trainer and train_loop (called in segments, one per
scoring interval; train_loop ends a segment early rather than overrun it, so points fall at or before each
--score-every mark). Every segment the generator the kernel would ship (trainer.generator_to_ship(): EMA/SWA) is
sampled as the kernel samples it (the kernel's own Sampler, modules/sample.build_sampler: the configured truncation,
breeds drawn with the training distribution, the run's seed) and --score-n images are scored;
scoring time is not training time. At the end --final-n images go through the kernel's zip writer
(modules/submission.write_submission), are read back from the zip and scored; the last curve point is the first
--score-n of those. --sampling-variants also scores the final generator with the other BatchNorm statistics (sample_bn: batch, running,
standing), without truncation and with uniform breeds (sampling changes only: no retraining; "bn": the first only).
--merge combines runs made separately, e.g. one process per variant started together so that every variant meets
the same load on a shared machine (tests/bench/results/issue17/run.sh).

Scores: fid_mnv2 and mem_mnv2 (tests/bench/mnv2.py) against every whole training image squashed to 64x64, as Kaggle's
public scorer did. They are a development metric in ImageNet MobileNet-v2 features: NOT Kaggle's score and not
Inception FID; compare runs only at equal sample counts (small samples inflate fid_mnv2). CPU-scale curves are early
training, not a 9-hour GPU result.

Output in --out: results.json, table.md, curves.png (fid_mnv2 against training time, one line per variant) and
grid-NAME.png (64 samples of each variant's final generator).
"""
import argparse
import dataclasses
import io
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnv2 import (  # noqa: E402
    MobileNetV2Features,
    Reference,
    fid_mnv2,
    format_calibration,
    mem_mnv2,
    mem_penalty_note,
    reference_features,
    score,
)

from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.recipe.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.recipe.loop import build_loop_settings, train_loop  # noqa: E402
from modules.recipe.sample import SAMPLE_BN_MODES, build_sampler  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import Deadline, UsageError, log, seed_everything  # noqa: E402
from modules.run.budget import Pace, TrainPlan  # noqa: E402
from modules.run.distributed import DistContext  # noqa: E402
from modules.run.report import save_grid  # noqa: E402
from modules.run.submission import write_submission  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA_KEYS = ("image_size", "crop_margin", "crop_styles", "crop_filter", "include_whole", "min_aspect", "max_aspect",
             "data_limit")


def parse_variant(spec):
    """'NAME=preset[,preset][:field=value,...]' -> (name, Config). NAME= is optional (default: the spec itself)."""
    name, _, rest = spec.partition("=") if "=" in spec.split(":", 1)[0] else ("", "", spec)
    presets, _, sets = rest.partition(":")
    cfg = Config()
    for p in [p.strip() for p in presets.split(",") if p.strip()]:
        if p not in PRESETS:
            raise UsageError(f"--variant {spec}: unknown preset {p!r}; choose from {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[p], f"preset {p}")
    overrides = {}
    for item in [s.strip() for s in sets.split(",") if s.strip()]:
        if "=" not in item:
            raise UsageError(f"--variant {spec}: {item!r} is not FIELD=VALUE")
        k, v = item.split("=", 1)
        overrides[k.strip()] = v.strip()
    cfg = apply_overrides(cfg, overrides, f"--variant {spec}")
    return (name or spec), dataclasses.replace(cfg, preset=presets)


def train_segment(trainer, cfg, *, seconds, prior_train_s, plan_s, history):
    """The one call of the kernel's train_loop: train `seconds` more, on a time plan of plan_s seconds in all (the LR
    schedule follows it as in a kernel run). No finish here: no reserve, no checkpoints, no re-timing."""
    deadline = Deadline(seconds + 3600.0, start=time.monotonic())
    plan = TrainPlan(budget_s=seconds + 3600.0, estimates={}, finish_s=0.0, margin_s=0.0, train_until=seconds,
                     prior_train_s=prior_train_s, plan_s=plan_s, inherited=False, first_step_s=0.0,
                     gen_batch=cfg.sample_batch, gen_batch_s=0.0)
    return train_loop(trainer, settings=dataclasses.replace(build_loop_settings(cfg), checkpoint_s=0.0, max_steps=0),
           pace=Pace(plan, deadline), ctx=DistContext(), stop_event=None, checkpoint_fn=None,
           history=history, before_step=None)


def read_zip_images(path):
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist(), key=lambda s: int(s.split(".")[0]))
        return np.stack([np.asarray(Image.open(io.BytesIO(zf.read(n))).convert("RGB")) for n in names])


def run_variant(name, cfg, data, *, ref_feats, extractor, minutes, score_every, score_n, final_n, out_dir,
                sampling_variants):
    seed_everything(cfg.seed)
    trainer = build_trainer(cfg, data, torch.device("cpu"))
    sampler = build_sampler(cfg, trainer, data)  # the images the kernel would write: sampler(n, cfg.seed)
    plan_s = minutes * 60.0
    trained, history, points, score_s = 0.0, {}, [], 0.0
    t_wall = time.monotonic()
    while trained < plan_s - 1.0:
        left = plan_s - trained
        seg = left if left < 1.25 * score_every else score_every  # no near-empty last segment (and a wasted score)
        summary = train_segment(trainer, cfg, seconds=seg, prior_train_s=trained, plan_s=plan_s, history=history)
        trained += summary.seconds
        if summary.reason not in ("budget", "steps"):
            log(f"{name}: training stopped ({summary.reason}: {summary.error}); scoring what there is")
            break
        if trained >= plan_s - 1.0:
            break  # the last point is scored from the final images below
        if plan_s - trained < 0.25 * score_every:
            continue  # train_loop ended the segment a little early: train the rest, score it with the final images
        t0 = time.monotonic()
        s = score(sampler(score_n, cfg.seed), ref_feats, extractor)
        score_s += time.monotonic() - t0
        points.append({"train_s": trained, "step": trainer.step_count, "n": s["n"], "fid_mnv2": s["fid_mnv2"],
                       "mem_mnv2": s["mem_mnv2"]})
        log(f"{name}: step {trainer.step_count}, trained {trained:.0f}s: fid_mnv2 {s['fid_mnv2']:.1f} "
            f"mem_mnv2 {s['mem_mnv2']:.3f} (n={s['n']}, scored in {s['seconds']:.0f}s)")
    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    zip_path = out_dir / f"images-{name}.zip"
    write_submission(sampler(final_n, cfg.seed), str(zip_path))
    images = read_zip_images(zip_path)
    zip_path.unlink()  # scored; not kept
    final = score(images, ref_feats, extractor)
    feats = final.pop("feats")
    head = feats[:score_n]
    points.append({"train_s": trained, "step": trainer.step_count, "n": len(head),
                   "fid_mnv2": fid_mnv2(head, stats_b=ref_feats.stats), "mem_mnv2": mem_mnv2(head, ref_feats.feats)})
    save_grid(images[:64], out_dir / f"grid-{name}.png", nrow=8)
    result = {"name": name, "preset": cfg.preset, "config": dataclasses.asdict(cfg), "steps": trainer.step_count,
              "train_s": trained, "it_per_s": trainer.step_count / max(trained, 1e-9), "points": points,
              "final": {k: v for k, v in final.items()}, "final_mem_note": mem_penalty_note(final["mem_mnv2"])}
    if sampling_variants:
        extra = {}
        options = []
        if cfg.truncation and sampling_variants == "all":
            options.append(("no truncation", dataclasses.replace(sampler, truncation=0.0)))
        if cfg.conditional and len(data.classes) > 1 and sampling_variants == "all":
            options.append(("uniform breeds", dataclasses.replace(sampler, label_counts=np.ones(len(data.classes)))))
        shipped = trainer.generator_to_ship()
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in shipped.modules()):
            # the same trained generator with the other BatchNorm statistics (sample.py); the curve used cfg.sample_bn
            options += [(f"sample_bn={m}", dataclasses.replace(sampler, sample_bn=m))
                        for m in SAMPLE_BN_MODES if m != shipped.sample_bn]
        for label, other in options:
            imgs = other(final_n, cfg.seed)
            s = score(imgs, ref_feats, extractor)
            s.pop("feats")
            extra[label] = s
            log(f"{name} sampled with {label}: fid_mnv2 {s['fid_mnv2']:.1f} mem_mnv2 {s['mem_mnv2']:.3f} (n={s['n']})")
        result["sampling"] = extra
    result["score_s"] = score_s + time.monotonic() - t0
    result["wall_s"] = time.monotonic() - t_wall
    log(f"{name}: {trainer.step_count} steps in {trained:.0f}s ({result['it_per_s']:.2f} it/s); final fid_mnv2 "
        f"{final['fid_mnv2']:.1f} mem_mnv2 {final['mem_mnv2']:.3f} (n={final['n']}; {result['final_mem_note']})")
    return result


def format_table(results):
    lines = ["| variant | steps | it/s | fid_mnv2 / mem_mnv2 at checkpoints (train s, step, n) | final fid_mnv2 | "
             "final mem_mnv2 | final n |", "|---|---|---|---|---|---|---|"]
    for r in results:
        pts = "; ".join(f"{p['train_s']:.0f}s/{p['step']}: {p['fid_mnv2']:.1f} / {p['mem_mnv2']:.3f}"
                        for p in r["points"])
        lines.append(f"| {r['name']} | {r['steps']} | {r['it_per_s']:.2f} | {pts} | {r['final']['fid_mnv2']:.1f} | "
                     f"{r['final']['mem_mnv2']:.3f} | {r['final']['n']} |")
    for r in results:
        for label, s in r.get("sampling", {}).items():
            lines.append(f"| {r['name']} sampled with {label} | {r['steps']} | | | {s['fid_mnv2']:.1f} | "
                         f"{s['mem_mnv2']:.3f} | {s['n']} |")
    return "\n".join(lines)


def plot_curves(results, path, note=""):
    import matplotlib  # optional: benchmark-only dependency
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=80)
    for r in results:
        ax.plot([p["train_s"] / 60 for p in r["points"]], [p["fid_mnv2"] for p in r["points"]], "o-", label=r["name"])
    n = sorted({p["n"] for r in results for p in r["points"]})
    ax.set_xlabel(f"training wall time (min, {note or '2 shared CPU cores'})", fontsize=8)
    ax.set_ylabel(f"fid_mnv2 (n={','.join(map(str, n))}; not Kaggle's FID)")
    ax.set_title("fid_mnv2 vs training time (lower is better; CPU-scale early training)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def merge(dirs, out, *, note):
    """The results of several runs (one results.json each) -> one results.json, table.md and curves.png in out."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    results = [r for run in runs for r in run["results"]]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"merged": [str(d) for d in dirs], "note": note,
                                                  "args": [run["args"] for run in runs],
                                                  "calibration": runs[0]["calibration"], "results": results},
                                                 indent=1, default=str))
    table = format_table(results)
    (out / "table.md").write_text(table + "\n")
    plot_curves(results, out / "curves.png", note)
    print(f"{table}\nwritten: {out}", flush=True)
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dogs-1953"),
                   help="Kaggle layout (all-dogs/, Annotation/) (default: ../shared/data/dogs-1953)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PRESETS[:FIELD=VALUE,...]",
                   help="a recipe to train (repeatable), e.g. kaggle8=kaggle:g_ch=8,d_ch=8,batch_size=32")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall time per variant (default 5)")
    p.add_argument("--score-every", type=float, default=150.0, help="seconds of training between scores (default 150)")
    p.add_argument("--score-n", type=int, default=1000, help="images per curve point (default 1000)")
    p.add_argument("--final-n", type=int, default=10000, help="images in each final zip, all scored (default 10000)")
    p.add_argument("--sampling-variants", nargs="?", const="all", default="", choices=["all", "bn"],
                   help="also score each final generator (no retraining) with the other sample_bn modes, and (all, "
                        "the default) without truncation and with uniform breeds")
    p.add_argument("--threads", type=int, default=2, help="torch and TFLite threads (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="output folder (default tests/bench/runs/quality-<time>)")
    p.add_argument("--calibration", action="store_true", help="print the calibration table and exit")
    p.add_argument("--note", default="", help="how the runs shared the machine, for the curves' x label")
    p.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="combine the results.json of runs made separately (e.g. one process per variant, run "
                        "concurrently so that every variant meets the same machine load) into --out, and exit")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out), note=args.note)
    try:
        variants = [parse_variant(v) for v in args.variant]
        if not variants and not args.calibration:
            raise UsageError("give at least one --variant (or --calibration)")
        if args.score_n > args.final_n:
            raise UsageError("--score-n must not exceed --final-n (the last curve point is taken from the final images)")
        images_dir, annotation_dir = find_data_dir(args.data_dir)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "tests" / "bench" / "runs" / time.strftime("quality-%Y%m%d-%H%M%S"))
    try:
        extractor = MobileNetV2Features(threads=args.threads)
    except ImportError:
        print("error: ai_edge_litert is missing: pip install -r tests/bench/requirements-bench.txt", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    datasets = {}

    def data_for(cfg):
        key = tuple(getattr(cfg, k) for k in DATA_KEYS)
        if key not in datasets:
            datasets[key] = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                                      crop_styles=tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip()),
                                      include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                                      max_aspect=cfg.max_aspect or float("inf"), limit=cfg.data_limit or None,
                                      resize=cfg.crop_filter)
        return datasets[key]

    base = data_for(Config())
    feats, calibration = reference_features(args.data_dir, base.reference, extractor)
    ref_feats = Reference(feats)
    if args.calibration:
        print(format_calibration(calibration))
        return 0
    log(f"{len(variants)} variant(s), {args.minutes:g} min each, scores every {args.score_every:g}s of training "
        f"(n={args.score_n}), final n={args.final_n}, {torch.get_num_threads()} threads; out {out}")
    results = []
    for name, cfg in variants:
        cfg = dataclasses.replace(cfg, seed=args.seed)
        results.append(run_variant(name, cfg, data_for(cfg), ref_feats=ref_feats, extractor=extractor,
                                   minutes=args.minutes, score_every=args.score_every, score_n=args.score_n,
                                   final_n=args.final_n, out_dir=out, sampling_variants=args.sampling_variants))
        (out / "results.json").write_text(json.dumps({"args": vars(args), "calibration": calibration,
                                                      "results": results}, indent=1, default=str))
        table = format_table(results)
        (out / "table.md").write_text(table + "\n")
        plot_curves(results, out / "curves.png", args.note)
    print(f"fid_mnv2/mem_mnv2: MobileNet-v2 features, not Kaggle's score; reference: {len(base.reference)} whole "
          f"training images squashed to 64x64\n{table}\nwritten: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
