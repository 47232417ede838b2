import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import CPU, tiny_cfg, tiny_data
from modules.recipe.train import EMA
from modules.recipe.train import DeviceBatches
from modules.recipe.config import PRESETS, Config, apply_overrides
from modules.recipe.device import describe_skips
from modules.recipe.settings import ema_half_life_images, trainer_settings
from modules.recipe.train import build_trainer


def test_device_batches_range_flip_and_labels():
    data = tiny_data()
    b = DeviceBatches(data.images, data.labels, device=CPU, hflip=True, real_noise=1 / 128)
    x, y = b.sample(32)
    assert x.shape == (32, 3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 + 1 / 128
    assert set(y.tolist()) <= {0, 1, 2}
    torch.manual_seed(0)
    b2 = DeviceBatches(data.images[:1], data.labels[:1], device=CPU, hflip=True, real_noise=0)
    x2, _ = b2.sample(64)
    ref = torch.from_numpy(data.images[0]).permute(2, 0, 1).float() * 2 / 255 - 1
    flipped = [torch.allclose(xi, ref.flip(2), atol=1e-6) for xi in x2]
    assert any(flipped) and not all(flipped) and all(f or torch.allclose(xi, ref, atol=1e-6) for f, xi in zip(flipped, x2))


def test_ema_update_equals_formula():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = EMA(model, half_life_images=ema_half_life_images(0.9, 64), batch=64)  # decay 0.9 per step of 64
    before = [p.clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(8, 4))  # changes BN running stats and num_batches_tracked
    ema.update(model)
    for b, e, m in zip(before, ema.model.parameters(), model.parameters()):
        assert torch.allclose(e, 0.9 * b + 0.1 * m)
    assert ema.model[1].num_batches_tracked == model[1].num_batches_tracked


def test_ema_decay_is_batch_size_independent():
    model = torch.nn.Linear(2, 2)
    half_life = ema_half_life_images(0.999, 64)
    a = EMA(model, half_life_images=half_life, batch=64)
    b = EMA(model, half_life_images=half_life, batch=128)
    assert b.decay == pytest.approx(a.decay ** 2)  # one step of 128 images = two of 64


@pytest.mark.parametrize("decay, ref_batch, batch", [(0.999, 64, 64), (0.999, 64, 32), (0.9999, 64, 128),
                                                     (0.99, 16, 48), (1.0, 64, 64)])
def test_ema_half_life_in_images_equals_the_old_per_step_decay(decay, ref_batch, batch):
    """Config's ema_decay per step at ema_ref_batch, as a half-life in images: 0.5 ** (batch / half-life) is exactly
    the decay the EMA had before it took a half-life, decay ** (batch / ref_batch)."""
    half_life = ema_half_life_images(decay, ref_batch)
    assert EMA(torch.nn.Linear(2, 2), half_life_images=half_life, batch=batch).decay == pytest.approx(
        decay ** (batch / ref_batch), rel=1e-12)
    assert 0.5 ** (ref_batch / half_life) == pytest.approx(decay, rel=1e-12)


def test_trainer_settings_map_config_and_the_ema_follows_the_global_batch():
    """One mapping from Config: the groups hold Config's values; batch_size is global, batch_per_rank per rank, and
    the EMA's decay per step follows the global batch (the same half-life in images on any number of ranks)."""
    cfg = tiny_cfg(batch_size=8, lr_g=1e-3, ema_decay=0.99, ema_ref_batch=16, diffaug="color")
    one, two = trainer_settings(cfg, world_size=1), trainer_settings(cfg, world_size=2)
    assert (one.batch_per_rank, two.batch_per_rank) == (8, 4)
    assert trainer_settings(dataclasses.replace(cfg, batch_per_gpu=6), world_size=2).batch_per_rank == 6
    assert (one.loss.name, one.optim.lr_g, one.d_input.diffaug) == (cfg.loss, 1e-3, "color")
    assert one.averaging == two.averaging  # a half-life in images: the same whatever the ranks
    assert one.averaging.ema_half_life_images == pytest.approx(16 * math.log(0.5) / math.log(0.99))
    trainer = build_trainer(cfg, tiny_data(), CPU)
    assert trainer.batch_per_rank == trainer.global_batch == 8
    assert trainer.ema.decay == pytest.approx(0.99 ** (8 / 16))


def test_learning_is_wired():
    """A few hundred steps on a tiny fixed batch drive D's loss down."""
    torch.manual_seed(0)
    data = tiny_data(n=8)
    trainer = build_trainer(tiny_cfg(batch_size=8, lr_g=1e-5), data, CPU)
    losses = []
    for _ in range(80):
        trainer.step()
        losses.append(trainer.read_stats()[0])
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:10])


@pytest.mark.parametrize("preset", ["smoke", "dcgan", "dcgan5", "dcgan-tricks"])
def test_every_arch_steps(preset):
    torch.manual_seed(0)
    overrides = dict(PRESETS[preset])
    cfg = apply_overrides(Config(), overrides, preset)
    cfg = apply_overrides(cfg, {"g_ch": 4, "d_ch": 4, "batch_size": 8}, "test")
    if cfg.arch == "biggan":
        cfg = apply_overrides(cfg, {"z_dim": 20, "shared_dim": 8}, "test")
    trainer = build_trainer(cfg, tiny_data(), CPU)
    trainer.set_progress(0.6)
    for _ in range(3):
        trainer.step()
    ld, lg, bad = trainer.read_stats()
    assert bad == 0 and np.isfinite([ld, lg]).all()
    assert trainer.generator_to_ship()(torch.randn(2, cfg.z_dim), torch.zeros(2, dtype=torch.long)).shape == (2, 3, 64, 64)


