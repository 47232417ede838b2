"""Does the recipe learn the breeds? The default (kaggle) recipe trained at a small width on a synthetic set whose classes
differ in colour; samples drawn for breed k through the shipped generator (EMA) and the finish's sampling settings are
classified by a nearest-mean-colour classifier fit on the real crops. With labels shuffled before training (the
negative control) the accuracy should fall to chance (1/4). A prototype of the safety net issue 27 asks for: at the
settings below it takes ~210 s for 300 steps on 2 loaded cores, too slow for the suite yet.

    python tests/bench/bench_learning.py --seeds 0 1 2 --steps 300
    python tests/bench/bench_learning.py --seeds 0 --steps 300 --shuffle-labels

Measured (one thread, load average 3-4, early training at CPU scale): seed 0, 150 steps 0.67, 300 steps 1.00.
"""
import argparse
import dataclasses
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402,F401  (puts the repository root on sys.path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from modules.config import PRESETS, Config, apply_overrides  # noqa: E402
from modules.sample import build_sampler, prepare_for_sampling, sampling_mode, to_uint8, truncated_z  # noqa: E402
from modules.train import build_trainer  # noqa: E402

CPU = torch.device("cpu")
# one saturated colour per class (RGB), far apart so that a nearest-mean-colour classifier separates the real crops
COLOURS = np.array([[220, 40, 40], [40, 200, 40], [40, 60, 220], [230, 210, 30]], dtype=np.float32)


def coloured_set(n_per_class=48, seed=0):
    """A stand-in for DogData with len(COLOURS) breeds: a dark noisy background and a rectangle of the class's colour
    (shade, size and position varied per image), so that no class is a single image."""
    rng = np.random.default_rng(seed)
    n_classes = len(COLOURS)
    labels = np.repeat(np.arange(n_classes), n_per_class)
    images = rng.normal(40, 12, (len(labels), 64, 64, 3))
    for i, k in enumerate(labels):
        h, w = rng.integers(28, 52, 2)
        top, left = rng.integers(0, 64 - h + 1), rng.integers(0, 64 - w + 1)
        shade = COLOURS[k] * rng.uniform(0.8, 1.05) + rng.normal(0, 10, (h, w, 3))
        images[i, top:top + h, left:left + w] = shade
    images = np.clip(images, 0, 255).astype(np.uint8)
    return types.SimpleNamespace(images=images, labels=labels, classes=[f"c{k}" for k in range(n_classes)],
                                 reference=images)


def learning_cfg(seed):
    """The kaggle preset (conditional BigGAN G with a shared embedding, projection D with the aux head, RaLS, EMA,
    truncation, batch-statistics sampling) at a small width and batch. The EMA is shortened so that the shipped
    generator is the trained one at this length: it starts averaging after 100 steps (not 1000) with a half-life of
    about 860 images (decay 0.95 at batch 64; the recipe's 0.999 is ~44,000 images, longer than this whole run)."""
    cfg = apply_overrides(Config(), PRESETS["kaggle"], "kaggle")
    return dataclasses.replace(cfg, seed=seed, z_dim=20, g_ch=4, d_ch=4, shared_dim=8, batch_size=16, ema_start=100,
                               ema_decay=0.95, sample_batch=64)


def mean_colour(images):
    """uint8 [N,H,W,3] -> [N,3] mean RGB."""
    return images.reshape(len(images), -1, 3).mean(axis=1)


def fit_colour_classifier(data):
    """Nearest class-mean colour, fit on the real crops -> (classify(images) -> [N] labels, accuracy on the crops)."""
    feats = mean_colour(data.images)
    means = np.stack([feats[data.labels == k].mean(axis=0) for k in range(len(data.classes))])

    def classify(images):
        return np.argmin(((mean_colour(images)[:, None, :] - means[None]) ** 2).sum(-1), axis=1)

    return classify, float((classify(data.images) == data.labels).mean())


@torch.no_grad()
def sample_for_labels(sampler, labels, seed=0):
    """The run's sampler's generator and settings, on given labels: as generate_images draws (the shipped generator
    made ready as the finish makes it, truncated z, its sample_bn mode, uint8), but each sample's breed chosen here.
    The batch mixes the breeds as the finish's batches do, which matters with batch-statistics sampling."""
    G = prepare_for_sampling(sampler.model(), z_dim=sampler.z_dim, label_counts=sampler.label_counts,
                             truncation=sampler.truncation, batch_size=sampler.batch, device=sampler.device,
                             amp_dtype=sampler.amp_dtype, sample_bn=sampler.sample_bn)
    gen = torch.Generator().manual_seed(seed)
    y = torch.as_tensor(labels, dtype=torch.long, device=sampler.device)
    with sampling_mode(G, sampler.sample_bn):
        z = truncated_z(len(y), sampler.z_dim, sampler.truncation, generator=gen).to(sampler.device)
        return to_uint8(G(z, y))


def train_and_score(seed, *, steps, shuffle_labels=False):
    """Train the recipe for `steps` G steps on the coloured set (its labels permuted first if shuffle_labels) -> the
    accuracy of the colour classifier (fit on the true labels) on samples drawn for each breed."""
    torch.manual_seed(seed)
    data = coloured_set(seed=seed)
    train_data = data
    if shuffle_labels:
        train_data = types.SimpleNamespace(**vars(data))
        train_data.labels = np.random.default_rng(seed + 1).permutation(data.labels)
    cfg = learning_cfg(seed)
    trainer = build_trainer(cfg, train_data, CPU)
    trainer.set_progress(0.0)
    for _ in range(steps):
        trainer.step()
    sampler = build_sampler(cfg, trainer, train_data)
    assert sampler.model() is trainer.ema.model  # the shipped generator is the EMA
    classify, real_acc = fit_colour_classifier(data)
    assert real_acc >= 0.95  # the classes are separable by colour
    n_classes = len(data.classes)
    labels = np.random.default_rng(seed).permutation(np.arange(200) % n_classes)
    fakes = sample_for_labels(sampler, labels, seed=seed)
    assert fakes.shape == (len(labels), 64, 64, 3) and fakes.dtype == np.uint8
    return float((classify(fakes) == labels).mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--shuffle-labels", action="store_true", help="negative control: train on permuted labels")
    args = p.parse_args(argv)
    print("| seed | steps | labels | accuracy (chance 0.25) | seconds |\n|---|---|---|---|---|")
    for seed in args.seeds:
        t0 = time.monotonic()
        acc = train_and_score(seed, steps=args.steps, shuffle_labels=args.shuffle_labels)
        print(f"| {seed} | {args.steps} | {'shuffled' if args.shuffle_labels else 'true'} | {acc:.3f} | "
              f"{time.monotonic() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
