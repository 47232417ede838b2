"""Sampling: truncated latents, breeds drawn with the training set's frequencies, G's BatchNorm statistics, uint8 images.

Config.sample_bn: "batch" (each batch normalised with its own statistics, as the 2nd place sampled), "running" (eval
mode) or "standing" (BigGAN-PyTorch: re-estimated on a copy of G from samples drawn as the run draws them). The run's
`Sampler` holds how it generates, so the finish, its timing and its pictures all sample alike.
"""
import contextlib
import copy
import dataclasses
import itertools
import weakref
from typing import Callable

import numpy as np
import torch
from torch import nn

from modules.recipe.utils import eval_mode

SAMPLE_BN_MODES = ("batch", "running", "standing")  # Config.sample_bn
STANDING_BATCHES = 16  # BigGAN-PyTorch's num_standing_accumulations
STANDING_BATCH = 64  # images per standing batch (at most the generation batch)
STANDING_SEED = 1_000_003  # the standing latents' own seed: the statistics do not depend on which images come first
_STANDING_CACHE = weakref.WeakKeyDictionary()  # G -> (G's weight versions + sampling settings, its standing copy)


def truncated_z(n, dim, threshold, *, generator=None):
    """[n, dim] N(0,1); with threshold > 0, entries with |z| > threshold are resampled (BigGAN's truncation trick)."""
    z = torch.randn(n, dim, generator=generator)
    # threshold is 0 or at least 0.05 (Config's LIMITS): a smaller one would resample for ever
    while threshold > 0 and bool((bad := z.abs() > threshold).any()):
        z[bad] = torch.randn(int(bad.sum()), generator=generator)
    return z


def sample_labels(n, label_counts, *, generator=None):
    """[n] long breed indices drawn with the training set's class frequencies (label_counts: [n_classes])."""
    probs = torch.as_tensor(label_counts, dtype=torch.float32)
    return torch.multinomial(probs, n, replacement=True, generator=generator)


def to_uint8(images):
    """[N,3,H,W] float in [-1,1] -> numpy uint8 [N,H,W,3]."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _batch_norms(G):
    return [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def sample_bn_of(G, sample_bn=None):
    """`sample_bn` if given, else G's own (`G.sample_bn`, set by build_models), else "running"."""
    return sample_bn or getattr(G, "sample_bn", "running")


@contextlib.contextmanager
def sampling_mode(G, sample_bn=None):
    """G in eval mode (no spectral-norm power iteration), except that in "batch" mode its BatchNorm layers normalise
    with the batch's own statistics and leave their running ones untouched."""
    batch = sample_bn_of(G, sample_bn) == "batch"
    bns = _batch_norms(G) if batch else []
    tracked = [m.track_running_stats for m in bns]
    with eval_mode(G):
        try:
            for m in bns:
                m.train()
                m.track_running_stats = False  # training-mode BN without running buffers: batch statistics, no update
            yield G
        finally:
            for m, t in zip(bns, tracked):
                m.track_running_stats = t


def _draw(G, n, gen, *, z_dim, label_counts, truncation, device, amp_dtype):
    """G on n truncated latents and breeds drawn from `gen` -> [n,3,64,64]."""
    z = truncated_z(n, z_dim, truncation, generator=gen).to(device)
    y = sample_labels(n, label_counts, generator=gen).to(device)
    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        return G(z, y)


