"""BigGAN's conditional G and projection D (BigGAN-PyTorch, Brock et al. 2019), as in the 2nd-place recipe: shared
class embedding, hierarchical z, conditional BatchNorm, self-attention at 32x32, an auxiliary classifier head on D.
The architecture is a table per resolution (one row per residual block, widths as multiples of `ch`).
"""
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from modules.recipe.layers import (BN_EPS, BN_MOMENTUM, ConditionalBatchNorm2d, SelfAttention, sn_conv, sn_embedding,
                                   sn_linear)

# architecture tables

# G: resolution -> (bottom width, rows (in_mult, out_mult, out_res)); each block upsamples x2. BigGAN-PyTorch's arch[64].
BIGGAN_G_ARCH = {
    64: (4, ((16, 16, 8), (16, 8, 16), (8, 4, 32), (4, 2, 64))),
}
# D: Config.d_arch -> resolution -> rows (in_mult, out_mult, out_res); in_mult 0 = the RGB image; a block downsamples
# when its out_res is below its input's. "2nd-place": the 2nd place's D (their slide deck; 4.99 M parameters at d_ch 32,
# theirs 4.98 M); "biggan-pytorch": BigGAN-PyTorch's arch[64], whose fifth block (at 4x4) the 2nd place removed.
BIGGAN_D_ARCHS = {
    "2nd-place": {64: ((0, 2, 32), (2, 4, 16), (4, 8, 8), (8, 16, 4))},
    "biggan-pytorch": {64: ((0, 1, 32), (1, 2, 16), (2, 4, 8), (4, 8, 4), (8, 16, 4))},
}


# blocks

class BigGBlock(nn.Module):
    """CBN -> ReLU -> upsample x2 (nearest) -> conv3x3 -> CBN -> ReLU -> conv3x3, plus shortcut upsample -> conv1x1."""

    def __init__(self, in_channels, out_channels, cond_dim, make_conv, make_cbn):
        super().__init__()
        self.bn1 = make_cbn(in_channels, cond_dim)
        self.conv1 = make_conv(in_channels, out_channels)
        self.bn2 = make_cbn(out_channels, cond_dim)
        self.conv2 = make_conv(out_channels, out_channels)
        self.conv_sc = make_conv(in_channels, out_channels, kernel_size=1)  # always learnable: every block upsamples

    def forward(self, x, cond):  # [N,Cin,H,W], [N,cond_dim] -> [N,Cout,2H,2W]
        h = F.interpolate(F.relu(self.bn1(x, cond)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h), cond)))
        return h + self.conv_sc(F.interpolate(x, scale_factor=2, mode="nearest"))


class BigDBlock(nn.Module):
    """Pre-activation ReLU -> conv3x3 -> ReLU -> conv3x3 -> [avgpool 2], plus shortcut conv1x1 -> [avgpool 2].
    optimized=True: BigGAN's first block on raw images: no pre-activation, the shortcut pools before its conv1x1."""

    def __init__(self, in_channels, out_channels, make_conv, downsample=True, optimized=False):
        super().__init__()
        self.downsample, self.optimized = downsample, optimized
        self.conv1 = make_conv(in_channels, out_channels)
        self.conv2 = make_conv(out_channels, out_channels)
        learnable_sc = in_channels != out_channels or downsample
        self.conv_sc = make_conv(in_channels, out_channels, kernel_size=1) if learnable_sc else None

    def _pool(self, x):
        return F.avg_pool2d(x, 2) if self.downsample else x

    def forward(self, x):  # [N,Cin,H,W] -> [N,Cout,H/2,W/2] (or H,W when not downsampling)
        h = x if self.optimized else F.relu(x)
        h = self._pool(self.conv2(F.relu(self.conv1(h))))
        if self.optimized:
            return h + self.conv_sc(self._pool(x))
        return h + (x if self.conv_sc is None else self._pool(self.conv_sc(x)))


# generator

