"""Score the GPU evidence's quality samples back here: fid_mnv2 / mem_mnv2 of each samples-<i>.npz, a table and a curve.

    pip install -r tests/bench/requirements-bench.txt
    python tests/bench/score_gpu_samples.py DIR                       # DIR: the $OUT of gpu_evidence.py, fetched
    python tests/bench/score_gpu_samples.py DIR --out tests/bench/results/gpu

DIR holds evidence.json and the samples-<i>.npz that gpu_evidence.py's quality section wrote (uint8 [n,64,64,3], the
shipped generator sampled as the finish samples it, at --quality-points seconds of fp16 training). Each is scored with
the development metric (tests/bench/mnv2.py: MobileNet-v2 features, ../shared/models/) against the reference images of
--data-dir (every whole training image squashed to 64x64, as bench_quality.py scores), and set next to the committed CPU
curves (--cpu-results, bench_quality.py's results.json) at the same sample count n only: fid_mnv2 depends on n.
fid_mnv2 is NOT Kaggle's score and not Inception FID.

Output in --out (default DIR): gpu-quality.json, gpu-quality.md (the table), gpu-curve.png (fid_mnv2 against training
minutes, the GPU run and the CPU runs) and samples-grid.png copied from DIR.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, md_table  # noqa: E402
from mnv2 import MobileNetV2Features, Reference, reference_features, score  # noqa: E402

from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.recipe.utils import UsageError  # noqa: E402

CPU_RESULTS = (ROOT / "tests" / "bench" / "results" / "long20" / "results.json",)


def sample_files(run_dir):
    """samples-<i>.npz of a gpu_evidence output folder, in point order; UsageError when there are none."""
    files = sorted(Path(run_dir).glob("samples-*.npz"), key=lambda p: int(p.stem.split("-")[1]))
    if not files:
        raise UsageError(f"no samples-<i>.npz in {run_dir} (the output folder of gpu_evidence.py)")
    return files


def load_samples(path):
    """-> (uint8 [n,64,64,3], {train_s, step, ...}) from one samples .npz."""
    with np.load(path) as z:
        images = z["images"]
        info = {k: z[k].item() for k in z.files if k != "images"}
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise UsageError(f"{path}: expected uint8 [n,H,W,3] images, got {images.dtype} {list(images.shape)}")
    return images, info


def cpu_points(paths, n):
    """The committed CPU curves' points scored at the same n -> [{source, name, train_s, step, fid_mnv2, mem_mnv2}]."""
    rows = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            continue
        for r in json.loads(path.read_text()).get("results", []):
            rows += [{"source": f"CPU {path.parent.name}", "name": r["name"], "train_s": p["train_s"],
                      "step": p["step"], "fid_mnv2": p["fid_mnv2"], "mem_mnv2": p["mem_mnv2"]}
                     for p in r.get("points", []) if p.get("n") == n]
    return rows


def plot(gpu, cpu, path, *, label):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4), dpi=90)
    ax.plot([p["train_s"] / 60 for p in gpu], [p["fid_mnv2"] for p in gpu], "o-", lw=2, label=label)
    for name in dict.fromkeys((r["source"], r["name"]) for r in cpu):
        pts = [r for r in cpu if (r["source"], r["name"]) == name]
        ax.plot([p["train_s"] / 60 for p in pts], [p["fid_mnv2"] for p in pts], ".--", alpha=0.7,
                label=f"{name[0]}: {name[1]}")
    ax.set_xlabel("training minutes")
    ax.set_ylabel(f"fid_mnv2 (n={gpu[0]['n']}; not Kaggle's FID)")
    ax.set_title("fid_mnv2 vs training time (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="gpu_evidence.py's output folder (evidence.json, samples-<i>.npz)")
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dogs-1953"),
                   help="the reference images' data (default ../shared/data/dogs-1953, what dogs64.npz was made from)")
    p.add_argument("--out", default="", help="output folder (default: DIR)")
    p.add_argument("--cpu-results", nargs="*", default=[str(x) for x in CPU_RESULTS],
                   help="bench_quality.py results.json files whose points at the same n are shown beside (default "
                        "tests/bench/results/long20/results.json)")
    p.add_argument("--threads", type=int, default=2, help="TFLite threads (default 2)")
    args = p.parse_args(argv)
    run_dir, out = Path(args.dir), Path(args.out or args.dir)
    try:
        files = sample_files(run_dir)
        samples = [load_samples(f) for f in files]
        images_dir, annotation_dir = find_data_dir(args.data_dir)
        extractor = MobileNetV2Features(threads=args.threads)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError:
        print("error: ai_edge_litert is missing: pip install -r tests/bench/requirements-bench.txt", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    evidence = run_dir / "evidence.json"
    meta = json.loads(evidence.read_text()).get("meta", {}) if evidence.is_file() else {}
    env = json.loads(evidence.read_text()).get("results", {}).get("env", {}) if evidence.is_file() else {}
    ref_images = load_dogs(images_dir, annotation_dir, size=64, workers=args.threads).reference
    ref = Reference(reference_features(args.data_dir, ref_images, extractor)[0])
    gpu = []
    for f, (images, info) in zip(files, samples):
        s = score(images, ref, extractor)
        gpu.append({"file": f.name, "train_s": info.get("train_s"), "step": info.get("step"), "n": s["n"],
                    "fid_mnv2": s["fid_mnv2"], "mem_mnv2": s["mem_mnv2"]})
        print(f"{f.name}: {info.get('train_s', 0):.0f}s, step {info.get('step')}: fid_mnv2 {s['fid_mnv2']:.1f} "
              f"mem_mnv2 {s['mem_mnv2']:.3f} (n={s['n']})", flush=True)
    n = gpu[0]["n"]
    cpu = cpu_points(args.cpu_results, n)
    device = env.get("gpu", env.get("device", "?"))
    label = f"{device}, amp=fp16 ({'DRY RUN' if meta.get('dry_run') else 'GPU'})"
    out.mkdir(parents=True, exist_ok=True)
    result = {"run": str(run_dir), "command": meta.get("command"), "device": device, "torch": env.get("torch"),
              "data_dir": args.data_dir, "reference_images": len(ref_images), "n": n, "gpu": gpu, "cpu": cpu,
              "note": "fid_mnv2 / mem_mnv2: MobileNet-v2 features, not Kaggle's score; compared at equal n only"}
    (out / "gpu-quality.json").write_text(json.dumps(result, indent=1))
    rows = [[label, p["file"], f"{p['train_s'] / 60:.1f}", p["step"], f"{p['fid_mnv2']:.1f}", f"{p['mem_mnv2']:.3f}"]
            for p in gpu]
    rows += [[f"{r['source']}: {r['name']}", "", f"{r['train_s'] / 60:.1f}", r["step"], f"{r['fid_mnv2']:.1f}",
              f"{r['mem_mnv2']:.3f}"] for r in cpu]
    table = (f"fid_mnv2 / mem_mnv2 at n={n} against {len(ref_images)} reference images of {args.data_dir} "
             f"(development metric, not Kaggle's score). Run: `{meta.get('command')}`\n\n"
             + md_table(["run", "samples", "train min", "step", "fid_mnv2", "mem_mnv2"], rows) + "\n")
    (out / "gpu-quality.md").write_text(table)
    print(table)
    try:
        plot(gpu, cpu, out / "gpu-curve.png", label=label)
    except ImportError:
        print("matplotlib missing: no gpu-curve.png", file=sys.stderr)
    grid = run_dir / "samples-grid.png"
    if grid.is_file() and out.resolve() != run_dir.resolve():
        shutil.copyfile(grid, out / "samples-grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
