"""Dog photos + Pascal-VOC boxes -> uint8 training crops and Kaggle's reference set, all in RAM.

find_data_dir() locates the data (the Kaggle layouts, or --data-dir) by listing directories only (modules/annotations.py
lists and parses the files); load_dogs() decodes each image once (JPEG draft mode: large photos decode at a reduced
scale), turns it upright as its EXIF orientation says, cuts one square-ish window per (box, crop style) and resizes it
with an antialiasing filter. Bad input never crashes a run: each bad file or box (one too small to give a real crop
included) is skipped and counted by reason in DogData.stats["skipped"]; repairs are counted in stats["fixed"].
"""
import concurrent.futures
import functools
import math
import multiprocessing
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from modules.annotations import DATA_SEARCH_DEPTH, list_annotations, list_images, read_voc, search_data_root
from modules.utils import UsageError, log, warn

# where the data is

FEW_IMAGES_WARN = 100  # issue 19: fewer images read than this -> a memorization WARNING (the demo set has 120)
KAGGLE_DATA_ROOTS = ("/kaggle/input/generative-dog-images", "/kaggle/input")  # current layout, then the 2019 one


def find_data_dir(data_dir=None):
    """-> (images_dir, annotation_dir or None); data_dir=None: Kaggle's locations. Lists folders, decodes nothing."""
    roots = [Path(p) for p in KAGGLE_DATA_ROOTS] if data_dir is None else [Path(data_dir).expanduser()]
    if data_dir is not None and roots[0].exists() and not roots[0].is_dir():
        raise UsageError(f"--data-dir {data_dir} is a file, not a folder: pass the (unpacked) folder holding all-dogs/ "
                         f"and Annotation/, or a folder of images")
    for root in roots:
        images, annotations = search_data_root(root)
        if images is not None:
            return images, annotations
    looked = " and ".join(f"{r}{'' if r.is_dir() else ' (missing)'}" for r in roots)
    raise UsageError(f"no dog images in {looked} (looked for all-dogs/ with .jpg files up to {DATA_SEARCH_DEPTH} "
                     f"levels deep, or images in the folder itself): pass --data-dir DIR holding all-dogs/ and "
                     f"Annotation/, or a folder of images, or --demo")


# crop windows: (box, img_w, img_h, margin) -> (left, top, right, bottom), floats in the image, holding the box centre

def _fit_square(cx, cy, side, left, top, img_w, img_h):
    """A square of `side` placed near (left, top), moved to contain (cx, cy), then into the image."""
    side = min(side, img_w, img_h)
    left = min(max(left, cx - side), cx)
    top = min(max(top, cy - side), cy)
    left = min(max(left, 0.0), img_w - side)  # keeps (cx, cy) inside: the centre lies in the image
    top = min(max(top, 0.0), img_h - side)
    return (left, top, left + side, top + side)


def _crop_box(box, img_w, img_h, margin):
    """Square of side max(w, h) * (1 + margin) centred on the box."""
    x0, y0, x1, y1 = box
    side = min(max(x1 - x0, y1 - y0) * (1 + margin), img_w, img_h)  # too big: the largest square that fits
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return _fit_square(cx, cy, side, cx - side / 2, cy - side / 2, img_w, img_h)


def _crop_tight(box, img_w, img_h, margin):
    """The box itself; the resize squashes it to a square."""
    x0, y0, x1, y1 = box
    return (max(x0, 0.0), max(y0, 0.0), min(x1, img_w), min(y1, img_h))


PADDED_EXTRA_MARGIN = 0.25  # "padded" = "box" with this much more margin


def _crop_padded(box, img_w, img_h, margin):
    return _crop_box(box, img_w, img_h, margin + PADDED_EXTRA_MARGIN)


def _crop_top(box, img_w, img_h, margin):
    """Tall boxes (h > w): a square of side ~w anchored at the box top, where the head usually is; else "box"."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if h <= w:
        return _crop_box(box, img_w, img_h, margin)
    pad = margin * w / 2
    side = min(max(w + 2 * pad, h / 2 + pad), img_w, img_h)  # very tall boxes: grow just enough to reach the box centre
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return _fit_square(cx, cy, side, cx - side / 2, y0 - pad, img_w, img_h)


def _crop_whole(box, img_w, img_h, margin):
    """The image's centre square, moved (if needed) to contain the box centre."""
    side = min(img_w, img_h)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return _fit_square(cx, cy, side, (img_w - side) / 2, (img_h - side) / 2, img_w, img_h)