class BigGenerator(nn.Module):
    """forward(z [N,z_dim] float, y [N] long in [0,n_classes)) -> images [N,3,res,res] in [-1,1] (tanh; under autocast
    in the autocast dtype). z is split into len(blocks)+1 equal chunks: chunk 0 feeds the first linear layer, chunk i
    conditions block i's CBNs together with the shared class embedding (cond = cat[shared(y), z_i])."""

    def __init__(self, *, z_dim=120, n_classes=120, shared_dim=32, ch=32, attention_res=(32,), spectral=True,
                 resolution=64):
        super().__init__()
        self.bottom, rows = BIGGAN_G_ARCH[resolution]
        n_chunks = len(rows) + 1
        assert z_dim % n_chunks == 0, f"z_dim={z_dim} must split into {n_chunks} chunks (cli.py checks it)"
        self.z_dim, self.z_chunk = z_dim, z_dim // n_chunks
        cond_dim = shared_dim + self.z_chunk
        make_conv = partial(sn_conv, spectral=spectral)
        make_linear = partial(sn_linear, spectral=spectral)
        make_cbn = partial(ConditionalBatchNorm2d, make_linear=make_linear)

        self.shared = sn_embedding(n_classes, shared_dim, spectral=False)  # not spectral-normed, as in BigGAN
        self.c0 = rows[0][0] * ch
        self.linear = make_linear(self.z_chunk, self.c0 * self.bottom ** 2)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()  # block index (as str) -> SelfAttention applied after that block
        for i, (in_mult, out_mult, out_res) in enumerate(rows):
            assert in_mult == (rows[i - 1][1] if i else rows[0][0]) and out_res == self.bottom * 2 ** (i + 1), rows
            self.blocks.append(BigGBlock(in_mult * ch, out_mult * ch, cond_dim, make_conv, make_cbn))
            if out_res in attention_res:
                self.attn[str(i)] = SelfAttention(out_mult * ch, make_conv)
        c_out = rows[-1][1] * ch
        self.out_bn = nn.BatchNorm2d(c_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.out_conv = make_conv(c_out, 3)

    def forward(self, z, y):
        n = z.shape[0]
        assert z.shape == (n, self.z_dim) and y.shape == (n,), (tuple(z.shape), tuple(y.shape))
        zs = torch.split(z, self.z_chunk, dim=1)
        shared = self.shared(y)  # [N,shared_dim]
        h = self.linear(zs[0]).view(n, self.c0, self.bottom, self.bottom)  # [N,16ch,4,4]
        for i, block in enumerate(self.blocks):
            h = block(h, torch.cat([shared, zs[i + 1]], dim=1))
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        return torch.tanh(self.out_conv(F.relu(self.out_bn(h))))  # [N,3,res,res] in [-1,1]


# discriminator

class BigDiscriminator(nn.Module):
    """forward(x [N,3,res,res] in [-1,1], y [N] long) -> (logits [N], class_logits [N,n_classes] or None), float32:
    logits = linear(h) + sum(embed(y) * h) (projection discriminator) with h = sum-pooled ReLU features [N,16ch];
    class_logits = aux_head(h) when aux_classifier. y may be None when neither projection nor aux_classifier is on."""

    def __init__(self, *, n_classes=120, ch=32, attention_res=(32,), spectral=True, projection=True,
                 aux_classifier=True, resolution=64, arch="2nd-place"):
        super().__init__()
        rows = BIGGAN_D_ARCHS[arch][resolution]
        self.resolution = resolution
        self.joint_ok = True  # no layer mixes samples: reals and fakes can share one forward
        make_conv = partial(sn_conv, spectral=spectral)
        make_linear = partial(sn_linear, spectral=spectral)

        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleDict()  # block index (as str) -> SelfAttention applied after that block
        res = resolution
        for i, (in_mult, out_mult, out_res) in enumerate(rows):
            assert in_mult == (rows[i - 1][1] if i else 0) and out_res in (res, res // 2), rows
            c_in = 3 if i == 0 else in_mult * ch
            self.blocks.append(BigDBlock(c_in, out_mult * ch, make_conv, downsample=out_res < res, optimized=i == 0))
            if out_res in attention_res:
                self.attn[str(i)] = SelfAttention(out_mult * ch, make_conv)
            res = out_res
        c_h = rows[-1][1] * ch
        self.linear = make_linear(c_h, 1)
        self.embed = sn_embedding(n_classes, c_h, spectral=spectral) if projection else None
        self.aux_head = make_linear(c_h, n_classes) if aux_classifier else None

    def forward(self, x, y=None):
        n = x.shape[0]
        assert x.shape == (n, 3, self.resolution, self.resolution), tuple(x.shape)
        h = x
        for i, block in enumerate(self.blocks):
            h = block(h)
            if str(i) in self.attn:
                h = self.attn[str(i)](h)
        h = F.relu(h).sum(dim=(2, 3))  # [N,16ch], global sum pooling
        logits = self.linear(h).squeeze(1).float()  # [N]
        if self.embed is not None:
            assert y is not None and y.shape == (n,), "projection needs labels y [N]"
            logits = logits + (self.embed(y) * h).sum(dim=1).float()
        class_logits = self.aux_head(h).float() if self.aux_head is not None else None  # [N,n_classes]
        return logits, class_logits
