"""A small synthetic data set in the Kaggle layout (Pascal-VOC files like the real ones), for --demo and tests. Each box
holds a blob "dog" in its breed's own colours and proportions, so a conditional GAN has something to learn.
"""
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# demo data set

DEMO_BREEDS = ("Chihuahua", "beagle", "golden_retriever", "pug", "Dalmatian", "Siberian_husky", "whippet", "Samoyed")
DEMO_SIZE_RANGE = (120, 300)  # image width and height, pixels
DEMO_TWO_BOX_P = 0.25  # chance an image holds a second dog


def _draw_demo_dog(draw, box, coat, spot, aspect, facing_left):
    """A blob dog filling box = (x0, y0, x1, y1): body ellipse, head, ears, legs, tail, an eye."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    leg_top = y0 + h * 0.65
    body = (x0 + w * 0.12, y0 + h * (0.7 - aspect), x1 - w * 0.12, leg_top + h * 0.1)  # aspect: body h / box h
    for fx in (0.22, 0.35, 0.65, 0.78):  # legs
        draw.rectangle((x0 + w * fx - w * 0.04, leg_top, x0 + w * fx + w * 0.04, y1), fill=coat)
    draw.ellipse(body, fill=coat)
    hx = x0 + w * (0.2 if facing_left else 0.8)  # head centre
    hy, r = y0 + h * 0.25, min(w, h) * 0.22
    draw.ellipse((hx - r, hy - r, hx + r, hy + r), fill=coat)
    for dx in (-0.7, 0.7):  # ears
        draw.polygon([(hx + dx * r - r * 0.3, hy - r * 0.5), (hx + dx * r + r * 0.3, hy - r * 0.5),
                      (hx + dx * r, hy - r * 1.4)], fill=spot)
    tx = x1 - w * 0.12 if facing_left else x0 + w * 0.12  # tail
    draw.line((tx, body[1] + h * 0.1, tx + (w if facing_left else -w) * 0.1, body[1] - h * 0.15), fill=spot,
              width=max(2, int(w * 0.04)))
    sx, sy = (body[0] + body[2]) / 2, (body[1] + body[3]) / 2  # a patch on the body
    draw.ellipse((sx - w * 0.1, sy - h * 0.06, sx + w * 0.1, sy + h * 0.06), fill=spot)
    e = max(1.5, r * 0.15)
    draw.ellipse((hx - e, hy - e, hx + e, hy + e), fill=(20, 20, 20))


def make_demo_dataset(root, *, n_classes=6, per_class=20, seed=0):
    """Writes n_classes * per_class images with their annotations under root; returns root. Same seed, same bytes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    img_dir = root / "all-dogs"
    img_dir.mkdir(parents=True, exist_ok=True)
    for k in range(n_classes):
        breed = DEMO_BREEDS[k] if k < len(DEMO_BREEDS) else f"breed_{k}"
        wnid = f"n{2085620 + 1000 * k:08d}"
        ann_dir = root / "Annotation" / f"{wnid}-{breed}"
        ann_dir.mkdir(parents=True, exist_ok=True)
        coat = tuple(int(c) for c in rng.integers(40, 256, 3))  # the breed's colours and build
        spot = tuple(int(c) for c in rng.integers(0, 200, 3))
        aspect = float(rng.uniform(0.3, 0.5))
        for i in range(per_class):
            image_id = f"{wnid}_{i + 1}"
            w, h = (int(v) for v in rng.integers(DEMO_SIZE_RANGE[0], DEMO_SIZE_RANGE[1] + 1, 2))
            top, bottom = rng.integers(90, 230, 3), rng.integers(60, 200, 3)  # background: a vertical gradient
            t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
            bg = (top * (1 - t) + bottom * t) + rng.normal(0, 3, (h, 1, 3))
            img = Image.fromarray(np.broadcast_to(np.clip(bg, 0, 255), (h, w, 3)).astype(np.uint8))
            draw = ImageDraw.Draw(img)
            objects = []
            for _ in range(1 + int(rng.random() < DEMO_TWO_BOX_P)):
                bw, bh = int(w * rng.uniform(0.35, 0.8)), int(h * rng.uniform(0.35, 0.8))
                x0, y0 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
                jitter = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in coat)
                _draw_demo_dog(draw, (x0, y0, x0 + bw, y0 + bh), jitter, spot, aspect, bool(rng.random() < 0.5))
                objects.append(f"<object><name>{breed}</name><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin>"
                               f"<xmax>{x0 + bw}</xmax><ymax>{y0 + bh}</ymax></bndbox></object>\n")
            img.save(img_dir / f"{image_id}.jpg", quality=90)
            (ann_dir / image_id).write_text(f"<annotation><size><width>{w}</width><height>{h}</height></size>\n"
                                            f"{''.join(objects)}</annotation>\n")
    return root
