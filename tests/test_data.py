"""modules/data.py: crop windows, every bad-input class (skipped and counted, never raised), layouts, modes, filters."""
import io
import random
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules.data import CROP_STYLES, find_data_dir, load_dogs
from modules.utils import UsageError

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
        if style != "tight":
            assert abs((r - l) - (b - t)) < 1e-6  # square


def test_box_style_side_and_largest_square_when_image_too_small():
    assert CROP_STYLES["box"]((100, 100, 200, 150), 400, 400, 0.1) == pytest.approx((95, 70, 205, 180))
    # needs a 220-px square but the image is 300 x 160: the largest square (160) that fits, centred as far as it can
    assert CROP_STYLES["box"]((10, 10, 210, 150), 300, 160, 0.1) == pytest.approx((30, 0, 190, 160))
    # box at the image edge: shifted inside instead of padded
    assert CROP_STYLES["box"]((0, 0, 50, 50), 400, 400, 0.2) == pytest.approx((0, 0, 60, 60))


def test_top_style_keeps_the_top_of_tall_boxes_and_whole_is_centre_square():
    l, t, r, b = CROP_STYLES["top"]((100, 50, 200, 350), 400, 400, 0.0)  # tall 100 x 300 box
    assert (l, t) == pytest.approx((75, 50)) and r - l == pytest.approx(150)  # reaches the centre (y=200)
    wide = (100, 50, 300, 150)
    assert CROP_STYLES["top"](wide, 400, 400, 0.1) == CROP_STYLES["box"](wide, 400, 400, 0.1)
    assert CROP_STYLES["whole"]((0, 0, 300, 200), 300, 200, 0.1) == pytest.approx((50, 0, 250, 200))
    assert CROP_STYLES["tight"]((10, 20, 30, 90), 300, 200, 0.1) == (10, 20, 30, 90)
    padded, box = (CROP_STYLES[s]((100, 100, 200, 200), 400, 400, 0.1) for s in ("padded", "box"))
    assert padded[2] - padded[0] > box[2] - box[0]


@pytest.mark.parametrize("style", sorted(CROP_STYLES))
def test_each_style_loads_size_by_size_crops(tmp_path, style):
    d = load_dogs(*find_data_dir(good_dataset(tmp_path)), size=SIZE, crop_styles=(style,), workers=1)
    assert d.images.shape == (6, SIZE, SIZE, 3) and d.images.dtype == np.uint8
    assert d.images.std() > 10  # real pixels, not a blank fill


def test_unknown_crop_style_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="crop style"):
        load_dogs(*find_data_dir(good_dataset(tmp_path)), crop_styles=("zoom",))


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


def test_decompression_bomb_is_skipped_and_counted(tmp_path, monkeypatch):
    good_dataset(tmp_path, n=1)
    add(tmp_path, "n01-alpha", "huge", image_bytes(size=(300, 300)), voc([GOOD_BOX], size=(300, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200 * 150)  # the 300 x 300 image now counts as a bomb
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, workers=2)
    assert d.stats["skipped"] == {"too_large": 1} and len(d.images) == 2


def test_boxes_are_rescaled_when_the_xml_size_differs_from_the_image(tmp_path):
    add(tmp_path, "n01-alpha", "half", image_bytes(size=(200, 150)), voc([(20, 15, 80, 60)], size=(100, 75)))
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, crop_styles=("tight",), workers=1)
    assert d.stats["fixed"] == {"box_rescaled": 1} and not d.stats["skipped"]


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
    d = load_dogs(*find_data_dir(tmp_path), size=SIZE, include_whole=True, crop_styles=("tight",))
    assert d.classes == ["dog"] and d.images.shape == (3, SIZE, SIZE, 3) and d.labels.tolist() == [0, 0, 0]
    assert d.reference.shape == (3, SIZE, SIZE, 3)


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
    assert load_dogs(*find_data_dir(tmp_path), size=SIZE, keep_reference=False).reference is None


def test_workers_and_pools_give_identical_results_and_limit_cuts(tmp_path):
    root = find_data_dir(good_dataset(tmp_path, n=5))
    one = load_dogs(*root, size=SIZE, workers=1)
    for pool in ("thread", "fork"):
        two = load_dogs(*root, size=SIZE, workers=2, pool=pool)
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
