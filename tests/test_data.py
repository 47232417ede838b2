"""modules/data/dogs.py and modules/data/annotations.py: crop windows, every bad-input class (skipped and counted, never
raised), layouts, discovery (links, stray entries, folders that cannot be listed), EXIF orientation, modes, filters.

Tests run as root here, and chmod does not stop root from listing or reading: "permission denied" is simulated by a
monkeypatch of os.scandir / os.listdir / the annotations module's open raising PermissionError for one path.
"""
import io
import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.data import annotations
from modules.data.annotations import ANNOTATION_MAX_BYTES, read_voc
from modules.data.annotations import CROP_STYLES, EXIF_TRANSPOSE, MIN_CROP_FRACTION, _orient_box
from modules.data.dogs import find_data_dir, load_dogs
from modules.recipe.utils import UsageError

REAL_SAMPLE = Path("/work/shared/data/dogs-1953")  # 1,953 real images and their annotations; absent on most machines
SIZE = 32  # crop side for the small fixtures


# fixtures

def voc(boxes, size=(200, 150), name="dog"):
    """Pascal-VOC text like the Stanford Dogs files; boxes = [(xmin, ymin, xmax, ymax)], written as given."""
    objs = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for b in boxes)
    return (f"<annotation><filename>x</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size><segment>0</segment>{objs}</annotation>")


def image_bytes(mode="RGB", size=(200, 150), fmt="JPEG", seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 200).astype(np.uint16))
    elif mode == "P":
        im = rgb.quantize(16)
    else:
        im = rgb.convert(mode)
    b = io.BytesIO()
    im.save(b, fmt)
    return b.getvalue()


def add(root, breed, image_id, data=None, xml=None, ext=".jpg"):
    """One image (bytes, or None for no image) and one annotation (text, or None for none) in the Kaggle layout."""
    (root / "all-dogs").mkdir(parents=True, exist_ok=True)
    if data is not None:
        (root / "all-dogs" / f"{image_id}{ext}").write_bytes(data)
    if xml is not None:
        folder = root / "Annotation" / breed
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image_id).write_text(xml)


GOOD_BOX = (20, 30, 120, 140)


def good_dataset(root, n=3, breeds=("n01-alpha", "n02-beta")):
    for b in breeds:
        for i in range(n):
            add(root, b, f"{b}_{i}", image_bytes(seed=i), voc([GOOD_BOX]))
    return root


# crop windows

def random_case(rng):
    img_w, img_h = rng.randint(8, 600), rng.randint(8, 600)
    x0, y0 = rng.uniform(0, img_w - 1), rng.uniform(0, img_h - 1)
    x1, y1 = rng.uniform(x0 + 1, img_w), rng.uniform(y0 + 1, img_h)
    return (x0, y0, x1, y1), img_w, img_h


@pytest.mark.parametrize("style", sorted(CROP_STYLES))
def test_crop_window_inside_image_and_contains_box_centre(style):
    rng = random.Random(0)
    for _ in range(3000):
        box, img_w, img_h = random_case(rng)
        margin = rng.choice([0.0, 0.1, 0.5])
        l, t, r, b = CROP_STYLES[style](box, img_w, img_h, margin)
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        eps = 1e-6
        assert -eps <= l < r <= img_w + eps and -eps <= t < b <= img_h + eps, (style, box, img_w, img_h)
        assert l - eps <= cx <= r + eps and t - eps <= cy <= b + eps, (style, box, img_w, img_h)
        if style != "square":
            assert abs((r - l) - (b - t)) < 1e-6  # square
        if style == "square":  # the whole box inside; each side max(w, h), or the image's extent where it is shorter
            assert l - eps <= box[0] and box[2] <= r + eps and t - eps <= box[1] and box[3] <= b + eps
            side = max(box[2] - box[0], box[3] - box[1])
            assert r - l == pytest.approx(min(side, img_w)) and b - t == pytest.approx(min(side, img_h))


