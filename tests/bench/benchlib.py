"""Helpers shared by bench_memory.py, bench_flops.py and gpu_evidence.py (not collected by pytest).

Every bench takes the recipe as the kernel does (`--preset NAMES`, `--set FIELD=VALUE` repeatable, parsed and checked by
the kernel's own modules.run.cli.parse_config), so a bench measures whatever the default recipe is when it is rerun.
"""
import argparse
import sys
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402
from modules.run.cli import parse_config  # noqa: E402

REAL_SAMPLE = ROOT.parent / "shared" / "data" / "dogs-1953"
FULL_DATASET = 20579  # images in Kaggle's all-dogs


def count_params(module):
    return sum(p.numel() for p in module.parameters())


def add_recipe_args(p):
    p.add_argument("--preset", default="kaggle", help="comma-separated presets, as kernel.py --preset (default kaggle)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a Config field, as kernel.py --set (repeatable)")


def recipe(args, **extra):
    """-> the Config of --preset/--set (+ extra FIELD=VALUE overrides applied last), checked like a kernel run's."""
    argv = ["--preset", args.preset]
    for item in list(args.set) + [f"{k}={v}" for k, v in extra.items()]:
        argv += ["--set", item]
    return parse_config(argv)[0]


def crop_styles(cfg):
    return tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip())


def load_data(cfg, data_dir=None, *, synthetic=0, n_classes=120):
    """-> (data with images uint8 [N,64,64,3] / labels [N] / classes, description, crops per source image or None).
    data_dir None: the real sample (../shared/data/dogs-1953) when present, else synthetic. A .npz (gpu_evidence's
    --make-npz) is read as it is."""
    if data_dir is None and not synthetic and REAL_SAMPLE.is_dir():
        data_dir = str(REAL_SAMPLE)
    if synthetic or data_dir is None:
        n = synthetic or 2085
        rng = np.random.default_rng(0)
        data = types.SimpleNamespace(images=rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
                                     labels=np.arange(n) % n_classes, classes=[f"breed{i}" for i in range(n_classes)])
        return data, f"synthetic uint8, {n} images, {n_classes} classes", None
    if str(data_dir).endswith(".npz"):
        data = load_npz(data_dir)
        return data, f"{data_dir}: {len(data.images)} crops, {len(data.classes)} classes", data.crops_per_image
    images_dir, annotation_dir = find_data_dir(data_dir)
    data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                     crop_styles=crop_styles(cfg), include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers,
                     limit=cfg.data_limit or None)
    found = max(data.stats.get("images_found", data.stats.get("images_read", 1)), 1)
    return data, f"real, {found} images -> {len(data.images)} crops, {len(data.classes)} classes ({data_dir})", \
        len(data.images) / found


def save_npz(path, data, *, source, images_found):
    """The training crops as the kernel made them: images uint8 [N,64,64,3], labels int64 [N], classes [K] str."""
    np.savez_compressed(path, images=data.images, labels=data.labels.astype(np.int64),
                        classes=np.array(data.classes, dtype=str), source=np.array(str(source)),
                        images_found=np.array(int(images_found)))


def load_npz(path):
    with np.load(path, allow_pickle=False) as z:
        images, labels, classes = z["images"], z["labels"].astype(np.int64), [str(c) for c in z["classes"]]
        found = int(z["images_found"]) if "images_found" in z else len(images)
    assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3, (images.dtype, images.shape)
    assert labels.shape == (len(images),) and labels.min() >= 0 and labels.max() < len(classes)
    return types.SimpleNamespace(images=images, labels=labels, classes=classes, crops_per_image=len(images) / found)


def mib(n):
    return n / 2**20


def md_table(head, rows):
    """head: column names; rows: lists of cells (str) -> a markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def namespace(**kw):
    return argparse.Namespace(**kw)
