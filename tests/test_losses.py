import pytest
import torch

from modules.recipe.losses import LOSSES

GOOD = (torch.full((8,), 5.0), torch.full((8,), -5.0))  # D is right: reals high, fakes low
BAD = (torch.full((8,), -5.0), torch.full((8,), 5.0))


@pytest.mark.parametrize("name", list(LOSSES))
def test_d_loss_lower_when_d_is_right(name):
    d_loss, g_loss = LOSSES[name]
    assert d_loss(*GOOD) < d_loss(*BAD)
    assert g_loss(*GOOD) > g_loss(*BAD)  # G suffers when D separates well


def test_rals_zero_points():
    d_loss, g_loss = LOSSES["rals"]
    real, fake = torch.full((4,), 0.5), torch.full((4,), -0.5)  # real - mean(fake) = 1
    assert d_loss(real, fake).item() == pytest.approx(0.0)
    assert g_loss(fake, real).item() == pytest.approx(0.0)  # roles swapped: G wins


def test_hinge_zero_points_and_values():
    d_loss, g_loss = LOSSES["hinge"]
    assert d_loss(torch.ones(4), -torch.ones(4)).item() == pytest.approx(0.0)
    assert d_loss(torch.zeros(4), torch.zeros(4)).item() == pytest.approx(2.0)
    assert g_loss(None, torch.full((4,), 3.0)).item() == pytest.approx(-3.0)


def test_bce_label_smoothing_minimum():
    d_loss, _ = LOSSES["bce"]
    logit_09 = torch.log(torch.tensor(0.9 / 0.1))
    grid = [d_loss(torch.full((1,), float(v)), torch.full((1,), -20.0), real_target=0.9).item()
            for v in (logit_09 - 1, logit_09, logit_09 + 1)]
    assert grid[1] < grid[0] and grid[1] < grid[2]  # smoothed target: optimum at p = 0.9, not at +inf


def test_margin_zeroes_real_loss_past_margin():
    d_loss, _ = LOSSES["bce"]
    fake = torch.full((4,), -30.0)
    assert d_loss(torch.full((4,), 3.0), fake, margin=2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert d_loss(torch.full((4,), 1.0), fake, margin=2.0).item() > 0.1


def test_lsgan_zero_point():
    d_loss, g_loss = LOSSES["lsgan"]
    assert d_loss(torch.ones(3), torch.zeros(3)).item() == pytest.approx(0.0)
    assert g_loss(None, torch.ones(3)).item() == pytest.approx(0.0)


def test_losses_are_float32_under_half_inputs():
    for d_loss, g_loss in LOSSES.values():
        out = d_loss(torch.ones(4, dtype=torch.float16), -torch.ones(4, dtype=torch.float16))
        assert out.dtype == torch.float32