def test_box_style_side_and_largest_square_when_image_too_small():
    assert CROP_STYLES["box"]((100, 100, 200, 150), 400, 400, 0.1) == pytest.approx((95, 70, 205, 180))
    # needs a 220-px square but the image is 300 x 160: the largest square (160) that fits, centred as far as it can
    assert CROP_STYLES["box"]((10, 10, 210, 150), 300, 160, 0.1) == pytest.approx((30, 0, 190, 160))
    # box at the image edge: shifted inside instead of padded
    assert CROP_STYLES["box"]((0, 0, 50, 50), 400, 400, 0.2) == pytest.approx((0, 0, 60, 60))


def test_square_style_is_the_2nd_places_crop():
    """The box padded to a square inside the image without margin; rectangular where the image is too short, so the
    resize squashes it and the whole dog stays in the picture (the "box" style would cut it)."""
    assert CROP_STYLES["square"]((100, 100, 200, 150), 400, 400, 0.1) == pytest.approx((100, 75, 200, 175))
    assert CROP_STYLES["square"]((10, 10, 210, 150), 300, 160, 0.1) == pytest.approx((10, 0, 210, 160))
    assert CROP_STYLES["square"]((0, 0, 50, 20), 400, 400, 0.5) == pytest.approx((0, 0, 50, 50))  # at the edge


def test_resize_filters_box_is_area_averaging(tmp_path):
    """crop_filter "box" averages the pixels each output pixel covers (cv2's INTER_AREA); lanczos is another filter;
    an unknown one is refused when parsed (test_config)."""
    root = tmp_path / "d"
    stripes = np.zeros((128, 128, 3), dtype=np.uint8)
    stripes[:, ::2] = 255  # 1-px columns: area averaging (4x4 at SIZE 32) gives flat grey 127/128
    buf = io.BytesIO()
    Image.fromarray(stripes).save(buf, format="PNG")
    add(root, "n01-alpha", "a", data=buf.getvalue(), xml=voc([(0, 0, 128, 128)], size=(128, 128)))
    box, lanczos = (load_dogs(*find_data_dir(root), size=SIZE, resize=f, workers=1).images[0]
                    for f in ("box", "lanczos"))
    assert np.abs(box.astype(float) - 127.5).max() <= 1
    assert not np.array_equal(box, lanczos)


def test_top_style_keeps_the_top_of_tall_boxes_and_whole_is_centre_square():
    l, t, r, b = CROP_STYLES["top"]((100, 50, 200, 350), 400, 400, 0.0)  # tall 100 x 300 box
    assert (l, t) == pytest.approx((75, 50)) and r - l == pytest.approx(150)  # reaches the centre (y=200)
    wide = (100, 50, 300, 150)
    assert CROP_STYLES["top"](wide, 400, 400, 0.1) == CROP_STYLES["box"](wide, 400, 400, 0.1)
    assert CROP_STYLES["whole"]((0, 0, 300, 200), 300, 200, 0.1) == pytest.approx((50, 0, 250, 200))
    padded, box = (CROP_STYLES[s]((100, 100, 200, 200), 400, 400, 0.1) for s in ("padded", "box"))
    assert padded[2] - padded[0] > box[2] - box[0]


@pytest.mark.parametrize("style", sorted(CROP_STYLES))
def test_each_style_loads_size_by_size_crops(tmp_path, style):
    d = load_dogs(*find_data_dir(good_dataset(tmp_path)), size=SIZE, crop_styles=(style,), workers=1)
    assert d.images.shape == (6, SIZE, SIZE, 3) and d.images.dtype == np.uint8
    assert d.images.std() > 10  # real pixels, not a blank fill


def test_unknown_crop_style_or_filter_is_a_callers_bug(tmp_path):
    """Refused when parsed (test_config); a caller that passes one anyway is stopped, not told that no image could be
    read (every image would be counted as unreadable)."""
    root = find_data_dir(good_dataset(tmp_path))
    for kwargs in (dict(crop_styles=("zoom",)), dict(crop_styles=()), dict(resize="cubic")):
        with pytest.raises(AssertionError):
            load_dogs(*root, **kwargs)


# bad input: each class skipped or handled, counted, never raised