@torch.no_grad()
def prepare_for_sampling(G, *, z_dim, label_counts, truncation, batch_size, device, amp_dtype=None, sample_bn=None):
    """-> G, or in "standing" mode a copy whose BN statistics are averaged over STANDING_BATCHES batches drawn as G
    will sample (BigGAN-PyTorch's accumulate_standing_stats; spectral norm's u, v stay). The copy is made once per state
    of G's weights (torch's in-place version counters) and sampling settings: sampling in several calls pays once."""
    if sample_bn_of(G, sample_bn) != "standing" or getattr(G, "standing_ready", False):
        return G
    m_batch = max(2, min(batch_size, STANDING_BATCH))
    key = (tuple(t._version for t in itertools.chain(G.parameters(), G.buffers())), z_dim,
           tuple(np.asarray(label_counts).tolist()), truncation, m_batch, str(device), amp_dtype)
    cached = _STANDING_CACHE.get(G)
    if cached is not None and cached[0] == key:
        return cached[1]
    G2 = copy.deepcopy(G)
    bns = _batch_norms(G2)
    gen = torch.Generator().manual_seed(STANDING_SEED)
    with eval_mode(G2):
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # None = cumulative moving average over the batches seen since the reset
            m.train()
        for _ in range(STANDING_BATCHES if bns else 0):
            _draw(G2, m_batch, gen, z_dim=z_dim, label_counts=label_counts, truncation=truncation, device=device,
                  amp_dtype=amp_dtype)
    for m, src in zip(bns, _batch_norms(G)):
        m.momentum = src.momentum
    G2.standing_ready, G2.sample_bn = True, "standing"
    _STANDING_CACHE[G] = key, G2
    return G2


@torch.no_grad()
def generate_images(G, *, n, z_dim, label_counts, truncation, batch_size, device, seed=0, amp_dtype=None,
                    sample_bn=None, on_batch=None):
    """n images, the same for the same seed -> uint8 [n,64,64,3]. on_batch(uint8 [m,64,64,3]) sees each batch as soon
    as it is made (the finish encodes PNGs meanwhile)."""
    mode = sample_bn_of(G, sample_bn)
    draw = dict(z_dim=z_dim, label_counts=label_counts, truncation=truncation, device=device, amp_dtype=amp_dtype)
    G = prepare_for_sampling(G, batch_size=batch_size, sample_bn=mode, **draw)
    gen = torch.Generator().manual_seed(seed)
    out = []
    with sampling_mode(G, mode):
        for start in range(0, n, batch_size):
            out.append(to_uint8(_draw(G, min(batch_size, n - start), gen, **draw)))
            if on_batch is not None:
                on_batch(out[-1])
    images = np.concatenate(out)
    assert images.shape == (n, images.shape[1], images.shape[2], 3) and images.dtype == np.uint8
    return images


# the run's sampler


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: label_counts is an array (no field-wise == or hash)
class Sampler:
    """`sampler(n, seed)` -> uint8 [n,64,64,3], as generate_images with these settings. model() is read at each call:
    the generator to ship now (the EMA, or SWA once it averages), unless ready() fixed it."""

    model: Callable  # () -> the generator to sample
    z_dim: int
    truncation: float  # resample |z| above this (0: none)
    label_counts: np.ndarray  # [n_classes] training images per breed: labels are drawn with these frequencies
    amp_dtype: object  # autocast dtype (torch.float16 / bfloat16) or None: fp32
    device: torch.device
    batch: int  # images per generated batch
    sample_bn: object = None  # None: the generator's own (G.sample_bn); a bench may override

    def _settings(self):
        return dict(z_dim=self.z_dim, label_counts=self.label_counts, truncation=self.truncation, batch_size=self.batch,
                    device=self.device, amp_dtype=self.amp_dtype, sample_bn=self.sample_bn)

    def __call__(self, n, seed=0, *, on_batch=None):
        return generate_images(self.model(), n=n, seed=seed, on_batch=on_batch, **self._settings())

    def with_batch(self, batch):
        return dataclasses.replace(self, batch=batch)

    def with_model(self, G):
        return dataclasses.replace(self, model=lambda: G)

    def ready(self):
        """-> this sampler fixed to the generator (or its standing copy) it samples now: a retry and the pictures
        use the very same model."""
        return self.with_model(prepare_for_sampling(self.model(), **self._settings()))


def build_sampler(cfg, trainer, data):
    """The run's Sampler: the trainer's shipped generator, precision and device; breeds at the training frequencies."""
    return Sampler(model=trainer.generator_to_ship, z_dim=cfg.z_dim, truncation=cfg.truncation,
                   label_counts=np.bincount(data.labels, minlength=len(data.classes)), amp_dtype=trainer.amp_dtype,
                   device=trainer.device, batch=cfg.sample_batch)
