"""PGGAN: shapes at every level, fade-in identities, growth schedule, equalized LR, PixelNorm, mbstd, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F

from modules.recipe.layers import MinibatchStd
from modules.recipe.pggan import (EqConv2d, EqLinear, PGDiscriminator, PGGenerator, PixelNorm,
                           pggan_growth)

CH, N, Z = 8, 4, 16
LEVELS = range(5)
ALPHAS = (0.0, 0.5, 1.0)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return PGGenerator(z_dim=Z, ch=CH), PGDiscriminator(ch=CH)


def _up(x, factor):
    return F.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x


def _g_features(g, z, level):
    """The level-`level` features of G, computed by hand from its parts (the 'level-L path alone')."""
    h = F.leaky_relu(g.stem_fc(g.pixnorm(z)).view(len(z), -1, 4, 4), 0.2)
    h = g.pixnorm(F.leaky_relu(g.stem_conv(g.pixnorm(h)), 0.2))
    for lvl in range(1, level + 1):
        h = g.blocks[lvl](h)
    return h


# shapes

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_shapes_every_level(nets, level, alpha):
    g, d = nets
    g.set_growth(level, alpha)
    d.set_growth(level, alpha)
    img = g(torch.randn(N, Z))
    assert img.shape == (N, 3, 64, 64)
    r = 4 * 2 ** level  # the image is the level's resolution upsampled: constant on (64/r)^2 blocks
    assert torch.equal(img, _up(img[:, :, :: 64 // r, :: 64 // r], 64 // r))
    logits, aux = d(img)
    assert logits.shape == (N,) and aux is None and torch.isfinite(logits).all()


def test_conditional_shapes_and_embedding_matters():
    torch.manual_seed(0)
    g, d = PGGenerator(z_dim=Z, n_classes=3, ch=CH), PGDiscriminator(n_classes=3, ch=CH)
    z, y0, y1 = torch.randn(N, Z), torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)
    assert g(z, y0).shape == (N, 3, 64, 64)
    assert not torch.allclose(g(z, y0), g(z, y1))
    x = torch.randn(N, 3, 64, 64)
    assert d(x, y0)[0].shape == (N,)
    assert not torch.allclose(d(x, y0)[0], d(x, y1)[0])
    with pytest.raises(AssertionError):
        g(z)


def test_unconditional_ignores_y(nets):
    g, _ = nets
    g.set_growth(4, 1.0)
    z = torch.randn(N, Z)
    assert torch.equal(g(z), g(z, torch.zeros(N, dtype=torch.long)))


def test_bad_growth_and_input_rejected(nets):
    g, d = nets
    for bad in ((5, 1.0), (-1, 1.0), (2, 1.5), (2, -0.1)):
        with pytest.raises(AssertionError):
            g.set_growth(*bad)
    g.set_growth(0, 0.3)
    assert g.alpha == 1.0  # nothing to fade from at level 0
    with pytest.raises(AssertionError):
        d(torch.randn(N, 3, 32, 32))


# fade-in

@pytest.mark.parametrize("level", range(1, 5))
def test_g_fade_endpoints(nets, level):
    g, _ = nets
    z = torch.randn(N, Z)
    with torch.no_grad():
        g.set_growth(level - 1, 1.0)
        prev = g(z)
        g.set_growth(level, 0.0)
        assert torch.equal(g(z), prev)  # alpha=0: exactly the upsampled level L-1 image
        g.set_growth(level, 1.0)
        alone = _up(g.to_rgb[level](_g_features(g, z, level)), 2 ** (4 - level))
        assert torch.allclose(g(z), alone, atol=1e-6)
        g.set_growth(level, 0.25)
        mid = g(z)
    assert torch.allclose(mid, torch.lerp(prev, alone, 0.25), atol=1e-6)


@pytest.mark.parametrize("level", range(1, 5))
def test_d_fade_endpoint_and_fade_reals(nets, level):
    _, d = nets
    x = torch.randn(N, 3, 64, 64)
    with torch.no_grad():
        d.set_growth(level, 1.0)
        assert torch.allclose(d.fade_reals(x), _up(F.avg_pool2d(x, 2 ** (4 - level)), 2 ** (4 - level)))
        assert torch.allclose(d(d.fade_reals(x))[0], d(x)[0], atol=1e-5)  # fade_reals is a no-op for D at alpha 1
        d.set_growth(level, 0.0)
        at0 = d(x)[0]
        d.set_growth(level - 1, 1.0)
        assert torch.allclose(at0, d(x)[0], atol=1e-5)  # alpha=0: D is the level L-1 D on the downsampled input


# growth schedule

def test_growth_schedule_monotone_and_ends_at_top():
    assert pggan_growth(0.0) == (0, 1.0)
    assert pggan_growth(-0.5) == (0, 1.0)
    assert pggan_growth(1.0) == (4, 1.0) and pggan_growth(3.0) == (4, 1.0)
    stages = [pggan_growth(i / 10000) for i in range(10001)]
    assert stages[-1] == (4, 1.0)
    assert all(0 <= lvl <= 4 and 0.0 <= a <= 1.0 for lvl, a in stages)
    assert all(a == 1.0 for lvl, a in stages if lvl == 0)
    for (l0, a0), (l1, a1) in zip(stages, stages[1:]):
        assert l1 >= l0 and (l1 > l0 or a1 >= a0)  # levels never go back; alpha never goes back within a level
    for level in range(1, 5):  # every level > 0 fades in from 0 to 1
        alphas = [a for lvl, a in stages if lvl == level]
        assert alphas[0] < 0.01 and alphas[-1] == 1.0 and 0.0 < alphas[len(alphas) // 8] < 1.0


def test_growth_schedule_split():
    # defaults: units of 1/6, the last level gets two; fading takes the first half unit of each level
    u = 1 / 6
    assert pggan_growth(0.99 * u) == (0, 1.0)
    lvl, a = pggan_growth(1.25 * u)
    assert lvl == 1 and a == pytest.approx(0.5)
    assert pggan_growth(1.75 * u) == (1, 1.0)
    assert pggan_growth(4.0 * u)[0] == 4 and pggan_growth(4.6 * u) == (4, 1.0)
    assert pggan_growth(0.5, n_levels=1) == (0, 1.0)
    assert pggan_growth(0.3, n_levels=5, fade_fraction=0.0, final_weight=1.0) == (1, 1.0)


# layers

def test_equalized_lr_layers():
    torch.manual_seed(0)
    conv = EqConv2d(512, 512, 3)
    assert conv.scale == pytest.approx(math.sqrt(2 / (512 * 9)))
    assert conv.weight.std().item() == pytest.approx(1.0, abs=0.01)
    assert abs(conv.weight.mean().item()) < 0.01 and torch.all(conv.bias == 0)
    x = torch.randn(2, 512, 6, 6)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * conv.scale, padding=1), atol=1e-5)
    lin = EqLinear(1024, 1024, gain=1.0)
    assert lin.scale == pytest.approx(1 / 32)
    assert lin.weight.std().item() == pytest.approx(1.0, abs=0.01) and torch.all(lin.bias == 0)
    v = torch.randn(4096, 1024)
    assert lin(v).var().item() == pytest.approx(1.0, rel=0.05)  # gain 1 keeps unit variance
    assert EqConv2d(8, 8, 4, padding=0)(torch.randn(1, 8, 4, 4)).shape == (1, 8, 1, 1)


def test_pixelnorm_unit_mean_square():
    x = torch.randn(4, 32, 5, 5) * torch.tensor([0.1, 1.0, 100.0, 3.0]).view(4, 1, 1, 1)
    ms = PixelNorm()(x).pow(2).mean(dim=1)  # (the 1e-8 epsilon would show below ~0.01 input scale)
    assert torch.allclose(ms, torch.ones_like(ms), atol=1e-4)
    v = PixelNorm()(torch.randn(7, 16) * 5)
    assert torch.allclose(v.pow(2).mean(dim=1), torch.ones(7), atol=1e-4)


def test_minibatch_std_adds_a_channel():
    x = torch.randn(8, 5, 4, 4)
    out = MinibatchStd(4)(x)
    assert out.shape == (8, 6, 4, 4) and torch.equal(out[:, :5], x)
    groups = x.view(4, 2, 5, 4, 4)  # strided groups: sample i in group i % 2
    want = groups.std(dim=0, unbiased=False).mean(dim=(1, 2, 3))  # [2]
    assert torch.allclose(out[:, 5, 0, 0], want.repeat(4), atol=1e-4)
    assert torch.all(out[:, 5] == out[:, 5, :1, :1])  # constant over pixels
    assert MinibatchStd(4)(torch.randn(6, 5, 4, 4)).shape == (6, 6, 4, 4)  # 6 % 4 != 0: one group
    assert MinibatchStd(4)(torch.randn(2, 5, 4, 4)).shape == (2, 6, 4, 4)  # batch smaller than a group


def test_d_without_minibatch_std():
    d = PGDiscriminator(ch=CH, mbstd_group=0)  # 0 = off (Config's default)
    assert d.final_conv.weight.shape[1] == 8 * CH
    assert d(torch.randn(N, 3, 64, 64))[0].shape == (N,)
    x = torch.randn(N, 3, 64, 64)
    assert torch.allclose(d(x)[0][:1], d(x[:1])[0], atol=1e-5)  # no batch coupling without it


# gradients

@pytest.mark.parametrize("level", LEVELS)
def test_gradients_flow_at_every_level(nets, level):
    g, d = nets
    alpha = 0.5 if level > 0 else 1.0
    g.set_growth(level, alpha)
    d.set_growth(level, alpha)
    g.zero_grad(set_to_none=True)
    d.zero_grad(set_to_none=True)
    x = torch.randn(N, 3, 64, 64, requires_grad=True)
    (d(x)[0].sum() + d(g(torch.randn(N, Z)))[0].sum()).backward()

    def has_grad(module):
        return all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    assert x.grad is not None and x.grad.abs().sum() > 0
    assert has_grad(d.from_rgb[level]) and has_grad(d.final_conv) and has_grad(d.final_conv4) and has_grad(d.final_fc)
    assert has_grad(g.stem_fc) and has_grad(g.to_rgb[level])
    for lvl in range(1, level + 1):
        assert has_grad(d.blocks[lvl]) and has_grad(g.blocks[lvl])
    if level > 0:  # mid-fade: the old level's RGB layers are trained too
        assert has_grad(d.from_rgb[level - 1]) and has_grad(g.to_rgb[level - 1])
    for lvl in range(level + 1, 5):  # levels not yet grown get no gradient
        assert d.from_rgb[lvl][0].weight.grad is None and g.to_rgb[lvl].weight.grad is None