def _crop_square(box, img_w, img_h, margin):
    """The 2nd place's crop: the box padded to a square of side max(w, h) inside the image, without margin (`margin`
    is not used). Along a side where the image is shorter than that, the window is the image's whole extent: the crop
    stays rectangular and the resize squashes it, so the whole dog stays in the picture (the "box" style cuts it)."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)

    def span(a0, a1, extent):  # [lo, lo + s] of length min(side, extent), centred on the box, moved into the image
        s = min(side, extent)
        lo = min(max((a0 + a1 - s) / 2, 0.0), extent - s)
        return lo, lo + s

    (left, right), (top, bottom) = span(x0, x1, img_w), span(y0, y1, img_h)
    return (left, top, right, bottom)


CROP_STYLES = {"square": _crop_square, "box": _crop_box, "tight": _crop_tight, "padded": _crop_padded, "top": _crop_top, "whole": _crop_whole}


# Resize filters of the crops. "box" is area averaging (each output pixel the mean of the input pixels it covers), as
# the 2nd place's cv2.INTER_AREA; "lanczos" the sharper windowed sinc. Either runs after JPEG draft decoding (a DCT
# downscale by 1/2..1/8 that keeps every window at >= size pixels), so the filter does the last, < 2x, step.
RESIZE_FILTERS = {"box": Image.BOX, "lanczos": Image.LANCZOS}


# one image

# Smallest crop kept, as a fraction of the output side: the "box" window (longer box side + margin, at most the image)
# must be at least half the output (32 px for 64 x 64), i.e. upscaled at most 2x. Below that the training image is
# mostly interpolation (a 1 x 1 box would become 64 x 64 of one colour). On the real sample (1,953 images, 2,085 boxes,
# margin 0.1) no window is below 32 px, 1 below 48 and 3 below 64: the cut loses no real dog; windows between half and
# the full output side are kept and counted as box_upscaled (tests/bench/bench_box_sizes.py measures this).
MIN_CROP_FRACTION = 0.5


def _clean_box(box, img_w, img_h, *, min_aspect, max_aspect, margin, size, fixed):
    """-> the box clamped to the image, or a skip reason (str). In whole-image mode the box is the whole image."""
    x0, y0, x1, y1 = box
    if not all(map(math.isfinite, box)):
        return "box_unparseable"
    if x1 < x0 or y1 < y0:
        return "box_inverted"
    if x1 - x0 < 1 or y1 - y0 < 1:
        return "box_empty"
    c = (max(x0, 0.0), max(y0, 0.0), min(x1, float(img_w)), min(y1, float(img_h)))
    w, h = c[2] - c[0], c[3] - c[1]
    if w < 1 or h < 1:
        return "box_outside"
    if not min_aspect <= w / h <= max_aspect:
        return "aspect"
    side = min(max(w, h) * (1 + margin), img_w, img_h)  # the "box" style's window
    if side < size * MIN_CROP_FRACTION:
        return "box_too_small"
    if c != box:
        fixed["box_clamped"] += 1
    if side < size:
        fixed["box_upscaled"] += 1
    return c


# EXIF orientation (tag 0x0112) -> the transpose that shows the image upright, as ImageOps.exif_transpose applies it
EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}


def _exif_orientation(im):
    """-> the EXIF orientation 2..8 that changes how im is shown, or None (1, absent, unreadable)."""
    try:
        value = im.getexif().get(0x0112)
    except Exception:  # corrupt EXIF: shown as stored
        return None
    return value if value in EXIF_TRANSPOSE else None


def _orient_box(box, orientation, raw_w, raw_h):
    """A box on the stored pixels (raw_w x raw_h) -> the same box on the upright image."""
    x0, y0, x1, y1 = box
    corners = {2: ((raw_w - x1, y0), (raw_w - x0, y1)), 3: ((raw_w - x1, raw_h - y1), (raw_w - x0, raw_h - y0)),
               4: ((x0, raw_h - y1), (x1, raw_h - y0)), 5: ((y0, x0), (y1, x1)),
               6: ((raw_h - y1, x0), (raw_h - y0, x1)), 7: ((raw_h - y1, raw_w - x1), (raw_h - y0, raw_w - x0)),
               8: ((y0, raw_w - x1), (y1, raw_w - x0))}[orientation]
    return (*corners[0], *corners[1])


def _to_rgb(im):
    if im.mode == "RGB":
        return im
    if im.mode in ("I", "F") or im.mode.startswith("I;"):  # 16/32-bit grey: stretch to 8 bits rather than clip at 255
        a = np.asarray(im, dtype=np.float32)
        hi = float(a.max()) if a.size else 0.0
        im = Image.fromarray(np.clip(a * (255.0 / hi) if hi > 255 else a, 0, 255).astype(np.uint8))
    elif "A" in im.mode or "transparency" in im.info:  # transparent parts -> white, not the colour hidden under them
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


def _load_one_dog(job, *, size, margin, styles, include_whole, min_aspect, max_aspect, keep_reference, resize):
    """job = (image path, annotation path or None, label) -> (label, crops uint8 [k,size,size,3] or None,
    reference uint8 [size,size,3] or None, skipped Counter, fixed Counter, boxes used). Never raises."""
    path, ann_path, label = job
    skipped, fixed = Counter(), Counter()
    try:
        voc = read_voc(ann_path) if ann_path is not None else ([], None, 0, False, 0)
        if isinstance(voc, str):
            skipped[voc] += 1
            voc = ([], None, 0, False, 0)
        raw_boxes, xml_size, n_bad, namespaced, n_dropped = voc
        skipped["box_unparseable"] += n_bad
        skipped["box_repeated_or_over_cap"] += n_dropped
        fixed["xml_namespace"] += namespaced
        if os.path.getsize(path) == 0:
            skipped["empty_file"] += 1
            return label, None, None, skipped, fixed, 0
        with Image.open(path) as im:
            raw_w, raw_h = im.size  # as stored; boxes and windows live on the upright image, img_w x img_h
            orientation = _exif_orientation(im)
            img_w, img_h = (raw_h, raw_w) if orientation in (5, 6, 7, 8) else (raw_w, raw_h)
            if orientation:
                fixed["exif_rotated"] += 1
            if ann_path is None:
                raw_boxes = [(0.0, 0.0, float(img_w), float(img_h))]
            elif orientation in (5, 6, 7, 8) and xml_size == (raw_w, raw_h):  # drawn on the stored pixels
                fixed["box_exif_rotated"] += 1
                raw_boxes = [_orient_box(b, orientation, raw_w, raw_h) for b in raw_boxes]
            elif xml_size and min(xml_size) > 0 and xml_size != (img_w, img_h):  # boxes drawn on a resized copy
                fixed["box_rescaled"] += 1
                sx, sy = img_w / xml_size[0], img_h / xml_size[1]
                raw_boxes = [(b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy) for b in raw_boxes]
            boxes = []
            for b in raw_boxes:
                c = _clean_box(b, img_w, img_h, min_aspect=min_aspect, max_aspect=max_aspect, margin=margin,
                               size=size, fixed=fixed)
                if isinstance(c, str):
                    skipped[c] += 1
                else:
                    boxes.append(c)
            windows = [CROP_STYLES[s](b, img_w, img_h, margin) for b in boxes for s in styles]
            if include_whole and boxes:
                windows.append(_crop_whole((0, 0, img_w, img_h), img_w, img_h, margin))
            if not windows and not keep_reference:
                return label, None, None, skipped, fixed, 0
            if im.format == "JPEG":  # decode at the smallest scale (1/1..1/8) giving every window >= size pixels
                need = [min(r - l, b - t) for l, t, r, b in windows] + ([min(img_w, img_h)] if keep_reference else [])
                scale = size / max(min(need), 1e-6)
                if scale < 1:  # the scale is the same on the stored and the upright image
                    im.draft("RGB", (math.ceil(raw_w * scale), math.ceil(raw_h * scale)))
            elif path.suffix.lower() in (".jpg", ".jpeg"):
                fixed["not_jpeg"] += 1  # e.g. a PNG or GIF named .jpg: decoded by content
            im.load()  # truncated or corrupt data raises here
            if im.mode != "RGB":
                fixed[f"mode_{im.mode}"] += 1
            rgb = _to_rgb(im)
            if orientation:
                rgb = rgb.transpose(EXIF_TRANSPOSE[orientation])
        fx, fy = rgb.width / img_w, rgb.height / img_h
        crops = [np.asarray(rgb.resize((size, size), RESIZE_FILTERS[resize],
                                       box=(l * fx, t * fy, min(r * fx, rgb.width), min(b * fy, rgb.height))))
                 for l, t, r, b in windows]
        ref = np.asarray(rgb.resize((size, size), Image.BILINEAR)) if keep_reference else None
        return label, (np.stack(crops) if crops else None), ref, skipped, fixed, len(boxes)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        reason = "too_large"
    except Exception as exc:  # bad input of any kind must not end the run; the reason is counted
        reason = "truncated" if "truncated" in str(exc).lower() else "unreadable"
    skipped[reason] += 1
    return label, None, None, skipped, fixed, 0


# the data set

@dataclass
class DogData:
    images: np.ndarray  # uint8 [N,size,size,3]: a row per (box, crop style), a centre square per image if include_whole
    labels: np.ndarray  # int64 [N], index into classes
    classes: list  # breed names (annotation folders <wnid>-<breed>), sorted; ["dog"] without annotations
    reference: np.ndarray | None  # uint8 [M,size,size,3]: every readable whole image squashed to size x size
    stats: dict  # images_read, boxes_used, rows, skipped {reason: n}, fixed {what: n}, ...
    seconds: float


def _run_jobs(fn, jobs, workers, pool):
    """fn over jobs in order: threads (PIL decodes and resizes without the GIL) or a fork-context process pool."""
    if workers <= 1 or len(jobs) < 2:
        return [fn(j) for j in jobs]
    if pool == "fork" and "fork" in multiprocessing.get_all_start_methods():  # fork: works when the code is __main__
        with multiprocessing.get_context("fork").Pool(workers) as p:
            return p.map(fn, jobs, chunksize=max(1, min(64, len(jobs) // (8 * workers))))
    with concurrent.futures.ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, jobs))


def load_dogs(images_dir, annotation_dir, *, size=64, margin=0.1, crop_styles=("box",), include_whole=False,
              min_aspect=0.0, max_aspect=float("inf"), keep_reference=True, workers=2, limit=None, pool="thread",
              resize="lanczos"):
    """Every image -> crops (see DogData). annotation_dir=None: whole-image mode, a centre square per image, "dog".

    margin: fraction of the box side added around it (not by "square"); resize: RESIZE_FILTERS; min/max_aspect: keep boxes with min <= w/h <= max (whole-image
    mode: the image's w/h); limit: the first N images (by id) only; pool: "thread" (PIL decodes and resizes without
    the GIL; 1,953 real images, 2 cores: 1.6-1.8 s wall, 1.8 CPU-s) or "fork" (a process pool: 2.3 s, 2.1 CPU-s).
    """
    t0 = time.monotonic()
    unknown = [s for s in crop_styles if s not in CROP_STYLES]
    if unknown or not crop_styles:
        raise UsageError(f"unknown crop style(s) {unknown or '(none)'}: choose from {', '.join(CROP_STYLES)}")
    if resize not in RESIZE_FILTERS:
        raise UsageError(f"unknown resize filter {resize!r}: choose from {', '.join(RESIZE_FILTERS)}")
    images_dir = Path(images_dir)
    skipped = Counter()
    files = list_images(images_dir, skipped) if images_dir.is_dir() else {}
    if annotation_dir is None:
        classes, n_ann, styles, include_whole = ["dog"], 0, ("whole",), False
        jobs = [(files[k], None, 0) for k in sorted(files)]
    else:
        classes, annotations = list_annotations(Path(annotation_dir), skipped)
        n_ann, styles = len(annotations), tuple(crop_styles)
        skipped["no_image"] += sum(k not in files for k in annotations)
        skipped["no_annotation"] += sum(k not in annotations for k in files)
        jobs = [(files[k], *annotations[k]) for k in sorted(files) if k in annotations]
    jobs = jobs[:limit] if limit is not None else jobs
    one = functools.partial(_load_one_dog, size=size, margin=margin, styles=styles, include_whole=include_whole,
                            min_aspect=min_aspect, max_aspect=max_aspect, keep_reference=keep_reference, resize=resize)
    with warnings.catch_warnings():  # for this call only: a decompression bomb is skipped and counted, not warned about
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # e.g. "Corrupt EXIF data"
        results = _run_jobs(one, jobs, workers, pool)

    labels, crops, refs, fixed, boxes_used = [], [], [], Counter(), 0
    for label, rows, ref, s, f, n in results:
        skipped.update(s)
        fixed.update(f)
        boxes_used += n
        if ref is not None:
            refs.append(ref)
        if rows is not None:
            crops.append(rows)
            labels.append(np.full(len(rows), label, dtype=np.int64))
    images_read = sum(r[1] is not None or r[2] is not None for r in results)
    skipped = {k: v for k, v in sorted(skipped.items()) if v}
    if not crops:
        raise UsageError(f"no usable dog image in {images_dir}: {len(files)} image files, {images_read} read, skipped "
                         f"{skipped or 'none'}; check --data-dir, or use --demo")
    images = np.concatenate(crops)  # [N,size,size,3] uint8
    seconds = time.monotonic() - t0
    stats = {"images_found": len(files), "annotations_found": n_ann, "images_read": images_read,
             "boxes_used": boxes_used, "rows": len(images), "reference": len(refs), "skipped": skipped,
             "fixed": {k: v for k, v in sorted(fixed.items()) if v},
             "styles": list(styles) + (["whole"] if include_whole else []), "workers": workers, "pool": pool}
    log(f"data: {images_read} images read, {boxes_used} boxes used, {len(images)} rows {size}x{size} "
        f"({'+'.join(stats['styles'])}), {len(classes)} classes, skipped: "
        f"{', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none'} ({seconds:.1f}s, {workers} {pool} workers)")
    if images_read < FEW_IMAGES_WARN:
        warn(f"only {images_read} images ({len(images)} crops): a GAN trained on so few copies them, and Kaggle's "
             "MiFID penalises copies; use more data (the competition has 20,579 images)")
    return DogData(images=images, labels=np.concatenate(labels), classes=classes,
                   reference=np.stack(refs) if refs else None, stats=stats, seconds=seconds)
