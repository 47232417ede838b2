"""Architectures: the DCGAN baselines here, BigGAN in biggan.py; `ARCHS` names them for the Config.

Every G maps (z [N,z_dim], y [N] long) -> images [N,3,64,64] in about [-1,1]; every D maps (x [N,3,64,64], y [N]) ->
(logits [N], class logits [N,n_classes] or None). `D.joint_ok` says whether reals and fakes may share one forward pass.
"""
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules.recipe.biggan import BigDiscriminator, BigGenerator

# dcgan

# Channel multipliers per resolution (DCGAN paper): G goes 4 -> 8 -> 16 -> 32 -> 64 px, D mirrors it.
DCGAN_G_TABLE = [8, 4, 2, 1]  # × g_ch at 4, 8, 16, 32 px; the last up-block maps g_ch -> 3 at 64 px
DCGAN_D_TABLE = [1, 2, 4, 8]  # × d_ch at 32, 16, 8, 4 px


class SplitBatchNorm2d(nn.BatchNorm2d):
    """The 1st-public team's split BN: in training, the two halves of D's cat([reals, fakes]) batch are normalised
    separately."""

    def __init__(self, channels, split_halves=False):
        super().__init__(channels)
        self.split_halves = split_halves

    def forward(self, x):
        if self.training and self.split_halves:
            a, b = x.chunk(2)
            return torch.cat([super().forward(a), super().forward(b)])
        return super().forward(x)


def _dcgan_init(module):
    """N(0, 0.02) weights, BN gains N(1, 0.02) (DCGAN paper)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)


def _dcgan_up(c_in, c_out, upsample, kernel):
    """One 2x up-sampling conv: transposed conv (paper), or resize + 3x3 conv (the tips: no checkerboard)."""
    if upsample == "transpose":
        pad = (kernel - 1) // 2
        return nn.ConvTranspose2d(c_in, c_out, kernel, 2, pad, output_padding=kernel % 2, bias=False)
    return nn.Sequential(nn.Upsample(scale_factor=2, mode=upsample), nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False))


class DCGenerator(nn.Module):
    """z -> 4x4x(8ch) -> up-blocks with BN + ReLU -> 64x64x3, tanh. kernel=4 is the paper's, kernel=5 the article's."""

    def __init__(self, *, z_dim=128, ch=64, upsample="transpose", kernel=4):
        super().__init__()
        self.z_dim = z_dim
        widths = [m * ch for m in DCGAN_G_TABLE]
        self.stem = nn.Sequential(nn.Linear(z_dim, widths[0] * 16, bias=False))  # -> [N, 8ch, 4, 4]
        self.stem_bn = nn.BatchNorm1d(widths[0] * 16)
        blocks = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            blocks += [_dcgan_up(c_in, c_out, upsample, kernel), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        blocks += [_dcgan_up(widths[-1], 3, upsample, kernel), nn.Tanh()]
        self.blocks = nn.Sequential(*blocks)
        _dcgan_init(self)

    def forward(self, z, y=None):
        h = F.relu(self.stem_bn(self.stem(z)))
        return self.blocks(h.view(z.shape[0], -1, 4, 4))  # [N,3,64,64] in [-1,1]


class DCDiscriminator(nn.Module):
    """Strided convs with LeakyReLU(0.2), BN except after the first; kernel 4 (paper) or 3 (article); linear -> 1."""

    def __init__(self, *, ch=64, kernel=4, split_bn=False):
        super().__init__()
        widths = [m * ch for m in DCGAN_D_TABLE]
        layers, c_in = [], 3
        for i, c_out in enumerate(widths):
            layers.append(nn.Conv2d(c_in, c_out, kernel, 2, (kernel - 1) // 2, bias=(i == 0)))
            if i > 0:
                layers.append(SplitBatchNorm2d(c_out, split_bn))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            c_in = c_out
        self.features = nn.Sequential(*layers)  # -> [N, 8ch, 4, 4]
        self.head = nn.Linear(widths[-1] * 16, 1)
        self.joint_ok = split_bn  # plain BN must not mix reals and fakes in one batch
        _dcgan_init(self)

    def forward(self, x, y=None):
        return self.head(self.features(x).flatten(1)).squeeze(1), None


# registry


def build_biggan(cfg, n_classes):
    attention = (32,) if cfg.attention else ()
    k = n_classes if cfg.conditional else 1
    G = BigGenerator(z_dim=cfg.z_dim, n_classes=k, shared_dim=cfg.shared_dim, ch=cfg.g_ch, attention_res=attention,
                     spectral=cfg.spectral)
    D = BigDiscriminator(n_classes=k, ch=cfg.d_ch, attention_res=attention, spectral=cfg.spectral,
                         projection=cfg.conditional, aux_classifier=cfg.aux_weight > 0 and cfg.conditional,
                         arch=cfg.d_arch)
    return G, D


def build_dcgan(cfg, n_classes, *, g_kernel, d_kernel):
    G = DCGenerator(z_dim=cfg.z_dim, ch=cfg.g_ch, upsample=cfg.upsample, kernel=g_kernel)
    return G, DCDiscriminator(ch=cfg.d_ch, kernel=d_kernel, split_bn=cfg.split_bn)


ARCHS = {"biggan": build_biggan, "dcgan": partial(build_dcgan, g_kernel=4, d_kernel=4),
         "dcgan5": partial(build_dcgan, g_kernel=5, d_kernel=3)}


def build_models(cfg, n_classes):
    """-> (G, D) for cfg.arch, on the CPU, in training mode."""
    G, D = ARCHS[cfg.arch](cfg, n_classes)
    G.sample_bn = cfg.sample_bn  # the BatchNorm statistics G samples with (sample.py); EMA/SWA copies inherit it
    return G, D
