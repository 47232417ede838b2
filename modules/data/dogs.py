"""Dog photos + Pascal-VOC boxes -> uint8 training crops and Kaggle's reference set, all in RAM.

find_data_dir() locates the data (the Kaggle layouts, or --data-dir) by listing directories only
(modules/data/annotations.py lists and parses the files); load_dogs() decodes each image once (JPEG draft mode: large
photos decode at a reduced scale), turns it upright as its EXIF orientation says, cuts one square-ish window per (box,
crop style) and resizes it with an antialiasing filter (the windows, the filters and the box clean-up:
modules/data/crops.py). Bad input never crashes a run: each bad file or box (one too small to give a real crop included)
is skipped and counted by reason in DogData.stats["skipped"]; repairs are counted in stats["fixed"].
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

from modules.data.annotations import DATA_SEARCH_DEPTH, list_annotations, list_images, read_voc, search_data_root
from modules.data.crops import (CROP_STYLES, EXIF_TRANSPOSE, RESIZE_FILTERS, _clean_box, _crop_whole, _exif_orientation,
                                 _orient_box)
from modules.recipe.utils import UsageError, log, warn

# where the data is

FEW_IMAGES_WARN = 100  # fewer images read than this -> a memorization WARNING (the demo set has 120)
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


# one image

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

    margin: fraction of the box side added around it (not by "square"); resize: RESIZE_FILTERS; min/max_aspect: keep
    boxes with min <= w/h <= max (whole-image mode: the image's w/h); limit: the first N images (by id) only; pool:
    "thread" (PIL decodes and resizes without the GIL; 1,953 real images, 2 cores: 1.6-1.8 s wall, 1.8 CPU-s) or "fork"
    (a process pool: 2.3 s, 2.1 CPU-s).
    """
    t0 = time.monotonic()  # a bad style or filter would be counted as an unreadable image: a caller's bug, asserted
    assert crop_styles and set(crop_styles) <= set(CROP_STYLES) and resize in RESIZE_FILTERS, (crop_styles, resize)
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
