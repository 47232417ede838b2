"""Where all-dogs/ and Annotation/ are, which files they hold, and what one Pascal-VOC file says; decodes no image.
Discovery never follows a link out of the data dir and judges an Annotation/ folder by its content. Whatever cannot be
listed or read is skipped and counted by reason in a Counter, never raised.

Where in a photo a training image is cut and how it is resized: crop windows per style (CROP_STYLES), resize
filters (RESIZE_FILTERS), the clean-up of one box, and the EXIF orientation that turns a photo and its boxes upright.
Pure geometry on numbers; dogs.py decodes the images.
"""
import math
import os
import xml.etree.ElementTree as ET
from collections import Counter, deque
from pathlib import Path

from PIL import Image

from modules.recipe.utils import warn


DOG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # matched case-insensitively
DATA_SEARCH_DEPTH = 3  # all-dogs/ or Annotation/ at most this many levels below the root (e.g. all-dogs/all-dogs)
DATA_SEARCH_MAX_DIRS = 2000  # keeps the search fast on a huge tree
ANNOTATION_MAX_BYTES = 1 << 20  # a Stanford Dogs file is < 1 KB; 2,000 objects in its layout take ~0.5 MiB
MAX_BOXES_PER_IMAGE = 12  # one file with 300 boxes would make most crops one image (the real sample: at most 3)


# folders

def _inside(path, top):
    """Does path's real location lie in the folder `top` (a realpath)?"""
    return os.path.commonpath([os.path.realpath(path), top]) == top


def _entries(path, skipped, top=None):
    """-> (sub-folders, files) of path, sorted, hidden entries left out; given top (a realpath), so are links out of
    it (counted as link_outside). A folder that cannot be listed is empty (unreadable_folder)."""
    dirs, files = [], []
    try:
        with os.scandir(path) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir()
                    if not is_dir and not e.is_file():
                        continue
                    if top is not None and e.is_symlink() and not _inside(e.path, top):
                        skipped["link_outside"] += 1
                    else:
                        (dirs if is_dir else files).append(Path(e.path))
                except OSError:  # an entry that cannot even be stat'ed
                    skipped["unreadable_entry"] += 1
    except OSError:  # e.g. permission denied
        skipped["unreadable_folder"] += 1
    return sorted(dirs), sorted(files)


def _is_image_name(path):
    return path.name.lower().endswith(DOG_IMAGE_SUFFIXES)


def search_data_root(root):
    """-> (images dir or None, annotation dir or None), breadth-first: the first all-dogs/ holding images (or root
    itself when it holds images) and the first annotation/ folder one of whose breed folders holds a file."""
    top = os.path.realpath(root)
    images = annotations = None
    queue, seen, rejected, unlisted, skipped = deque([(root, 0)]), {top}, [], [], Counter()
    while queue and len(seen) <= DATA_SEARCH_MAX_DIRS and (images is None or annotations is None):
        folder, depth = queue.popleft()
        before = skipped["unreadable_folder"]
        subdirs, files = _entries(folder, skipped, top)
        if skipped["unreadable_folder"] > before and depth > 0:  # the root itself: find_data_dir's error says it
            unlisted.append(folder)
        has_image = any(map(_is_image_name, files))
        name = folder.name.lower()
        if images is None and has_image and name == "all-dogs":
            images = folder
            continue
        if images is None and has_image and depth == 0:
            images = folder  # a plain folder of images; an Annotation/ may still sit inside it
        if annotations is None and name == "annotation":
            if any(_entries(s, skipped)[1] for s in subdirs):  # judged by content: some breed folder holds a file
                annotations = folder
                continue
            rejected.append(folder)
        if depth < DATA_SEARCH_DEPTH:
            for s in subdirs:
                real = os.path.realpath(s)
                if real not in seen:  # a link back into the tree is searched once
                    seen.add(real)
                    queue.append((s, depth + 1))
    if skipped["link_outside"]:
        warn(f"{root}: {skipped['link_outside']} linked folder(s) lead out of it and were not searched")
    if unlisted and (images is None or annotations is None):
        warn(f"{root}: {len(unlisted)} folder(s) could not be listed and were not searched, e.g. {unlisted[0]}")
    if images is not None and annotations is None:
        why = "".join(f"; {r} has no breed folder holding a file" for r in rejected)
        warn(f"no annotations found under {root} (looked for an Annotation/ folder whose breed sub-folders hold files, "
             f"up to {DATA_SEARCH_DEPTH} levels deep{why}): training on whole images as one class")
    return images, annotations


# listings

def list_images(images_dir, skipped):
    """-> {stem: path} of the image files directly in images_dir."""
    found = {}
    for p in filter(_is_image_name, _entries(images_dir, skipped)[1]):
        skipped["duplicate_image"] += p.stem in found  # the first in name order is kept
        found.setdefault(p.stem, p)
    return found


