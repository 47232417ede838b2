"""Tests for modules/recipe/layers.py: spectral-norm factories, self-attention, conditional BatchNorm, minibatch std."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from modules.recipe.layers import (ConditionalBatchNorm2d, SelfAttention, sn_conv, sn_embedding,
                                   sn_linear, sn_wrap)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# spectral norm and factories

def test_sn_wrap_switch():
    assert parametrize.is_parametrized(sn_wrap(nn.Linear(3, 5)), "weight")
    assert not parametrize.is_parametrized(sn_wrap(nn.Linear(3, 5), enabled=False))


@pytest.mark.parametrize("make", [partial(sn_conv, 6, 10), partial(sn_linear, 6, 10), partial(sn_embedding, 6, 10)])
def test_factories_spectral_norm_is_one(make):
    m = make()
    assert parametrize.is_parametrized(m, "weight")
    w = m.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=1e-3)
    assert not parametrize.is_parametrized(make(spectral=False))


def test_factories_orthogonal_init_and_padding():
    lin = sn_linear(6, 10, spectral=False)
    assert torch.allclose(lin.weight.T @ lin.weight, torch.eye(6), atol=1e-5)  # orthonormal columns
    conv = sn_conv(4, 7, spectral=False)
    assert conv(torch.randn(2, 4, 9, 9)).shape == (2, 7, 9, 9)  # 'same' padding
    assert sn_conv(4, 7, kernel_size=1, bias=False).bias is None


def test_sn_survives_two_forwards_in_one_graph():
    """GAN pattern: D(real) and D(fake) in one loss; the in-place u/v update must not break backward."""
    lin = sn_linear(4, 3)
    loss = lin(torch.randn(2, 4)).sum() - lin(torch.randn(2, 4)).sum()
    loss.backward()
    assert lin.parametrizations.weight.original.grad is not None



def _mv_like_cuda(monkeypatch, dtype):
    """A test double for torch.mv that behaves as under CUDA autocast, where mv is on the low-precision list (CPU
    autocast leaves it in float32): inside an enabled CPU autocast region its inputs are cast to `dtype`. -> the list
    of the dtypes mv computed in."""
    real_mv, seen = torch.mv, []

    def mv(a, b):
        if torch.is_autocast_enabled("cpu"):
            a, b = a.to(dtype), b.to(dtype)
        seen.append(a.dtype)
        return real_mv(a, b)

    monkeypatch.setattr(torch, "mv", mv)
    return seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_spectral_norm_runs_in_float32_under_autocast(monkeypatch, dtype, training):
    """The power iteration and sigma run in float32 under any autocast: with mv forced onto the low-precision path
    (as CUDA's autocast does), every mv still computes in float32 and the normalised weight equals a float64 reference
    made from the same u, v (a bf16/fp16 sigma is off by ~1e-3 relative)."""
    lin = sn_linear(48, 40)
    lin.train(training)
    sn = lin.parametrizations.weight[0]
    w, u, v = (t.detach().double().clone() for t in (lin.parametrizations.weight.original, sn._u, sn._v))
    if training:  # one power iteration, as the parametrization makes per training-mode read
        u = F.normalize(w @ v, dim=0, eps=1e-12)
        v = F.normalize(w.T @ u, dim=0, eps=1e-12)
    reference = w / torch.dot(u, w @ v)
    seen = _mv_like_cuda(monkeypatch, dtype)
    with torch.autocast("cpu", dtype=dtype):
        got = lin.weight
        y = lin(torch.randn(3, 48))
    assert seen and all(d == torch.float32 for d in seen), seen
    assert got.dtype == torch.float32 and sn._u.dtype == sn._v.dtype == torch.float32
    assert torch.allclose(got.double(), reference, rtol=1e-5, atol=1e-7)
    assert torch.allclose(sn._u.double(), u, atol=1e-6) and torch.allclose(sn._v.double(), v, atol=1e-6)
    assert y.dtype == dtype  # the layer's own matmul still runs in the autocast dtype

# attention

def test_self_attention_identity_at_init_and_shapes():
    attn = SelfAttention(16, partial(sn_conv, spectral=True))
    x = torch.randn(2, 16, 8, 8)
    assert attn.gamma.item() == 0.0
    assert torch.equal(attn(x), x)
    with torch.no_grad():
        attn.gamma.fill_(1.0)
    y = attn(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    y.sum().backward()
    assert attn.theta.parametrizations.weight.original.grad.abs().sum() > 0


def test_self_attention_tiny_width():
    attn = SelfAttention(4, partial(sn_conv, spectral=False))  # channels // 8 == 0 -> clamped to 1
    assert attn.ck == 1 and attn.cv == 2
    assert attn(torch.randn(2, 4, 4, 4)).shape == (2, 4, 4, 4)


# conditional batchnorm

def test_cbn_zero_cond_is_plain_bn_and_cond_is_per_sample():
    cbn = ConditionalBatchNorm2d(5, 7, partial(sn_linear, spectral=True))
    assert parametrize.is_parametrized(cbn.gain, "weight") and parametrize.is_parametrized(cbn.bias, "weight")
    assert cbn.gain.bias is None and cbn.bias.bias is None
    x = torch.randn(4, 5, 3, 3)
    plain = nn.BatchNorm2d(5, affine=False)
    assert torch.allclose(cbn(x, torch.zeros(4, 7)), plain(x), atol=1e-5)
    cbn.eval()
    cond = torch.randn(4, 7)
    cond2 = cond.clone()
    cond2[0] += 1.0
    a, b = cbn(x, cond), cbn(x, cond2)
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1:], b[1:])
