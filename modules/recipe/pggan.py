"""PGGAN (Karras et al. 2018, "Progressive Growing of GANs"), grown from 4x4 to 64x64.

Levels 0..max_level are the resolutions 4·2^level (4, 8, 16, 32, 64). At their boundary both networks always work at the
full resolution R = 4·2^max_level, so the training loop stays generic:
- PGGenerator(z, y) -> [N,3,R,R]: the current level's image, nearest-upsampled to R.
- PGDiscriminator(x, y) -> (logits [N], None): it average-pools x [N,3,R,R] down to the current level itself.

Growth is plain module state set by `set_growth(level, alpha)`: Trainer.set_progress(progress) (train.py) sets
`pggan_growth(progress, fade_fraction=pg_fade)` on G, D and the shipped averages before each step, progress being the
fraction of the training window trained so far, so the levels follow time, not steps. Growth is a python attribute
(reading it needs no GPU sync), so it is NOT in state_dict: a freshly built module is at (max_level, 1.0), and loading
weights leaves the level as it was until set_progress runs. torch.compile would recompile whenever alpha changes, so
run these modules eagerly.

From the paper: equalized learning rate (EqConv2d, EqLinear), pixelwise feature normalisation in G (PixelNorm),
minibatch stddev before D's last block, fade-in of each new level. The paper's WGAN-GP + drift loss and
Adam(lr=1e-3, betas=(0, 0.99)) belong in losses.py and train.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.recipe.layers import MinibatchStd

_PG_CH_MULT = (8, 8, 4, 2, 1)  # channels per level as multiples of `ch`: ch=64 gives 512, 512, 256, 128, 64
_PG_SLOPE = 0.2  # LeakyReLU negative slope, paper value


# equalized learning rate

class EqConv2d(nn.Module):
    """Conv with N(0,1) raw weights scaled at run time by gain/sqrt(fan_in), the He constant for gain sqrt(2): applied
    on every forward pass, not at init, so Adam updates all layers at the same relative speed (Karras et al. 4.1)."""

    def __init__(self, in_ch, out_ch, kernel_size, *, padding=None, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = gain / math.sqrt(in_ch * kernel_size * kernel_size)
        self.padding = kernel_size // 2 if padding is None else padding  # default 'same' for odd kernels

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqLinear(nn.Module):
    """Linear with N(0,1) raw weights scaled at run time by gain/sqrt(fan_in); see EqConv2d."""

    def __init__(self, in_features, out_features, *, gain=math.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = gain / math.sqrt(in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class PixelNorm(nn.Module):
    """x / sqrt(mean over channels of x² + 1e-8), per pixel (dim 1 of [N,C,H,W] or [N,C]), the statistic in float32:
    under fp16 autocast 1e-8 rounds to 0 and x² can overflow."""

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(dim=1, keepdim=True) + 1e-8).to(x.dtype)


def _pg_check_growth(level, alpha, max_level):
    assert 0 <= level <= max_level, f"level {level} outside 0..{max_level}"
    assert 0.0 <= alpha <= 1.0, f"alpha {alpha} outside [0, 1]"
    return int(level), 1.0 if level == 0 else float(alpha)  # nothing to fade from at level 0


# growth schedule

def pggan_growth(progress, n_levels=5, fade_fraction=0.5, final_weight=2.0):
    """Fraction of the training-time budget spent (0..1) -> (level, alpha). Time is split into units: one per level,
    plus `final_weight - 1` extra for the last level, where the output is sampled, so it gets more time to stabilise
    while the small levels learn fast (defaults: 1/6 of the budget per level, 2/6 for 64x64). In every level > 0,
    alpha fades linearly 0 -> 1 during the first `fade_fraction` of one unit, then stays at 1; level 0 has alpha 1."""
    assert n_levels >= 1 and 0.0 <= fade_fraction <= 1.0 and final_weight >= max(fade_fraction, 1e-9)
    if progress >= 1.0:
        return n_levels - 1, 1.0
    t = max(float(progress), 0.0) * (n_levels - 1 + final_weight)  # in units
    level = min(int(t), n_levels - 1)
    if level == 0 or fade_fraction == 0.0:
        return level, 1.0
    return level, min(1.0, (t - level) / fade_fraction)


# generator

class PGGenerator(nn.Module):
    """z [N,z_dim] (+ y [N] int64 if n_classes > 1) -> [N,3,R,R], R = 4·2^max_level: linear (no tanh, as in the
    paper), roughly in [-1, 1] once trained; clamped only at sampling time."""

    def __init__(self, *, z_dim=128, n_classes=1, ch=64, max_level=4):
        super().__init__()
        assert 0 <= max_level < len(_PG_CH_MULT), f"max_level must be in 0..{len(_PG_CH_MULT) - 1}"
        self.z_dim, self.n_classes, self.max_level = z_dim, n_classes, max_level
        chs = [ch * m for m in _PG_CH_MULT[: max_level + 1]]
        # conditional: a learned N(0,1) class vector of size z_dim is concatenated to z; PixelNorm then sees both
        self.embed = nn.Embedding(n_classes, z_dim) if n_classes > 1 else None
        in_dim = z_dim * (2 if n_classes > 1 else 1)
        # level 0: dense to 4x4 (equivalent to the paper's 4x4 transposed conv; gain sqrt(2)/4 as in its code) + conv3x3
        self.stem_fc = EqLinear(in_dim, chs[0] * 16, gain=math.sqrt(2) / 4)
        self.stem_conv = EqConv2d(chs[0], chs[0], 3)
        self.blocks = nn.ModuleList([nn.Identity()])  # blocks[l] maps level l-1 features to level l; index 0 unused
        for c_in, c_out in zip(chs[:-1], chs[1:]):
            self.blocks.append(nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                EqConv2d(c_in, c_out, 3), nn.LeakyReLU(_PG_SLOPE), PixelNorm(),
                EqConv2d(c_out, c_out, 3), nn.LeakyReLU(_PG_SLOPE), PixelNorm()))
        self.to_rgb = nn.ModuleList([EqConv2d(c, 3, 1, gain=1.0) for c in chs])
        self.pixnorm = PixelNorm()
        self.level, self.alpha = max_level, 1.0

    def set_growth(self, level, alpha):
        self.level, self.alpha = _pg_check_growth(level, alpha, self.max_level)

    def forward(self, z, y=None):
        assert z.dim() == 2 and z.shape[1] == self.z_dim, f"z must be [N,{self.z_dim}], got {list(z.shape)}"
        if self.embed is not None:
            assert y is not None and y.shape == z.shape[:1], "conditional G needs y [N]"
            z = torch.cat([z, self.embed(y)], dim=1)
        h = F.leaky_relu(self.stem_fc(self.pixnorm(z)).view(z.shape[0], -1, 4, 4), _PG_SLOPE)
        h = self.pixnorm(F.leaky_relu(self.stem_conv(self.pixnorm(h)), _PG_SLOPE))  # [N,C0,4,4]
        h_prev = h
        for lvl in range(1, self.level + 1):
            h_prev, h = h, self.blocks[lvl](h)
        img = self.to_rgb[self.level](h)  # [N,3,r,r], r = 4·2^level
        if self.level > 0 and self.alpha < 1.0:
            low = F.interpolate(self.to_rgb[self.level - 1](h_prev), scale_factor=2, mode="nearest")
            img = torch.lerp(low, img, self.alpha)
        if self.level < self.max_level:
            img = F.interpolate(img, scale_factor=2 ** (self.max_level - self.level), mode="nearest")
        return img  # [N,3,R,R], roughly in [-1,1]


# discriminator

class PGDiscriminator(nn.Module):
    """x [N,3,R,R] (+ y [N] if n_classes > 1) -> (logits [N], None): no auxiliary class logits (the BigGAN D's
    interface). Conditioning by projection: sum(embed(y) · h) is added to the logit, h the C0 features after the 4x4
    conv; the embedding is equalized too (N(0,1) raw, scaled by 1/sqrt(C0))."""

    def __init__(self, *, n_classes=1, ch=64, max_level=4, mbstd_group=4):
        super().__init__()
        assert mbstd_group >= 0, mbstd_group
        assert 0 <= max_level < len(_PG_CH_MULT), f"max_level must be in 0..{len(_PG_CH_MULT) - 1}"
        self.n_classes, self.max_level, self.mbstd_group = n_classes, max_level, mbstd_group
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None  # 0 = off, as in the BigGAN D
        chs = [ch * m for m in _PG_CH_MULT[: max_level + 1]]
        self.from_rgb = nn.ModuleList([nn.Sequential(EqConv2d(3, c, 1), nn.LeakyReLU(_PG_SLOPE)) for c in chs])
        self.blocks = nn.ModuleList([nn.Identity()])  # blocks[l] maps level l features to level l-1; index 0 unused
        for c_out, c_in in zip(chs[:-1], chs[1:]):
            self.blocks.append(nn.Sequential(
                EqConv2d(c_in, c_in, 3), nn.LeakyReLU(_PG_SLOPE),
                EqConv2d(c_in, c_out, 3), nn.LeakyReLU(_PG_SLOPE),
                nn.AvgPool2d(2)))
        self.final_conv = EqConv2d(chs[0] + (1 if mbstd_group else 0), chs[0], 3)  # +1: the minibatch-stddev channel
        self.final_conv4 = EqConv2d(chs[0], chs[0], 4, padding=0)  # 4x4 -> 1x1
        self.final_fc = EqLinear(chs[0], 1, gain=1.0)
        self.embed = nn.Embedding(n_classes, chs[0]) if n_classes > 1 else None
        self.embed_scale = 1.0 / math.sqrt(chs[0])
        self.level, self.alpha = max_level, 1.0

    def set_growth(self, level, alpha):
        self.level, self.alpha = _pg_check_growth(level, alpha, self.max_level)

    def fade_reals(self, x):
        """Reals only: x [N,3,R,R] -> the same blend of level and level-1 detail that G produces while fading in, still
        [N,3,R,R] (the paper's real-image fading): without it the reals are sharp at the new level while the fakes are
        blurred by the fade."""
        f = 2 ** (self.max_level - self.level)
        x = F.avg_pool2d(x, f) if f > 1 else x  # [N,3,r,r]
        if self.level > 0 and self.alpha < 1.0:
            x = torch.lerp(F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest"), x, self.alpha)
        return F.interpolate(x, scale_factor=f, mode="nearest") if f > 1 else x

    def forward(self, x, y=None):
        res = 4 * 2 ** self.max_level
        assert x.dim() == 4 and x.shape[1:] == (3, res, res), f"x must be [N,3,{res},{res}], got {list(x.shape)}"
        f = 2 ** (self.max_level - self.level)
        x = F.avg_pool2d(x, f) if f > 1 else x  # [N,3,r,r]: reals and fakes are downsampled here, on the device
        h = self.from_rgb[self.level](x)
        if self.level > 0:
            h = self.blocks[self.level](h)
            if self.alpha < 1.0:
                h = torch.lerp(self.from_rgb[self.level - 1](F.avg_pool2d(x, 2)), h, self.alpha)
        for lvl in range(self.level - 1, 0, -1):
            h = self.blocks[lvl](h)
        if self.mbstd is not None:
            h = self.mbstd(h)  # [N,C0+1,4,4]
        h = F.leaky_relu(self.final_conv(h), _PG_SLOPE)
        h = F.leaky_relu(self.final_conv4(h), _PG_SLOPE).flatten(1)  # [N,C0]
        out = self.final_fc(h).squeeze(1)  # [N]
        if self.embed is not None:
            assert y is not None and y.shape == out.shape, "conditional D needs y [N]"
            out = out + (self.embed(y) * self.embed_scale * h).sum(dim=1)
        return out, None