def test_every_bad_input_class_is_counted_and_never_raises(tmp_path):
    a, g = "n01-alpha", image_bytes()
    add(tmp_path, a, "good", g, voc([GOOD_BOX]))
    for mode in ("L", "CMYK"):
        add(tmp_path, a, f"mode_{mode}", image_bytes(mode), voc([GOOD_BOX]))
    for mode in ("P", "RGBA", "I;16"):
        add(tmp_path, a, f"png_{mode}", image_bytes(mode, fmt="PNG"), voc([GOOD_BOX]), ext=".png")
    add(tmp_path, a, "png_named_jpg", image_bytes(fmt="PNG"), voc([GOOD_BOX]))
    add(tmp_path, a, "gif_named_jpg", image_bytes(fmt="GIF"), voc([GOOD_BOX]))
    add(tmp_path, a, "upper_ext", g, voc([GOOD_BOX]), ext=".JPEG")
    add(tmp_path, a, "corrupt", b"this is not an image at all" * 10, voc([GOOD_BOX]))
    add(tmp_path, a, "truncated", g[: len(g) // 2], voc([GOOD_BOX]))
    add(tmp_path, a, "zero_byte", b"", voc([GOOD_BOX]))
    add(tmp_path, a, "no_xml", g)  # image with no annotation file
    add(tmp_path, a, "malformed_xml", g, "<annotation><object><bndbox><xmin>3</xmin>")
    add(tmp_path, a, "no_object", g, voc([]))
    add(tmp_path, a, "partly_outside", g, voc([(-50, -20, 150, 400)]))  # clamped, kept
    add(tmp_path, a, "fully_outside", g, voc([(500, 500, 600, 600)]))
    add(tmp_path, a, "zero_area", g, voc([(50, 50, 50, 90)]))
    add(tmp_path, a, "inverted", g, voc([(120, 140, 20, 30)]))
    add(tmp_path, a, "not_a_number", g, voc([("ten", 30, 120, 140), GOOD_BOX]))  # one bad box, one good
    add(tmp_path, a, "no_image", None, voc([GOOD_BOX]))  # annotation with no image

    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=2)

    assert d.stats["skipped"] == {"bad_xml": 1, "box_empty": 1, "box_inverted": 1, "box_outside": 1,
                                  "box_unparseable": 1, "empty_file": 1, "no_annotation": 1, "no_image": 1,
                                  "no_object": 1, "truncated": 1, "unreadable": 1}
    good = ["good", "mode_L", "mode_CMYK", "png_P", "png_RGBA", "png_I;16", "png_named_jpg", "gif_named_jpg",
            "upper_ext", "partly_outside", "not_a_number"]
    assert d.stats["boxes_used"] == d.stats["rows"] == len(good) == len(d.images)
    # decoded: the good ones + those whose boxes were all bad (they still belong to the whole-image reference set)
    assert d.stats["images_read"] == d.stats["reference"] == len(good) + 5 == len(d.reference)
    fixed = d.stats["fixed"]
    assert fixed["box_clamped"] == 1 and fixed["not_jpeg"] == 2
    assert all(fixed[f"mode_{m}"] >= 1 for m in ("L", "CMYK", "P", "RGBA", "I;16"))
    assert d.images.dtype == np.uint8 and d.images.shape[1:] == (SIZE, SIZE, 3)


def test_duplicate_images_and_annotations_are_skipped_and_counted(tmp_path):
    good_dataset(tmp_path, n=1)
    add(tmp_path, "n01-alpha", "n01-alpha_0", image_bytes(fmt="PNG"), ext=".png")  # a second image of the same id
    (tmp_path / "Annotation" / "n01-alpha" / "n01-alpha_0.xml").write_text(voc([GOOD_BOX]))  # and annotation
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=1)
    assert d.stats["skipped"] == {"duplicate_annotation": 1, "duplicate_image": 1} and len(d.images) == 2


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    good_dataset(tmp_path, n=1)
    add(tmp_path, "n01-alpha", "huge", image_bytes(size=(300, 300)), voc([GOOD_BOX], size=(300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 150)  # the 300 x 300 image now counts as a bomb
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=2)
    assert d.stats["skipped"] == {"too_large": 1} and len(d.images) == 2


def test_a_huge_annotation_is_refused_from_its_size_and_counted(tmp_path):
    """A 4 GiB annotation (sparse: no disk) is skipped as annotation_too_large before it is read; the image stays."""
    good_dataset(tmp_path, n=1)
    add(tmp_path, "n01-alpha", "huge_xml", image_bytes(), voc([GOOD_BOX]))
    with open(tmp_path / "Annotation" / "n01-alpha" / "huge_xml", "r+b") as f:
        f.truncate(4 << 30)
    skipped = Counter()
    assert read_voc(tmp_path / "Annotation" / "n01-alpha" / "huge_xml", skipped, Counter()) == ([], None)
    assert skipped == {"annotation_too_large": 1}
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=1)
    assert d.stats["skipped"] == {"annotation_too_large": 1} and d.stats["images_read"] == 3


