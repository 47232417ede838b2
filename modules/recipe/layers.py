"""Layers shared by the architectures: spectral-norm factories, self-attention, conditional BatchNorm.

Layer types are passed into the models as factories (BigGAN-PyTorch), so spectral norm is one switch:
`make_conv = partial(sn_conv, spectral=spectral)`.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

BN_EPS = 1e-5  # BigGAN-PyTorch's BN_eps
BN_MOMENTUM = 0.1  # BigGAN-PyTorch's ccbn/bn momentum (running stats for eval-mode sampling)


# spectral norm and layer factories

class SpectralNormFP32(parametrizations._SpectralNorm):
    """torch's spectral norm with its power iteration in float32: it runs inside the caller's autocast, which would
    compute u, v and sigma in fp16 on a GPU (pytorch/pytorch#125544). Same state_dict keys as torch's."""

    def forward(self, weight):
        with torch.autocast(weight.device.type, enabled=False):
            return super().forward(weight.float()).to(weight.dtype)


def sn_wrap(module, enabled=True):
    """Orthogonal init of `module.weight`, then (enabled) spectral norm, one power iteration per training forward (u, v
    are buffers: the EMA and the state_dict carry them). Init first: the first power iterations see the final weight."""
    nn.init.orthogonal_(module.weight)
    if enabled:  # torch's defaults: dim 0 (no transposed convs here), eps 1e-12
        parametrize.register_parametrization(module, "weight", SpectralNormFP32(module.weight))
    return module


def sn_conv(in_channels, out_channels, kernel_size=3, bias=True, *, spectral=True):
    """Conv2d with 'same' padding (odd kernels)."""
    return sn_wrap(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias), spectral)


def sn_linear(in_features, out_features, bias=True, *, spectral=True):
    return sn_wrap(nn.Linear(in_features, out_features, bias=bias), spectral)


def sn_embedding(num_embeddings, embedding_dim, *, spectral=True):
    """Spectral norm of the table seen as a matrix (BigGAN's SNEmbedding)."""
    return sn_wrap(nn.Embedding(num_embeddings, embedding_dim), spectral)


# attention

class SelfAttention(nn.Module):
    """SAGAN / BigGAN-PyTorch's non-local block: x + gamma * o(softmax(theta^T phi) g), phi and g 2x2 max-pooled.
    gamma starts at 0: a fresh block is the identity."""

    def __init__(self, channels, make_conv):
        super().__init__()
        self.ck = max(1, channels // 8)  # key/query channels
        self.cv = max(1, channels // 2)  # value channels
        self.theta = make_conv(channels, self.ck, kernel_size=1, bias=False)
        self.phi = make_conv(channels, self.ck, kernel_size=1, bias=False)
        self.g = make_conv(channels, self.cv, kernel_size=1, bias=False)
        self.o = make_conv(self.cv, channels, kernel_size=1, bias=False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # x: [N,C,H,W], H and W even
        n, c, h, w = x.shape
        theta = self.theta(x).view(n, self.ck, h * w)  # [N,ck,HW]
        phi = F.max_pool2d(self.phi(x), 2).view(n, self.ck, h * w // 4)  # [N,ck,HW/4]
        g = F.max_pool2d(self.g(x), 2).view(n, self.cv, h * w // 4)  # [N,cv,HW/4]
        logits = torch.bmm(theta.transpose(1, 2), phi)  # [N,HW,HW/4]
        beta = F.softmax(logits.float(), dim=-1).to(g.dtype)  # softmax in float32: fp16 autocast would overflow exp
        o = torch.bmm(g, beta.transpose(1, 2)).view(n, self.cv, h, w)  # [N,cv,H,W]
        return x + self.gamma * self.o(o)


# normalization

class ConditionalBatchNorm2d(nn.Module):
    """BigGAN's ccbn: BatchNorm without affine params, then per-sample gain 1 + linear(cond) and bias linear(cond)."""

    def __init__(self, channels, cond_dim, make_linear):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM, affine=False)
        self.gain = make_linear(cond_dim, channels, bias=False)
        self.bias = make_linear(cond_dim, channels, bias=False)

    def forward(self, x, cond):  # x: [N,C,H,W], cond: [N,cond_dim]
        gain = 1 + self.gain(cond)[:, :, None, None]  # [N,C,1,1]
        bias = self.bias(cond)[:, :, None, None]
        return self.bn(x) * gain + bias
