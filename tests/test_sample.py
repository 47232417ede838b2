import numpy as np
import pytest
import torch

from modules.sample import generate_images, sample_labels, to_uint8, truncated_z


@pytest.mark.parametrize("threshold", [2.0, 0.8])
def test_truncation_bounds_and_distribution(threshold):
    z = truncated_z(20000, 16, threshold, generator=torch.Generator().manual_seed(0))
    assert z.abs().max() <= threshold
    # the truncated standard normal keeps its shape: compare the variance with the closed form
    from scipy.stats import truncnorm
    assert z.var().item() == pytest.approx(truncnorm.var(-threshold, threshold), rel=0.03)
    assert abs(z.mean().item()) < 0.01


def test_no_truncation_is_standard_normal():
    z = truncated_z(50000, 4, 0, generator=torch.Generator().manual_seed(0))
    assert z.std().item() == pytest.approx(1.0, rel=0.02) and z.abs().max() > 3.5


def test_labels_follow_counts():
    y = sample_labels(20000, [0, 3, 1], generator=torch.Generator().manual_seed(0))
    freq = np.bincount(y.numpy(), minlength=3) / len(y)
    assert freq[0] == 0 and freq[1] == pytest.approx(0.75, abs=0.02)


def test_to_uint8_range():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    out = to_uint8(x)
    assert out.shape == (1, 1, 5, 3) and out[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_generate_images_is_seeded_and_restores_mode():
    G = torch.nn.Sequential()

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 3 * 4 * 4)

        def forward(self, z, y):
            return torch.tanh(self.lin(z)).view(-1, 3, 4, 4)

    G = Tiny().train()
    kw = dict(n=10, z_dim=8, label_counts=[1, 1], truncation=2.0, batch_size=4, device=torch.device("cpu"), seed=5)
    a, b = generate_images(G, **kw), generate_images(G, **kw)
    assert a.shape == (10, 4, 4, 3) and a.dtype == np.uint8 and np.array_equal(a, b) and G.training
