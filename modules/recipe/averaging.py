"""The EMA of G: an exponential moving average of a model's weights whose half-life is set in images, so it stays
the same when the batch (or the number of ranks) changes, as StyleGAN2-ADA defines its G_ema."""
import copy

import torch


class EMA:
    """EMA of a model's parameters and float buffers (integer buffers copied); not swa_utils.AveragedModel, whose
    update syncs with the host every step. batch: images per update over all ranks."""

    def __init__(self, model, *, half_life_images, batch):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = 0.5 ** (batch / half_life_images)

    @torch.no_grad()
    def update(self, model, copy_only=False):
        src = list(model.parameters()) + list(model.buffers())
        dst = list(self.model.parameters()) + list(self.model.buffers())
        fs = [s for s in src if s.is_floating_point()]
        fd = [d for d in dst if d.is_floating_point()]
        if copy_only:
            torch._foreach_copy_(fd, fs)
        else:
            torch._foreach_lerp_(fd, fs, 1 - self.decay)
        for s, d in zip(src, dst):
            if not s.is_floating_point():
                d.copy_(s)
