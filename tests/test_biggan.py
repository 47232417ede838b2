"""Tests for modules/recipe/biggan.py at small widths on CPU: shapes, ranges, spectral norm placement, conditioning
wiring, gradients to the projection and auxiliary heads, attention placement, minibatch std, EMA-style copies."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from modules.recipe.biggan import BigDiscriminator, BigGenerator
from modules.recipe.layers import SelfAttention

N, CH = 4, 4  # batch, width multiplier (tiny, so each test takes CPU seconds)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _inputs(n=N, z_dim=120, n_classes=120):
    return torch.randn(n, z_dim), torch.randint(0, n_classes, (n,))


def _weighted(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))]


# shapes and ranges

@pytest.mark.parametrize("ch", [4, 8])
def test_generator_output_shape_and_range(ch):
    G = BigGenerator(ch=ch)
    z, y = _inputs()
    x = G(z, y)
    assert x.shape == (N, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.05  # tanh range, not collapsed to a constant


@pytest.mark.parametrize("ch", [4, 8])
def test_discriminator_output_shapes(ch):
    D = BigDiscriminator(ch=ch)
    x, y = torch.rand(N, 3, 64, 64) * 2 - 1, torch.randint(0, 120, (N,))
    logits, class_logits = D(x, y)
    assert logits.shape == (N,) and class_logits.shape == (N, 120)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def test_discriminator_unconditional():
    D = BigDiscriminator(n_classes=1, ch=CH, projection=False, aux_classifier=False)
    assert D.embed is None and D.aux_head is None
    logits, class_logits = D(torch.randn(N, 3, 64, 64))
    assert logits.shape == (N,) and class_logits is None
    D1 = BigDiscriminator(n_classes=1, ch=CH, aux_classifier=False)  # projection with a single class
    assert D1(torch.randn(N, 3, 64, 64), torch.zeros(N, dtype=torch.long))[0].shape == (N,)
    G1 = BigGenerator(n_classes=1, ch=CH)
    assert G1(torch.randn(N, 120), torch.zeros(N, dtype=torch.long)).shape == (N, 3, 64, 64)


# spectral norm placement

def test_spectral_norm_everywhere_but_shared_embedding():
    G, D = BigGenerator(ch=CH), BigDiscriminator(ch=CH)
    for model in (G, D):
        layers = _weighted(model)
        assert len(layers) > 10
        for name, m in layers:
            assert parametrize.is_parametrized(m, "weight") == (model is D or name != "shared"), name
    assert isinstance(D.embed, nn.Embedding) and parametrize.is_parametrized(D.embed, "weight")


def test_spectral_false_removes_it():
    for model in (BigGenerator(ch=CH, spectral=False), BigDiscriminator(ch=CH, spectral=False)):
        assert not any(parametrize.is_parametrized(m) for _, m in _weighted(model))
        assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.abs().max() == 0 for _, m in _weighted(model))


# conditioning wiring

def test_generator_depends_on_label():
    G = BigGenerator(ch=CH).eval()  # eval: no batch statistics, so samples are independent
    z, y = _inputs()
    y2 = y.clone()
    y2[0] = (y[0] + 1) % 120
    with torch.no_grad():
        a, b = G(z, y), G(z, y2)
    assert (a[0] - b[0]).abs().max() > 1e-4
    assert torch.allclose(a[1:], b[1:])


def test_generator_depends_on_every_z_chunk():
    G = BigGenerator(ch=CH).eval()
    n_chunks = len(G.blocks) + 1
    assert G.z_chunk * n_chunks == 120
    z, y = _inputs()
    with torch.no_grad():
        base = G(z, y)
        for i in range(n_chunks):
            z2 = z.clone()
            z2[:, i * G.z_chunk:(i + 1) * G.z_chunk] = torch.randn(N, G.z_chunk)
            assert (G(z2, y) - base).abs().max() > 1e-4, f"z chunk {i} has no effect"


def test_generator_gradient_reaches_every_z_chunk_and_shared():
    G = BigGenerator(ch=CH)
    z, y = _inputs()
    z.requires_grad_(True)
    G(z, y).square().mean().backward()
    for chunk in z.grad.split(G.z_chunk, dim=1):
        assert chunk.abs().sum() > 0
    assert G.shared.weight.grad[y].abs().sum() > 0


# discriminator heads receive gradient

def test_projection_and_aux_head_get_gradient():
    D = BigDiscriminator(ch=CH)
    x, y = torch.randn(N, 3, 64, 64), torch.randint(0, 120, (N,))
    logits, class_logits = D(x, y)
    logits.mean().backward()
    embed_grad = D.embed.parametrizations.weight.original.grad
    assert embed_grad is not None and embed_grad[y].abs().sum() > 0
    assert D.aux_head.parametrizations.weight.original.grad is None  # not on the path of logits
    D.zero_grad()
    logits, class_logits = D(x, y)
    nn.functional.cross_entropy(class_logits, y).backward()
    assert D.aux_head.parametrizations.weight.original.grad.abs().sum() > 0


# attention placement

def test_attention_at_32_and_switch_off():
    G, D = BigGenerator(ch=CH), BigDiscriminator(ch=CH)
    assert list(G.attn) == ["2"] and list(D.attn) == ["0"]  # G block 2 and D block 0 output 32x32
    assert G.attn["2"].gamma.item() == 0.0 and D.attn["0"].gamma.item() == 0.0
    assert G.attn["2"].theta.in_channels == 4 * CH and D.attn["0"].theta.in_channels == 2 * CH  # 2nd place's D
    for model in (BigGenerator(ch=CH, attention_res=()), BigDiscriminator(ch=CH, attention_res=())):
        assert not any(isinstance(m, SelfAttention) for m in model.modules())
        assert not any("gamma" in name for name, _ in model.named_parameters())


def test_d_tables_the_2nd_places_and_biggan_pytorchs():
    """Default: the 2nd place's D, four blocks of 64/128/256/512 channels at 32/16/8/4 px at d_ch 32, attention on 64
    channels at 32 px, 4.99 M parameters (theirs 4.98 M: our biases); BigGAN-PyTorch's arch[64] (five blocks, the
    fifth at 4x4 without downsampling) stays selectable by name."""
    D = BigDiscriminator(ch=32)
    assert [b.conv2.out_channels for b in D.blocks] == [64, 128, 256, 512] and [b.downsample for b in D.blocks] == [True] * 4
    assert D.attn["0"].theta.in_channels == 64
    assert sum(p.numel() for p in D.parameters()) == pytest.approx(4.99e6, rel=0.002)
    old = BigDiscriminator(ch=32, arch="biggan-pytorch")
    assert [b.conv2.out_channels for b in old.blocks] == [32, 64, 128, 256, 512]
    assert [b.downsample for b in old.blocks] == [True, True, True, True, False]
    for d in (D, old):
        assert d(torch.randn(2, 3, 64, 64), torch.randint(0, 120, (2,)))[0].shape == (2,)


# copies for EMA and checkpoints

def test_deepcopy_and_state_dict_roundtrip():
    G = BigGenerator(ch=CH)
    z, y = _inputs()
    G(z, y)  # one training step's forward: updates BN running stats and SN u/v buffers
    G.eval()
    ema = copy.deepcopy(G)
    fresh = BigGenerator(ch=CH).eval()
    fresh.load_state_dict(G.state_dict())
    with torch.no_grad():
        ref = G(z, y)
        assert torch.equal(ema(z, y), ref) and torch.equal(fresh(z, y), ref)


# mixed precision (CPU autocast uses bfloat16; fp16 on CUDA takes the same code paths for dtype mixing)

def test_autocast_forward_backward():
    G, D = BigGenerator(ch=CH), BigDiscriminator(ch=CH)
    z, y = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, y)
        logits, class_logits = D(x, y)
    assert x.shape == (N, 3, 64, 64) and logits.dtype == class_logits.dtype == torch.float32
    (logits.mean() + class_logits.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)
