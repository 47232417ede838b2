import dataclasses

import pytest
import torch

from modules.recipe.config import PRESETS, Config, apply_overrides
from modules.recipe.models import ARCHS, DCDiscriminator, DCGenerator, SplitBatchNorm2d, build_models


def _cfg(preset, **kw):
    cfg = apply_overrides(Config(), PRESETS[preset], preset)
    return dataclasses.replace(cfg, g_ch=4, d_ch=4, **kw)


@pytest.mark.parametrize("preset", ["kaggle", "dcgan", "dcgan5", "dcgan-tricks"])
def test_build_models_shapes(preset):
    cfg = _cfg(preset)
    if cfg.arch == "biggan":
        cfg = dataclasses.replace(cfg, z_dim=20, shared_dim=8)
    G, D = build_models(cfg, n_classes=5)
    z, y = torch.randn(4, cfg.z_dim), torch.arange(4) % 5
    x = G(z, y)
    assert x.shape == (4, 3, 64, 64)
    logits, cls = D(x, y)
    assert logits.shape == (4,)
    assert cls is None or cls.shape == (4, 5)
    assert isinstance(D.joint_ok, bool) and sum(p.numel() for p in G.parameters()) > 0


def test_archs_registry_matches_presets():
    assert {p.get("arch", "biggan") for p in PRESETS.values()} <= set(ARCHS)


@pytest.mark.parametrize("upsample", ["transpose", "nearest", "bilinear"])
@pytest.mark.parametrize("kernel", [4, 5])
def test_dcgan_generator_variants(upsample, kernel):
    G = DCGenerator(z_dim=16, ch=4, upsample=upsample, kernel=kernel)
    x = G(torch.randn(2, 16))
    assert x.shape == (2, 3, 64, 64) and x.abs().max() <= 1
    has_transpose = any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules())
    assert has_transpose == (upsample == "transpose")


@pytest.mark.parametrize("kernel", [3, 4])
def test_dcgan_discriminator_no_bn_on_first_layer(kernel):
    D = DCDiscriminator(ch=4, kernel=kernel)
    first_conv = next(m for m in D.features if isinstance(m, torch.nn.Conv2d))
    assert not isinstance(D.features[1], torch.nn.BatchNorm2d) and first_conv.kernel_size == (kernel, kernel)
    assert D(torch.randn(3, 3, 64, 64))[0].shape == (3,)


def test_split_bn_keeps_separate_statistics():
    """A batch of reals does not change the statistics used for fakes."""
    torch.manual_seed(0)
    bn = SplitBatchNorm2d(3)
    bn.split_halves = True
    fakes = torch.randn(4, 3, 5, 5)
    out_a = bn(torch.cat([torch.randn(4, 3, 5, 5) * 10 + 7, fakes]))[4:]
    out_b = bn(torch.cat([torch.randn(4, 3, 5, 5) - 3, fakes]))[4:]
    assert torch.allclose(out_a, out_b, atol=1e-5)
    bn.split_halves = False
    mixed = bn(torch.cat([torch.randn(4, 3, 5, 5) * 10 + 7, fakes]))[4:]
    assert not torch.allclose(mixed, out_a, atol=1e-2)  # plain BN mixes them


def test_dcgan_tricks_d_is_joint_and_split():
    G, D = build_models(_cfg("dcgan-tricks"), n_classes=1)
    assert D.joint_ok and any(getattr(m, "split_halves", False) for m in D.modules())
    G, D = build_models(_cfg("dcgan"), n_classes=1)
    assert not D.joint_ok


def test_dcgan_init_is_normal_002():
    G = DCGenerator(z_dim=16, ch=32)
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, torch.nn.ConvTranspose2d)])
    assert w.std().item() == pytest.approx(0.02, rel=0.05) and abs(w.mean().item()) < 1e-3