STANFORD_XML = ("<annotation>\n\t<folder>{folder}</folder>\n\t<filename>{id}</filename>\n"  # the real files' layout
                "\t<source>\n\t\t<database>ImageNet database</database>\n\t</source>\n"
                "\t<size>\n\t\t<width>{w}</width>\n\t\t<height>{h}</height>\n\t\t<depth>3</depth>\n\t</size>\n"
                "\t<segment>0</segment>\n{objects}</annotation>\n")
STANFORD_OBJECT = ("\t<object>\n\t\t<name>{breed}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n"
                   "\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
                   "\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n")


def test_an_annotation_of_2000_objects_is_read(tmp_path):
    """2,000 objects in the Stanford Dogs layout (a long breed name, 4-digit coordinates) fit ANNOTATION_MAX_BYTES."""
    obj = STANFORD_OBJECT.format(breed="Greater_Swiss_Mountain_dog", x0=1000, y0=1000, x1=2000, y1=2000)
    text = STANFORD_XML.format(folder="02107574", id="n02107574_1000", w=3000, h=3000, objects=obj * 2000)
    (tmp_path / "a").write_text(text)
    assert len(text) < ANNOTATION_MAX_BYTES / 2
    skipped = Counter()
    boxes, size = read_voc(tmp_path / "a", skipped, Counter())
    assert boxes == [(1000, 1000, 2000, 2000)] and size == (3000, 3000)
    assert +skipped == {"box_repeated_or_over_cap": 1999}


def test_boxes_are_rescaled_when_the_xml_size_differs_from_the_image(tmp_path):
    add(tmp_path, "n01-alpha", "half", image_bytes(size=(200, 150)), voc([(20, 15, 80, 60)], size=(100, 75)))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, crop_styles=("square",), workers=1)
    assert d.stats["fixed"] == {"box_rescaled": 1} and not d.stats["skipped"]


# EXIF orientation

def upright_with_patch(size=(800, 600), patch=(80, 120, 320, 360)):
    """A noise-free grey picture, upright, with a red square at patch (its 'dog')."""
    im = Image.new("RGB", size, (128, 128, 128))
    im.paste((255, 0, 0), patch)
    return im


