import types

import numpy as np
import pytest
import torch

from modules.recipe.biggan import BigGenerator
from modules.recipe.layers import sn_linear
from modules.recipe.sample import (
    Sampler,
    build_sampler,
    generate_images,
    prepare_for_sampling,
    sample_labels,
    to_uint8,
    truncated_z,
)


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


class TinyBN(torch.nn.Module):
    """z -> spectral-normed linear -> BatchNorm -> tanh, images [N,3,4,4]."""

    def __init__(self):
        super().__init__()
        self.lin = sn_linear(8, 3 * 4 * 4)
        self.bn = torch.nn.BatchNorm1d(3 * 4 * 4)

    def forward(self, z, y):
        return torch.tanh(self.bn(self.lin(z) + 3.0)).view(-1, 3, 4, 4)  # +3: far from the fresh running mean 0


KW = dict(n=64, z_dim=8, label_counts=[1, 1], truncation=2.0, batch_size=32, device=torch.device("cpu"), seed=5)


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_sample_bn_batch_uses_each_batchs_statistics_and_leaves_running_ones():
    torch.manual_seed(0)
    G = TinyBN().train()
    before = _state(G)
    batch = generate_images(G, sample_bn="batch", **KW)
    running = generate_images(G, sample_bn="running", **KW)
    after = _state(G)
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats, counters, u and v untouched
    assert G.training and G.bn.track_running_stats
    assert not np.array_equal(batch, running)
    z = truncated_z(32, 8, 2.0, generator=torch.Generator().manual_seed(5))  # the first batch, by hand
    h = G.lin(z) + 3.0
    expected = to_uint8(torch.tanh((h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + G.bn.eps)).view(-1, 3, 4, 4))
    assert np.abs(batch[:32].astype(int) - expected.astype(int)).max() <= 1
    G.sample_bn = "batch"  # G's own setting (build_models sets it from Config.sample_bn) is the default
    assert np.array_equal(generate_images(G, **KW), batch)


def test_sample_bn_standing_reestimates_statistics_on_a_copy():
    torch.manual_seed(0)
    G = TinyBN().eval()
    G.sample_bn = "standing"
    before = _state(G)
    ready = prepare_for_sampling(G, z_dim=8, label_counts=[1, 1], truncation=2.0, batch_size=32,
                                 device=torch.device("cpu"))
    assert ready is not G and all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    assert prepare_for_sampling(ready, z_dim=8, label_counts=[1, 1], truncation=2.0, batch_size=32,
                                device=torch.device("cpu")) is ready  # once per state of G's weights
    with torch.no_grad():
        G.lin.parametrizations.weight.original.mul_(1.01)  # an optimiser step or EMA update
    assert prepare_for_sampling(G, z_dim=8, label_counts=[1, 1], truncation=2.0, batch_size=32,
                                device=torch.device("cpu")) is not ready
    with torch.no_grad():
        G.lin.parametrizations.weight.original.div_(1.01)
    sn = "lin.parametrizations.weight.0."
    assert torch.equal(ready.state_dict()[sn + "_u"], before[sn + "_u"])  # spectral norm stayed in eval mode
    with torch.no_grad():
        h = G.lin(truncated_z(4096, 8, 2.0)) + 3.0
    assert torch.allclose(ready.bn.running_mean, h.mean(0), atol=0.1)  # the samples' statistics, not G's stale ones
    assert torch.allclose(ready.bn.running_var, h.var(0), rtol=0.2)
    assert ready.bn.momentum == G.bn.momentum
    a = generate_images(ready, **KW)
    assert np.array_equal(a, generate_images(G, **KW))  # an unprepared G gets standing statistics too
    assert not np.array_equal(a, generate_images(G, sample_bn="running", **KW))


def test_on_batch_sees_each_batch_as_it_is_made():
    """generate_images hands each uint8 batch to on_batch in order (the finish encodes PNGs meanwhile): together they
    are exactly the images it returns, and a call without on_batch gives the same images."""
    torch.manual_seed(0)
    G = BigGenerator(z_dim=20, n_classes=3, shared_dim=8, ch=2)
    kw = dict(n=10, z_dim=20, label_counts=[1, 1, 1], truncation=2.0, batch_size=4, device=torch.device("cpu"), seed=3)
    seen = []
    images = generate_images(G, **kw, on_batch=seen.append)
    assert [len(b) for b in seen] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(seen), images)
    np.testing.assert_array_equal(generate_images(G, **kw), images)


def _sampler(G, **kw):
    return Sampler(**{**dict(model=lambda: G, z_dim=8, truncation=2.0, label_counts=np.array([1, 1]), amp_dtype=None,
                             device=torch.device("cpu"), batch=32), **kw})


def test_sampler_generates_as_generate_images():
    """sampler(n, seed) is generate_images with the sampler's settings: the same images for the same seed; with_batch
    changes only the batch; model() is read at each call (the shipped G can switch from the EMA to SWA)."""
    torch.manual_seed(0)
    G = TinyBN().eval()
    sampler = _sampler(G)
    a = sampler(64, 5)
    np.testing.assert_array_equal(a, generate_images(G, **KW))
    seen = []
    np.testing.assert_array_equal(sampler.with_batch(16)(64, 5, on_batch=seen.append), generate_images(
        G, **{**KW, "batch_size": 16}))
    assert [len(b) for b in seen] == [16] * 4 and sampler.batch == 32
    shipped = [G]
    live = _sampler(None, model=lambda: shipped[0])
    shipped[0] = TinyBN().eval()
    np.testing.assert_array_equal(live(64, 5), generate_images(shipped[0], **KW))
    assert not np.array_equal(live(64, 5), a)


def test_sampler_ready_fixes_the_standing_copy():
    torch.manual_seed(0)
    G = TinyBN().eval()
    G.sample_bn = "standing"
    ready = _sampler(G).ready()
    G2 = ready.model()
    assert G2 is not G and G2.standing_ready and ready.model() is G2 and ready.with_batch(8).model() is G2
    np.testing.assert_array_equal(ready(64, 5), generate_images(G, **KW))  # the images generate_images makes
    assert _sampler(G, sample_bn="running")(64, 5).tolist() == generate_images(G, sample_bn="running", **KW).tolist()
    plain = _sampler(TinyBN().eval())
    assert plain.ready().model() is plain.model()  # nothing to prepare: G itself


def test_build_sampler_counts_every_breed():
    cfg = types.SimpleNamespace(z_dim=8, truncation=1.5, sample_batch=12)
    trainer = types.SimpleNamespace(generator_to_ship=lambda: "G", amp_dtype=None, device=torch.device("cpu"))
    data = types.SimpleNamespace(labels=np.array([0, 0, 2]), classes=["a", "b", "c", "d"])
    s = build_sampler(cfg, trainer, data)
    assert s.label_counts.tolist() == [2, 0, 1, 0] and s.model() == "G" and (s.z_dim, s.truncation, s.batch) == (
        8, 1.5, 12) and s.sample_bn is None
