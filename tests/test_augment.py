import pytest
import torch

from modules.recipe.losses import (AUGMENTS, augment_color, augment_cutout, augment_translation, diff_augment,
                             parse_augment_policy)


def test_policy_parsing():
    assert parse_augment_policy("") == ()
    assert parse_augment_policy("color, cutout") == ("color", "cutout")  # an unknown name: test_config


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_shape_and_gradient(name):
    x = torch.randn(6, 3, 16, 16, requires_grad=True)
    y = AUGMENTS[name](x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_is_an_integer_shift_with_zero_fill():
    torch.manual_seed(0)
    x = torch.arange(1, 1 + 8 * 8, dtype=torch.float32).view(1, 1, 8, 8).repeat(16, 3, 1, 1)
    y = augment_translation(x, ratio=0.25)
    for img, src in zip(y, x):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                shifted = torch.zeros_like(src)
                ys, xs = slice(max(dy, 0), 8 + min(dy, 0)), slice(max(dx, 0), 8 + min(dx, 0))
                ys0, xs0 = slice(max(-dy, 0), 8 + min(-dy, 0)), slice(max(-dx, 0), 8 + min(-dx, 0))
                shifted[:, ys, xs] = src[:, ys0, xs0]
                found |= torch.equal(img, shifted)
        assert found


def test_cutout_zeroes_one_square_of_the_right_size():
    x = torch.ones(10, 3, 16, 16)
    y = augment_cutout(x, ratio=0.5)
    zeros = (y[:, 0] == 0).sum(dim=(1, 2))
    assert torch.all(zeros == 64)  # 8x8 square fully inside
    assert torch.equal(y[:, 0], y[:, 2])  # same mask on every channel


def test_color_keeps_grey_images_grey_under_saturation():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 8, 8).repeat(1, 3, 1, 1)
    y = augment_color(x)
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-6) and not torch.allclose(y, x)


def test_empty_policy_is_identity():
    x = torch.randn(2, 3, 8, 8)
    assert diff_augment(x, ()) is x
