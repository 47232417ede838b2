"""The data folder's files: where all-dogs/ and Annotation/ are, which images and annotation files they hold, and what a
Pascal-VOC annotation says. Lists folders and reads XML; decodes no image.

Discovery never follows a link out of the data dir, and judges an Annotation/ folder by its content (one of its
breed folders holds a file), not by its first entry; when it finds images but no annotations it says so in a WARNING
line. A folder that cannot be listed, a link out of its folder, a duplicate or an unreadable annotation is skipped and
counted by reason, like a bad image file.
"""
import os
import xml.etree.ElementTree as ET
from collections import Counter, deque
from pathlib import Path

from modules.recipe.utils import warn

DOG_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # matched case-insensitively
DATA_SEARCH_DEPTH = 3  # all-dogs/ or Annotation/ at most this many levels below the root (e.g. all-dogs/all-dogs)
DATA_SEARCH_MAX_DIRS = 2000  # keeps the search fast on a huge tree
ANNOTATION_MAX_BYTES = 1 << 20  # a Stanford Dogs file is < 1 KB; 2,000 objects in its layout take ~0.5 MiB
MAX_BOXES_PER_IMAGE = 12  # one file with 300 boxes would make most crops one image (the real sample: at most 3)


# folders

def _inside(path, top):
    """Does path's real location lie in the folder `top` (a realpath)?"""
    real = os.path.realpath(path)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _entries(path, skipped, top=None):
    """-> (sub-folders, files) of path, sorted, hidden entries ignored. Counted in skipped (a Counter), never raised:
    a folder that cannot be listed (unreadable_folder, listed as empty) and, given top, a linked folder or file whose
    target lies outside it (link_outside, left out)."""
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
                        skipped["link_outside"] += 1  # a linked folder or file out of the folder is not read
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
    """-> (images dir or None, annotation dir or None) under root, breadth-first, at most DATA_SEARCH_DEPTH levels and
    DATA_SEARCH_MAX_DIRS folders, never through a link out of root: the first all-dogs/ holding images (or root itself
    when it holds images) and the first annotation/ folder one of whose sub-folders holds a file."""
    root = Path(root)
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
    for p in _entries(images_dir, skipped)[1]:
        if not _is_image_name(p):
            continue
        if p.stem in found:
            skipped["duplicate_image"] += 1
        else:
            found[p.stem] = p
    return found


def list_annotations(annotation_dir, skipped):
    """-> (classes, {image id: (xml path, label)}) from annotation_dir/<wnid>-<breed>/<id>[.xml]. A breed folder that
    cannot be listed, or is a link out of annotation_dir, is skipped and counted, and so is an annotation file that
    is a link out of it (it is not read); one holding no file is no class. (Image files may be links anywhere: a
    folder of links into a shared store is a common layout, and every image is decoded and checked.)"""
    top = os.path.realpath(annotation_dir)
    held = {f: _entries(f, skipped, top)[1] for f in _entries(annotation_dir, skipped, top)[0]}
    breed = {f: f.name.split("-", 1)[-1] for f, files in held.items() if files}
    classes = sorted(set(breed.values()))
    index = {c: i for i, c in enumerate(classes)}
    found = {}
    for f in breed:
        for p in held[f]:
            key = p.name[:-4] if p.name.lower().endswith(".xml") else p.name
            if key in found:
                skipped["duplicate_annotation"] += 1
            else:
                found[key] = (p, index[breed[f]])
    return classes, found


# one annotation file

def read_voc(path):
    """-> (boxes [(xmin, ymin, xmax, ymax)], (width, height) or None, unparseable box count, namespaced?, dropped box
    count) or a skip reason: unreadable_xml (the file cannot be read), annotation_too_large (over ANNOTATION_MAX_BYTES,
    refused from its size before it is read: parsing a huge file would exhaust the memory), bad_xml (not XML),
    no_object. Namespaced tags are accepted. A box repeated exactly, and boxes past MAX_BOXES_PER_IMAGE, are dropped
    (and counted): one image must not fill the training set with copies of itself."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size > ANNOTATION_MAX_BYTES:
                return "annotation_too_large"
            text = f.read(ANNOTATION_MAX_BYTES + 1)  # a file growing since the stat is still read only that far
    except OSError:
        return "unreadable_xml"
    if len(text) > ANNOTATION_MAX_BYTES:
        return "annotation_too_large"
    try:
        root = ET.fromstring(text)
    except (ET.ParseError, ValueError):
        return "bad_xml"
    namespaced = False
    for el in root.iter():  # {http://...}object -> object
        if isinstance(el.tag, str) and el.tag.startswith("{"):
            el.tag, namespaced = el.tag.split("}", 1)[1], True
    objects = root.findall(".//object")
    if not objects:
        return "no_object"
    boxes, bad = [], 0
    for obj in objects:
        try:
            boxes.append(tuple(float(obj.find(f"bndbox/{k}").text) for k in ("xmin", "ymin", "xmax", "ymax")))
        except (AttributeError, TypeError, ValueError):  # missing tag or text, not a number
            bad += 1
    try:
        size = (float(root.find("size/width").text), float(root.find("size/height").text))
    except (AttributeError, TypeError, ValueError):
        size = None
    kept = list(dict.fromkeys(boxes))[:MAX_BOXES_PER_IMAGE]  # exact repeats out, order kept, then the cap
    return kept, size, bad, namespaced, len(boxes) - len(kept)
