"""Dog photos + Pascal-VOC boxes -> uint8 training crops and Kaggle's reference set, all in RAM. Each image is decoded
once (JPEG draft mode: at a reduced scale), turned upright, and cut into one window per (box, crop style). Bad input
never ends a run: each bad file or box is skipped and counted by reason in stats["skipped"], repairs in stats["fixed"].
"""
import functools
import math
import os
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from modules.data.annotations import (CROP_STYLES, DATA_SEARCH_DEPTH, EXIF_TRANSPOSE, RESIZE_FILTERS, _clean_box,
                                      _crop_whole, _exif_orientation, _orient_box, list_annotations, list_images,
                                      read_voc, search_data_root)
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

def _load_one_dog(job, *, size, margin, styles, include_whole, min_aspect, max_aspect, resize):
    """job = (image path, annotation path or None, label) -> (label, crops uint8 [k,size,size,3] or None,
    reference uint8 [size,size,3] or None when unreadable, skipped Counter, fixed Counter, boxes used). Never raises."""
    path, ann_path, label = job
    skipped, fixed = Counter(), Counter()
    try:
        raw_boxes, xml_size = read_voc(ann_path, skipped, fixed) if ann_path is not None else ([], None)
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
            cleaned = [_clean_box(b, img_w, img_h, min_aspect=min_aspect, max_aspect=max_aspect, margin=margin,
                                  size=size, fixed=fixed) for b in raw_boxes]
            skipped.update(c for c in cleaned if isinstance(c, str))  # the reason a box is skipped
            boxes = [c for c in cleaned if not isinstance(c, str)]
            windows = [CROP_STYLES[s](b, img_w, img_h, margin) for b in boxes for s in styles]
            if include_whole and boxes:
                windows.append(_crop_whole((0, 0, img_w, img_h), img_w, img_h, margin))
            if im.format == "JPEG":  # decode at the smallest scale (1/1..1/8) giving every window >= size pixels
                need = [min(r - l, b - t) for l, t, r, b in windows] + [min(img_w, img_h)]
                scale = size / max(min(need), 1e-6)
                if scale < 1:  # the scale is the same on the stored and the upright image
                    im.draft("RGB", (math.ceil(raw_w * scale), math.ceil(raw_h * scale)))
            elif path.suffix.lower() in (".jpg", ".jpeg"):
                fixed["not_jpeg"] += 1  # e.g. a PNG or GIF named .jpg: decoded by content
            im.load()  # truncated or corrupt data raises here
            if im.mode != "RGB":
                fixed[f"mode_{im.mode}"] += 1
            rgb = im.convert("RGB")
            if orientation:
                rgb = rgb.transpose(EXIF_TRANSPOSE[orientation])
        fx, fy = rgb.width / img_w, rgb.height / img_h
        crops = [np.asarray(rgb.resize((size, size), RESIZE_FILTERS[resize],
                                       box=(l * fx, t * fy, min(r * fx, rgb.width), min(b * fy, rgb.height))))
                 for l, t, r, b in windows]
        ref = np.asarray(rgb.resize((size, size), Image.BILINEAR))
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
    reference: np.ndarray  # uint8 [M,size,size,3]: every readable whole image squashed to size x size
    stats: dict  # images_read, boxes_used, rows, skipped {reason: n}, fixed {what: n}, ...
    seconds: float


def load_dogs(images_dir, annotation_dir, *, size=64, margin=0.1, crop_styles=("box",), include_whole=False,
              min_aspect=0.0, max_aspect=float("inf"), workers=2, limit=None, resize="lanczos"):
    """Every image -> crops (see DogData); annotation_dir=None: a centre square per whole image, one class "dog".
    Threads suffice: PIL decodes and resizes without the GIL (1,953 real images on 2 cores: 1.6-1.8 s)."""
    t0 = time.monotonic()  # a bad style or filter would be counted as an unreadable image: a caller's bug, asserted
    assert crop_styles and set(crop_styles) <= set(CROP_STYLES) and resize in RESIZE_FILTERS, (crop_styles, resize)
    skipped = Counter()
    files = list_images(Path(images_dir), skipped)
    if annotation_dir is None:
        classes, n_ann, styles, include_whole = ["dog"], 0, ("whole",), False
        jobs = [(files[k], None, 0) for k in sorted(files)]
    else:
        classes, annotations = list_annotations(Path(annotation_dir), skipped)
        n_ann, styles = len(annotations), tuple(crop_styles)
        skipped["no_image"] += sum(k not in files for k in annotations)
        skipped["no_annotation"] += sum(k not in annotations for k in files)
        jobs = [(files[k], *annotations[k]) for k in sorted(files) if k in annotations]
    jobs = jobs[:limit]  # None: all
    one = functools.partial(_load_one_dog, size=size, margin=margin, styles=styles, include_whole=include_whole,
                            min_aspect=min_aspect, max_aspect=max_aspect, resize=resize)
    with warnings.catch_warnings():  # for this call only: a decompression bomb is skipped and counted, not warned about
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="PIL")  # e.g. "Corrupt EXIF data"
        with ThreadPoolExecutor(workers) as ex:
            results = list(ex.map(one, jobs))

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
    images_read = len(refs)
    skipped = {k: v for k, v in sorted(skipped.items()) if v}
    if not crops:
        raise UsageError(f"no usable dog image in {images_dir}: {len(files)} image files, {images_read} read, skipped "
                         f"{skipped or 'none'}; check --data-dir, or use --demo")
    images = np.concatenate(crops)  # [N,size,size,3] uint8
    seconds = time.monotonic() - t0
    stats = {"images_found": len(files), "annotations_found": n_ann, "images_read": images_read,
             "boxes_used": boxes_used, "rows": len(images), "reference": len(refs), "skipped": skipped,
             "fixed": {k: v for k, v in sorted(fixed.items()) if v},
             "styles": list(styles) + (["whole"] if include_whole else []), "workers": workers}
    log(f"data: {images_read} images read, {boxes_used} boxes used, {len(images)} rows {size}x{size} "
        f"({'+'.join(stats['styles'])}), {len(classes)} classes, skipped: "
        f"{', '.join(f'{k} {v}' for k, v in skipped.items()) or 'none'} ({seconds:.1f}s, {workers} threads)")
    if images_read < FEW_IMAGES_WARN:
        warn(f"only {images_read} images ({len(images)} crops): a GAN trained on so few copies them, and Kaggle's "
             "MiFID penalises copies; use more data (the competition has 20,579 images)")
    return DogData(images=images, labels=np.concatenate(labels), classes=classes,
                   reference=np.stack(refs), stats=stats, seconds=seconds)