def test_trainer_works_without_torch_amp_grad_scaler(monkeypatch):
    """torch 2.1/2.2 (README's P100 route) have no torch.amp.GradScaler: the trainer falls back to torch.cuda.amp's."""
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    trainer = build_trainer(tiny_cfg(batch_size=8), tiny_data(), CPU)
    assert isinstance(trainer.scaler_g, torch.cuda.amp.GradScaler) and not trainer.scaler_g.is_enabled()
    trainer.step()
    trainer.load_state_dict(trainer.state_dict())


@pytest.mark.parametrize("fresh", [False, True])
def test_fresh_real_logits_recomputes_d_on_reals_after_its_update(fresh):
    """rals: fresh_real_logits=True runs D once more per step (on the reals, after D's update) and feeds those logits to
    G's loss (the default); False reuses the D step's. Non-relativistic losses ignore the switch (no wasted forward)."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4, fresh_real_logits=fresh), tiny_data(), CPU)
    calls = []
    forward = trainer.D.forward
    trainer.D.forward = lambda x, y: calls.append(x.shape[0]) or forward(x, y)
    seen = []
    g_loss = trainer.g_loss_fn
    trainer.g_loss_fn = lambda real, fake: seen.append(real.detach().clone()) or g_loss(real, fake)
    trainer.step()
    assert len(calls) == (3 if fresh else 2)  # D step (joint real+fake), [D on reals], D on G's fakes
    assert len(seen) == 1 and seen[0].numel() == 4  # G saw one batch of real logits
    bce = build_trainer(tiny_cfg(batch_size=4, loss="bce", fresh_real_logits=True), tiny_data(), CPU)
    assert not bce.fresh_real_logits


# reduced precision on the CPU (issue 18): the GPU's fp16/bf16 path, exercised without a GPU


@pytest.mark.parametrize("amp", ["fp16", "bf16"])
def test_default_recipe_steps_in_reduced_precision_on_the_cpu(amp):
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=2, amp=amp), tiny_data(), CPU)
    assert trainer.amp_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    assert trainer.scaler_g.is_enabled() == trainer.scaler_d.is_enabled() == (amp == "fp16")
    seen = []
    for net in (trainer.G, trainer.D):
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    for _ in range(2):
        trainer.step()
    ld, lg, bad = trainer.read_stats()
    assert bad == 0 and np.isfinite([ld, lg]).all()
    assert set(seen) == {trainer.amp_dtype}  # G's and D's convs computed in autocast's dtype
    p = trainer.precision_summary()
    assert p["g_steps"] == 2 and p["d_steps"] == 2 and p["grad_scalers"] == (amp == "fp16")
    for m in (trainer.G, trainer.D):
        assert all(q.dtype == torch.float32 and torch.isfinite(q).all() for q in m.parameters())  # fp32 master weights


def _set_scale(scaler, scale):
    state = scaler.state_dict()
    scaler.load_state_dict({**state, "scale": scale, "_growth_tracker": 0})


def test_inf_gradient_skips_that_step_halves_the_scale_and_rolls_nothing_back():
    """An inf in D's gradients: D's optimiser step is skipped (its weights do not change), its scale halves, the skip is
    counted at the next host sync, G's step goes on, and the losses stay finite, so the loop sees nothing to roll back."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=2, amp="fp16"), tiny_data(), CPU)
    for scaler in (trainer.scaler_g, trainer.scaler_d):
        _set_scale(scaler, 64.0)  # small enough that these tiny nets never overflow by themselves
    trainer.step()
    assert trainer.read_stats()[2] == 0 and trainer.skipped == {"d": 0, "g": 0}
    shots = [1]
    param = next(trainer.D.parameters())
    param.register_hook(lambda g: torch.full_like(g, float("inf")) if shots and shots.pop() else g)  # the D step's
    before_d = [q.detach().clone() for q in trainer.D.parameters()]
    before_g = [q.detach().clone() for q in trainer.G.parameters()]
    trainer.step()
    assert all(torch.equal(a, b) for a, b in zip(before_d, trainer.D.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_g, trainer.G.parameters()))
    assert trainer.scaler_d.get_scale() == 32.0 and trainer.scaler_g.get_scale() == 64.0
    ld, lg, bad = trainer.read_stats()
    assert bad == 0 and np.isfinite([ld, lg]).all()  # nothing for the loop's roll-back
    assert trainer.skipped == {"d": 1, "g": 0}
    p = trainer.precision_summary()
    assert (p["skipped_d"], p["d_steps"], p["skipped_g"], p["g_steps"]) == (1, 2, 0, 2)
    assert describe_skips(p).startswith("GradScalers skipped 0 of 2 G steps and 1 of 2 D steps")


def test_g_step_computes_no_d_gradients():
    """One rank too, the G step runs with D frozen (BigGAN-PyTorch's toggle_grads): D's weight gradient is computed once
    per step (its own), not a second time to be thrown away; D is trainable again after the step."""
    torch.manual_seed(0)
    trainer = build_trainer(tiny_cfg(batch_size=4), tiny_data(), CPU)
    calls = []
    trainer.D.linear.parametrizations.weight.original.register_hook(lambda g: calls.append(1))
    trainer.step()
    assert len(calls) == trainer.optim.d_steps == 1
    assert all(p.requires_grad for p in trainer.D.parameters())