@pytest.mark.parametrize("drawn_on", ["upright", "stored"])
def test_exif_orientation_is_applied_before_cropping(tmp_path, drawn_on):
    """Stored pixels rotated 90 deg counter-clockwise, EXIF 6 says "turn clockwise to show": the box (on the upright
    picture, or on the stored pixels as some tools write it) must still cut the red patch, also when draft() decodes at
    a reduced scale (a 240-px box for 32-px crops: 1/4)."""
    patch = (80, 120, 320, 360)
    upright = upright_with_patch(patch=patch)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 600 x 800
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    from PIL import ImageOps
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buf.getvalue()))))[240, 200],
                          np.asarray(Image.open(io.BytesIO(buf.getvalue())).transpose(EXIF_TRANSPOSE[6]))[240, 200])
    if drawn_on == "upright":
        box, xml_size = patch, upright.size
    else:  # the same patch in the stored pixels' coordinates: x = y_upright, y = 800 - x_upright
        box, xml_size = (patch[1], 800 - patch[2], patch[3], 800 - patch[0]), stored.size
    add(tmp_path, "n01-alpha", "rotated", buf.getvalue(), voc([box], size=xml_size))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, crop_styles=("square",), workers=1)
    crop = d.images[0].astype(int)
    assert crop[..., 0].mean() > 230 and crop[..., 1].mean() < 30 and crop[..., 2].mean() < 30  # all red: the patch
    assert d.stats["fixed"].get("exif_rotated") == 1 and "box_rescaled" not in d.stats["fixed"]
    assert d.reference[0].shape == (SIZE, SIZE, 3)
    ref = d.reference[0].astype(int)  # the reference is upright too: red in the upper left, where the patch is
    assert ref[SIZE * 240 // 600, SIZE * 200 // 800, 0] > 200 and ref[SIZE * 240 // 600, SIZE * 200 // 800, 1] < 60


@pytest.mark.parametrize("orientation", sorted(EXIF_TRANSPOSE))
def test_orient_box_matches_the_transpose(orientation):
    raw = np.zeros((60, 100), dtype=np.uint8)  # raw_w 100, raw_h 60
    box = (10, 5, 30, 45)
    raw[box[1]:box[3], box[0]:box[2]] = 255
    shown = np.asarray(Image.fromarray(raw).transpose(EXIF_TRANSPOSE[orientation]))
    ys, xs = np.nonzero(shown)
    assert _orient_box(box, orientation, 100, 60) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


# boxes too small for a real crop

def test_boxes_too_small_for_a_real_crop_are_skipped_and_counted(tmp_path):
    """size 32: a box window (longer side + 10% margin) under 16 px is skipped; 16-32 px is kept as box_upscaled."""
    assert SIZE * MIN_CROP_FRACTION == 16
    g = image_bytes()
    add(tmp_path, "n01-alpha", "one_pixel", g, voc([(50, 50, 51, 51)]))
    add(tmp_path, "n01-alpha", "small", g, voc([(50, 50, 64, 60)]))  # 14 x 10: window 15.4 px
    add(tmp_path, "n01-alpha", "upscaled", g, voc([(50, 50, 70, 60)]))  # 20 x 10: window 22 px
    add(tmp_path, "n01-alpha", "big", g, voc([GOOD_BOX]))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=1)
    assert d.stats["skipped"] == {"box_too_small": 2} and d.stats["fixed"] == {"box_upscaled": 1}
    assert d.stats["boxes_used"] == 2 and len(d.images) == 2 and d.stats["reference"] == 4


def test_whole_images_too_small_for_a_real_crop_are_skipped_and_counted(tmp_path):
    for i, size in enumerate([(200, 150), (20, 10), (200, 12), (24, 24)]):
        (tmp_path / f"img{i}.png").write_bytes(image_bytes(size=size, fmt="PNG", seed=i))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE)
    assert d.stats["skipped"] == {"box_too_small": 2} and d.stats["fixed"] == {"box_upscaled": 1} and len(d.images) == 2


def test_no_usable_image_is_a_one_line_usage_error(tmp_path):
    add(tmp_path, "n01-alpha", "corrupt", b"garbage", voc([GOOD_BOX]))
    with pytest.raises(UsageError) as e:
        load_dogs(*find_data_dir(tmp_path), size=SIZE)
    assert str(tmp_path / "all-dogs") in str(e.value) and "\n" not in str(e.value)


# finding the data

def test_empty_or_missing_dir_fails_fast_with_one_line(tmp_path):
    for d in (tmp_path, tmp_path / "nope"):
        t0 = time.monotonic()
        with pytest.raises(UsageError) as e:
            find_data_dir(str(d))
        assert time.monotonic() - t0 < 1.0
        msg = str(e.value)
        assert str(d) in msg and "--data-dir" in msg and "--demo" in msg and "\n" not in msg


def test_data_dir_that_is_a_file_says_so(tmp_path):
    f = tmp_path / "dogs.zip"
    f.write_bytes(b"PK")
    with pytest.raises(UsageError) as e:
        find_data_dir(str(f))
    msg = str(e.value)
    assert str(f) in msg and "is a file, not a folder" in msg and "missing" not in msg and "\n" not in msg


