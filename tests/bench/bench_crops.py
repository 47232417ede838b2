"""The training crops themselves against Kaggle's reference, per crop style and resize filter (by hand; no training).

    python tests/bench/bench_crops.py --data-dir ../shared/data/dogs-1953 --out tests/bench/results/issue17/crops

For each (crop style, resize filter) the kernel's own load_dogs() cuts every box of the sample; the table gives how
many windows cut the dog (the window is smaller than the box's longer side: the "box" style where the image is too
short for its square) or are rectangular (squashed by the resize: the "square" style where the image is too short),
and fid_mnv2 / mem_mnv2 (tests/bench/mnv2.py) of ALL the crops against the reference (every whole training image
squashed to 64x64, as Kaggle's public scorer did). A generator can at best reproduce its training crops, so a crop
set closer to the reference is a better target; it says nothing about how well a GAN learns from it. fid_mnv2 is a
development metric, NOT Kaggle's score, and the sets here have ~2,085 images against 1,953 (compare only with each
other).
"""
import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mnv2 import MobileNetV2Features, Reference, reference_features, score  # noqa: E402

from modules.data.annotations import list_annotations, list_images, read_voc  # noqa: E402
from modules.data.annotations import CROP_STYLES  # noqa: E402
from modules.data.dogs import find_data_dir, load_dogs  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def window_shapes(images_dir, annotation_dir, style, margin):
    """-> (boxes, windows that cut the box, rectangular windows) for one crop style, over the images present (the
    XML's image size; EXIF rotation ignored)."""
    _, annotations = list_annotations(Path(annotation_dir), Counter())
    present = list_images(Path(images_dir), Counter())
    n = cut = rect = 0
    for key, (path, _label) in annotations.items():
        if key not in present:
            continue
        boxes, xml_size = read_voc(path, Counter(), Counter())
        if not xml_size:
            continue
        img_w, img_h = xml_size
        for x0, y0, x1, y1 in boxes:
            box = (max(x0, 0.0), max(y0, 0.0), min(x1, img_w), min(y1, img_h))
            l, t, r, b = CROP_STYLES[style](box, img_w, img_h, margin)
            n += 1
            cut += l > box[0] + 1e-6 or r < box[2] - 1e-6 or t > box[1] + 1e-6 or b < box[3] - 1e-6
            rect += not math.isclose(r - l, b - t, rel_tol=1e-6)
    return n, cut, rect


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "dogs-1953"))
    p.add_argument("--combo", action="append", default=[], metavar="STYLE:FILTER",
                   help="crop style and resize filter (repeatable; default: box:lanczos, square:box, square:lanczos, "
                        "box:box)")
    p.add_argument("--margin", type=float, default=0.1, help="crop_margin (box style; square uses none)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    combos = [c.split(":") for c in (args.combo or ["box:lanczos", "square:box", "square:lanczos", "box:box"])]
    images_dir, annotation_dir = find_data_dir(args.data_dir)
    extractor = MobileNetV2Features(threads=args.threads)
    rows = []
    ref = None
    for style, filt in combos:
        data = load_dogs(images_dir, annotation_dir, margin=args.margin, crop_styles=(style,), resize=filt)
        if ref is None:
            ref = Reference(reference_features(args.data_dir, data.reference, extractor)[0])
        s = score(data.images, ref, extractor)
        n, cut, rect = window_shapes(images_dir, annotation_dir, style, args.margin)
        rows.append({"style": style, "filter": filt, "crops": len(data.images), "boxes": n, "cut": cut,
                     "rectangular": rect, "fid_mnv2": s["fid_mnv2"], "mem_mnv2": s["mem_mnv2"]})
        print(rows[-1], flush=True)
    table = ["| crop style | resize filter | crops | windows cutting the dog | rectangular (squashed) | fid_mnv2 of "
             "the crops vs reference | mem_mnv2 |", "|---|---|---|---|---|---|---|"]
    table += [f"| {r['style']} | {r['filter']} | {r['crops']} | {r['cut']} of {r['boxes']} | {r['rectangular']} | "
              f"{r['fid_mnv2']:.1f} | {r['mem_mnv2']:.3f} |" for r in rows]
    print("\n".join(table))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
        (out / "table.md").write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