def list_annotations(annotation_dir, skipped):
    """-> (classes, {image id: (xml path, label)}) from annotation_dir/<wnid>-<breed>/<id>[.xml]; a breed folder
    holding no file is no class. (Images may link anywhere, e.g. into a shared store: each is decoded and checked.)"""
    top = os.path.realpath(annotation_dir)
    held = {f: _entries(f, skipped, top)[1] for f in _entries(annotation_dir, skipped, top)[0]}
    breed = {f: f.name.split("-", 1)[-1] for f, files in held.items() if files}
    classes = sorted(set(breed.values()))
    index = {c: i for i, c in enumerate(classes)}
    found = {}
    for f in breed:
        for p in held[f]:
            key = p.name[:-4] if p.name.lower().endswith(".xml") else p.name
            skipped["duplicate_annotation"] += key in found
            found.setdefault(key, (p, index[breed[f]]))
    return classes, found


# one annotation file

def read_voc(path, skipped, fixed):
    """-> (boxes [(xmin, ymin, xmax, ymax)], (width, height) or None); ([], None) for a file skipped and counted by
    reason. Exact repeats and boxes past MAX_BOXES_PER_IMAGE are dropped: one image must not fill the training set."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > ANNOTATION_MAX_BYTES:  # refused unread: parsing it could exhaust memory
                skipped["annotation_too_large"] += 1
                return [], None
            text = f.read(ANNOTATION_MAX_BYTES)  # a file growing since the stat is cut here, then bad_xml
    except OSError:
        skipped["unreadable_xml"] += 1
        return [], None
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, ValueError):
        skipped["bad_xml"] += 1
        return [], None
    namespaced = [el for el in root.iter() if isinstance(el.tag, str) and el.tag.startswith("{")]
    for el in namespaced:  # {http://...}object -> object
        el.tag = el.tag.split("}", 1)[1]
    fixed["xml_namespace"] += bool(namespaced)
    objects = root.findall(".//object")
    if not objects:
        skipped["no_object"] += 1
        return [], None
    boxes = []
    for obj in objects:
        try:
            boxes.append(tuple(float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")))
        except (AttributeError, TypeError, ValueError):  # missing tag or text, not a number
            skipped["box_unparseable"] += 1
    try:
        size = (float(root.find("size/width").text), float(root.find("size/height").text))
    except (AttributeError, TypeError, ValueError):
        size = None
    kept = list(dict.fromkeys(boxes))[:MAX_BOXES_PER_IMAGE]  # exact repeats out, order kept, then the cap
    skipped["box_repeated_or_over_cap"] += len(boxes) - len(kept)
    return kept, size


# crop windows: (box, img_w, img_h, margin) -> (left, top, right, bottom), floats in the image, holding the box centre

def _fit_square(cx, cy, side, left, top, img_w, img_h):
    """A square of `side` (fits the image) placed near (left, top), moved to contain (cx, cy), then into the image."""
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
    """The 2nd place's crop: the box padded to a square of side max(w, h) inside the image, no margin. Where the image
    is shorter than that, the window spans it and the resize squashes it: the whole dog stays in the picture."""
    x0, y0, x1, y1 = box
    side = max(x1 - x0, y1 - y0)
    w, h = min(side, img_w), min(side, img_h)  # a rectangle where the image is shorter than side
    left = min(max((x0 + x1 - w) / 2, 0.0), img_w - w)  # centred on the box, moved into the image
    top = min(max((y0 + y1 - h) / 2, 0.0), img_h - h)
    return (left, top, left + w, top + h)


CROP_STYLES = {"square": _crop_square, "box": _crop_box,
               "padded": lambda box, img_w, img_h, margin: _crop_box(box, img_w, img_h, margin + 0.25),  # "box" + 25 %
               "top": _crop_top, "whole": _crop_whole}


# "box" is area averaging, as the 2nd place's cv2.INTER_AREA. Either filter runs after JPEG draft decoding (a DCT
# downscale that keeps every window at >= size pixels), so it does only the last, < 2x, step.
RESIZE_FILTERS = {"box": Image.BOX, "lanczos": Image.LANCZOS}


# one image

# Smallest "box" window kept, as a fraction of the output side: upscaled more than 2x, a crop is mostly interpolation.
# On the real sample no window is below 32 px of 64 (tests/bench/bench_box_sizes.py).
MIN_CROP_FRACTION = 0.5


def _clean_box(box, img_w, img_h, *, min_aspect, max_aspect, margin, size, fixed):
    """-> the box clamped to the image, or a skip reason (str)."""
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