def test_layouts_flat_nested_and_plain(tmp_path):
    flat = good_dataset(tmp_path / "flat")
    assert find_data_dir(flat) == (flat / "all-dogs", flat / "Annotation")
    nested = tmp_path / "nested"  # Kaggle: all-dogs/all-dogs/*.jpg and annotation/Annotation/<breed>/<id>
    (nested / "all-dogs").mkdir(parents=True)
    (flat / "all-dogs").rename(nested / "all-dogs" / "all-dogs")
    (nested / "annotation").mkdir()
    (flat / "Annotation").rename(nested / "annotation" / "Annotation")
    assert find_data_dir(nested) == (nested / "all-dogs" / "all-dogs", nested / "annotation" / "Annotation")
    plain = tmp_path / "plain"
    plain.mkdir()
    for i in range(3):
        (plain / f"img{i}.png").write_bytes(image_bytes(fmt="PNG", seed=i))
    assert find_data_dir(plain) == (plain, None)


def test_plain_folder_mode_is_one_centre_square_per_image(tmp_path):
    for i, size in enumerate([(200, 150), (90, 300), (64, 64)]):
        (tmp_path / f"img{i}.jpg").write_bytes(image_bytes(size=size, seed=i))
    (tmp_path / "notes.txt").write_text("not an image")
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, include_whole=True, crop_styles=("box",))
    assert d.classes == ["dog"] and d.images.shape == (3, SIZE, SIZE, 3) and d.labels.tolist() == [0, 0, 0]
    assert d.reference.shape == (3, SIZE, SIZE, 3)


# discovery: judged by content, kept inside the data dir; folders that cannot be listed; annotation files

def deny(monkeypatch, *denied):
    """os.scandir and os.listdir raise PermissionError for these folders, as for a folder without read permission."""
    denied = {os.path.realpath(p) for p in denied}

    def wrap(real):
        def guarded(path="."):
            if os.path.realpath(path) in denied:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)
        return guarded
    monkeypatch.setattr(os, "scandir", wrap(os.scandir))
    monkeypatch.setattr(os, "listdir", wrap(os.listdir))


def test_breed_folder_that_cannot_be_listed_is_skipped_and_counted(tmp_path, monkeypatch):
    good_dataset(tmp_path, n=2, breeds=("n01-alpha", "n02-beta", "n03-gamma"))
    deny(monkeypatch, tmp_path / "Annotation" / "n03-gamma")
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=2)
    assert d.stats["skipped"] == {"unreadable_folder": 1, "no_annotation": 2}  # gamma's two images lost their boxes
    assert d.classes == ["alpha", "beta"] and len(d.images) == 4


def stray_empty(ann):
    (ann / "000-empty").mkdir()


def stray_link(ann):
    (ann / "000-loop").symlink_to("..", target_is_directory=True)


def stray_file(ann):
    (ann / "000-README.txt").write_text("not a breed folder")


@pytest.mark.parametrize("stray", [stray_empty, stray_link, stray_file, "unreadable"])
def test_a_stray_first_entry_in_annotation_keeps_every_annotation(tmp_path, monkeypatch, stray):
    good_dataset(tmp_path, n=2)
    ann = tmp_path / "Annotation"
    if stray == "unreadable":
        (ann / "000-locked").mkdir()
        (ann / "000-locked" / "x").write_text(voc([GOOD_BOX]))
        deny(monkeypatch, ann / "000-locked")
    else:
        stray(ann)
    assert find_data_dir(tmp_path) == (tmp_path / "all-dogs", ann)
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=1)
    assert d.classes == ["alpha", "beta"] and d.stats["boxes_used"] == 4  # not 4 whole images of one class
    assert set(d.stats["skipped"]) <= {"link_outside", "unreadable_folder"}


def test_a_link_out_of_the_data_dir_is_not_followed(tmp_path, capsys):
    good_dataset(tmp_path / "sibling")  # another data set next to ours, with annotations
    mine = tmp_path / "mine"
    (mine / "all-dogs").mkdir(parents=True)
    (mine / "all-dogs" / "a.jpg").write_bytes(image_bytes())
    (mine / "loop").symlink_to("..", target_is_directory=True)  # mine/loop/sibling/Annotation is 3 levels deep
    assert find_data_dir(mine) == (mine / "all-dogs", None)
    out = capsys.readouterr().out
    assert "WARNING" in out and "1 linked folder(s) lead out of it" in out and str(mine) in out


