"""Where in a photo a training image is cut and how it is resized: crop windows per style (CROP_STYLES), resize
filters (RESIZE_FILTERS), the clean-up of one box, and the EXIF orientation that turns a photo and its boxes upright.
Pure geometry on numbers; dogs.py decodes the images.
"""
import math

from PIL import Image

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
