"""Where all-dogs/ and Annotation/ are, which files they hold, and what one Pascal-VOC file says; decodes no image.
Discovery never follows a link out of the data dir and judges an Annotation/ folder by its content. Whatever cannot be
listed or read is skipped and counted by reason in a Counter, never raised.
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