def test_links_inside_the_data_dir_are_searched_once_and_links_out_are_not(tmp_path, capsys):
    good_dataset(tmp_path / "real")
    (tmp_path / "real" / "again").symlink_to(".", target_is_directory=True)  # a cycle inside: searched once
    assert find_data_dir(tmp_path / "real") == (tmp_path / "real" / "all-dogs", tmp_path / "real" / "Annotation")
    assert "WARNING" not in capsys.readouterr().out
    (tmp_path / "data").mkdir()  # a data dir made of links to folders elsewhere: not followed, and the log says why
    for name in ("all-dogs", "Annotation"):
        (tmp_path / "data" / name).symlink_to(tmp_path / "real" / name, target_is_directory=True)
    with pytest.raises(UsageError, match="no dog images"):
        find_data_dir(tmp_path / "data")
    assert "2 linked folder(s) lead out of it and were not searched" in capsys.readouterr().out


def test_a_folder_that_cannot_be_listed_during_the_search_is_named(tmp_path, monkeypatch, capsys):
    good_dataset(tmp_path / "inner")
    deny(monkeypatch, tmp_path / "inner")
    with pytest.raises(UsageError, match="no dog images"):
        find_data_dir(tmp_path)
    out = capsys.readouterr().out
    assert "1 folder(s) could not be listed" in out and str(tmp_path / "inner") in out


def test_falling_back_to_whole_images_says_where_it_looked(tmp_path, capsys):
    good_dataset(tmp_path)
    for breed in (tmp_path / "Annotation").iterdir():  # breed folders without a single file
        for f in breed.iterdir():
            f.unlink()
    images, annotations = find_data_dir(tmp_path)
    assert annotations is None
    lines = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
    assert len(lines) == 1 and str(tmp_path) in lines[0] and str(tmp_path / "Annotation") in lines[0]
    assert "whole images" in lines[0]
    d = load_dogs(images, annotations, size=SIZE)
    assert d.classes == ["dog"] and len(d.images) == 6


def test_namespaced_xml_is_read_and_each_skip_has_its_own_reason(tmp_path, monkeypatch):
    g = image_bytes()
    add(tmp_path, "n01-alpha", "plain", g, voc([GOOD_BOX]))
    add(tmp_path, "n01-alpha", "namespaced", g,
        voc([GOOD_BOX]).replace("<annotation>", '<annotation xmlns="http://example.org/voc">'))
    add(tmp_path, "n01-alpha", "prefixed", g, voc([GOOD_BOX]).replace("<annotation>", '<v:annotation xmlns:v="urn:v">')
        .replace("</annotation>", "</v:annotation>").replace("<object>", "<v:object>").replace("</object>", "</v:object>"))
    add(tmp_path, "n01-alpha", "malformed", g, "<annotation><object>")
    add(tmp_path, "n01-alpha", "locked", g, voc([GOOD_BOX]))
    locked = tmp_path / "Annotation" / "n01-alpha" / "locked"
    real_open = open
    monkeypatch.setattr(annotations, "open", raising=False,  # the module's open: what read_voc reads the file with
                        value=lambda path, *a: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if Path(path) == locked else real_open(path, *a))
    skipped = Counter()
    assert read_voc(locked, skipped, Counter()) == ([], None) and skipped == {"unreadable_xml": 1}
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=1)
    assert d.stats["skipped"] == {"bad_xml": 1, "unreadable_xml": 1}
    assert d.stats["boxes_used"] == 3 and d.stats["fixed"] == {"xml_namespace": 2}


# labels, filters, extra rows, reference

def test_labels_come_from_annotation_folders(tmp_path):
    good_dataset(tmp_path, n=2, breeds=("n02-zebra_dog", "n01-Akita", "n03-curly-coated_retriever"))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE)
    assert d.classes == ["Akita", "curly-coated_retriever", "zebra_dog"]  # sorted breed names
    assert d.labels.dtype == np.int64 and d.labels.tolist() == [0, 0, 2, 2, 1, 1]  # rows follow sorted image ids


