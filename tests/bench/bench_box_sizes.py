"""How many annotation boxes are too small for a real crop, at candidate thresholds (run by hand; not collected by pytest).

    python tests/bench/bench_box_sizes.py [--data-dir ../shared/data/dogs-1953] [--size 64] [--margin 0.1]

For every box of the data set: the side of its "box" style window (the longer box side plus the margin, at most the
image's shorter side), as load_dogs judges it against size * MIN_CROP_FRACTION, and the box's own longer and shorter
sides. Prints a markdown table: how many fall below each threshold. Lists files and reads XML and image headers only.
"""
import argparse
import sys
from collections import Counter
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.data.annotations import list_annotations, list_images, read_voc  # noqa: E402
from modules.data.annotations import MIN_CROP_FRACTION, _exif_orientation  # noqa: E402
from modules.data.dogs import find_data_dir  # noqa: E402

THRESHOLDS = (16, 24, 32, 48, 64, 96, 128)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dogs-1953"))
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--margin", type=float, default=0.1)
    args = ap.parse_args()
    images_dir, annotation_dir = find_data_dir(args.data_dir)
    if annotation_dir is None:
        sys.exit(f"no annotations under {args.data_dir}")
    skipped = {}
    files = list_images(images_dir, Counter())
    _, annotations = list_annotations(annotation_dir, Counter())
    rows, rotated = [], 0
    for key, (xml, _label) in sorted(annotations.items()):
        why = Counter()
        boxes, _ = read_voc(xml, why, Counter())
        if key not in files or not boxes:
            skipped[key] = next(iter(+why), "no_image") if key in files else "no_image"
            continue
        with Image.open(files[key]) as im:
            w, h = im.size
            if _exif_orientation(im) in (5, 6, 7, 8):
                w, h, rotated = h, w, rotated + 1
        for x0, y0, x1, y1 in boxes:
            bw, bh = x1 - x0, y1 - y0
            rows.append((min(max(bw, bh) * (1 + args.margin), w, h), max(bw, bh), min(bw, bh)))
    n = len(rows)
    print(f"{len(annotations)} annotations, {n} boxes, {len(skipped)} annotations not measured, {rotated} images "
          f"turned by EXIF; load_dogs skips windows under {args.size * MIN_CROP_FRACTION:g} px at size {args.size}")
    print(f"| threshold (px) | window side < threshold (box + {args.margin:g} margin) | box longer side < threshold "
          f"| box shorter side < threshold |")
    print("| --- | --- | --- | --- |")
    for t in THRESHOLDS:
        counts = [sum(r[i] < t for r in rows) for i in range(3)]
        print(f"| {t} | " + " | ".join(f"{c} ({100 * c / max(n, 1):.2f}%)" for c in counts) + " |")
    print("smallest window sides:", ", ".join(f"{r[0]:.1f}" for r in sorted(rows)[:8]))


if __name__ == "__main__":
    main()
