"""modules/data/demo.py: the synthetic data set has the Kaggle layout, loads cleanly, and is the same for a seed."""
import hashlib
import time

import numpy as np

from modules.data.demo import make_demo_dataset
from modules.data.dogs import find_data_dir, load_dogs


def digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_demo_dataset_loads_into_the_expected_counts_and_classes(tmp_path):
    t0 = time.monotonic()
    root = make_demo_dataset(tmp_path / "demo", n_classes=4, per_class=5, seed=1)
    assert time.monotonic() - t0 < 2.0
    images_dir, annotation_dir = find_data_dir(root)
    assert (images_dir, annotation_dir) == (root / "all-dogs", root / "Annotation")
    n_boxes = sum(p.read_text().count("<object>") for p in annotation_dir.rglob("*") if p.is_file())
    assert 20 <= n_boxes <= 40  # 1-2 dogs per image

    d = load_dogs(images_dir, annotation_dir, size=32, workers=2)
    assert d.stats["images_read"] == 20 and d.stats["boxes_used"] == n_boxes and not d.stats["skipped"]
    assert d.images.shape == (n_boxes, 32, 32, 3) and d.reference.shape == (20, 32, 32, 3)
    assert len(d.classes) == 4 and sorted(set(d.labels.tolist())) == [0, 1, 2, 3]
    assert np.bincount(d.labels).min() >= 5  # every breed has its 5 images, some with a second dog


def test_demo_dataset_is_deterministic_and_seeded(tmp_path):
    a = digest(make_demo_dataset(tmp_path / "a", seed=3))
    assert a == digest(make_demo_dataset(tmp_path / "b", seed=3))
    assert a != digest(make_demo_dataset(tmp_path / "c", seed=4))


def test_default_demo_is_six_breeds_of_twenty(tmp_path):
    d = load_dogs(*find_data_dir(make_demo_dataset(tmp_path)), size=64, workers=2)
    assert len(d.classes) == 6 and d.stats["images_read"] == 120 and len(d.images) >= 120