def test_aspect_filter_drops_and_counts(tmp_path):
    add(tmp_path, "n01-alpha", "a", image_bytes(), voc([(0, 0, 150, 50), (10, 10, 60, 60), (10, 0, 40, 120)]))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, min_aspect=0.5, max_aspect=2.0)
    assert d.stats["skipped"] == {"aspect": 2} and d.stats["boxes_used"] == 1 and len(d.images) == 1


def test_styles_multiply_rows_and_include_whole_adds_one_per_image(tmp_path):
    good_dataset(tmp_path, n=2)
    add(tmp_path, "n01-alpha", "two_dogs", image_bytes(), voc([GOOD_BOX, (100, 20, 190, 100)]))
    root = find_data_dir(tmp_path)
    assert len(load_dogs(*root, size=SIZE).images) == 6
    d = load_dogs(*root, size=SIZE, crop_styles=("box", "top"), include_whole=True)
    assert len(d.images) == 6 * 2 + 5 and d.stats["rows"] == 17 and d.labels.shape == (17,)


def test_reference_is_every_whole_image_squashed(tmp_path):
    add(tmp_path, "n01-alpha", "a", image_bytes(size=(400, 100)), voc([(0, 0, 100, 100)], size=(400, 100)))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE)
    assert d.reference.shape == (1, SIZE, SIZE, 3) and d.reference.dtype == np.uint8
    full = np.asarray(Image.open(tmp_path / "all-dogs" / "a.jpg").convert("RGB").resize((SIZE, SIZE), Image.BILINEAR))
    assert np.abs(d.reference[0].astype(int) - full).mean() < 8  # draft decoding changes it only a little


def test_workers_give_identical_results_and_limit_cuts(tmp_path):
    root = find_data_dir(good_dataset(tmp_path, n=5))
    one, two = (load_dogs(*root, size=SIZE, workers=w) for w in (1, 2))
    assert np.array_equal(one.images, two.images) and np.array_equal(one.labels, two.labels)
    assert len(load_dogs(*root, size=SIZE, limit=4).images) == 4


# the real sample

@pytest.mark.skipif(not REAL_SAMPLE.is_dir(), reason="real sample not on this machine")
def test_real_sample_counts_are_plausible():
    images_dir, annotation_dir = find_data_dir(REAL_SAMPLE)
    d = load_dogs(images_dir, annotation_dir, size=64, workers=2)
    assert len(d.classes) == 120 and len(set(d.labels.tolist())) == 120
    assert 1900 <= d.stats["images_read"] <= 1953 and 2000 <= d.stats["boxes_used"] <= 2100
    assert d.images.shape == (d.stats["rows"], 64, 64, 3) and d.reference.shape == (d.stats["images_read"], 64, 64, 3)
    assert sum(d.stats["skipped"].values()) < 20


# hostile annotations (issue 19)

def test_repeated_boxes_are_dropped_and_few_images_warned(tmp_path, capsys):
    """One file with 300 identical boxes must not make 300 crops of one image; 6 images warn of memorization."""
    good_dataset(tmp_path)
    add(tmp_path, "n01-alpha", "many", image_bytes(seed=9), voc([GOOD_BOX] * 300 + [(10 + i, 10, 150, 140) for i in range(20)]))
    d = load_dogs(tmp_path / "all-dogs", tmp_path / "Annotation")
    assert len(d.images) == 6 + 12  # one box per good image, the capped 12 of the crowded one
    assert d.stats["skipped"]["box_repeated_or_over_cap"] == 299 + 9
    assert "WARNING: only 7 images" in capsys.readouterr().out


def test_an_annotation_file_linked_out_of_the_folder_is_not_read(tmp_path):
    good_dataset(tmp_path / "data")
    secret = tmp_path / "secret.xml"
    secret.write_text(voc([GOOD_BOX, (0, 0, 50, 50)]))
    add(tmp_path / "data", "n01-alpha", "linked", image_bytes(seed=7))
    (tmp_path / "data" / "Annotation" / "n01-alpha" / "linked").symlink_to(secret)
    d = load_dogs(tmp_path / "data" / "all-dogs", tmp_path / "data" / "Annotation")
    assert d.stats["skipped"]["link_outside"] == 1 and d.stats["skipped"]["no_annotation"] == 1
