"""The Trainer's settings, in small frozen groups built once from Config by trainer_settings(), as StyleGAN2-ADA's
training loop takes G_kwargs / loss_kwargs / G_opt_kwargs. A field takes Config's field of the same name (see Config
for its default and allowed values) unless trainer_settings derives it, so a new knob is two edits: Config and its group.
"""
import dataclasses
import math
from dataclasses import dataclass

from modules.recipe.config import UsageError


@dataclass(frozen=True)
class LossSettings:
    """How D's and G's losses are made."""

    name: str  # losses.LOSSES key (Config.loss): rals | bce | hinge | lsgan
    aux_weight: float  # weight of the auxiliary breed classifier's cross-entropy in D's and G's loss; 0 = off
    real_label: float  # bce: target for reals (one-sided label smoothing: 0.9); the other losses ignore it
    margin: float  # D's real loss is zero where the real logit exceeds this (logit units); 0 = off
    fresh_real_logits: bool  # rals: G's step recomputes D's real logits with the updated D; False reuses the D step's


@dataclass(frozen=True)
class OptimSettings:
    """Adam for G and D (learning rates at schedule factor 1, before roll-backs lower them)."""

    lr_g: float  # G's learning rate
    lr_d: float  # D's learning rate
    beta1: float  # Adam's first-moment decay, per step
    beta2: float  # Adam's second-moment decay, per step
    d_steps: int  # D steps per G step (each on a fresh batch)


@dataclass(frozen=True)
class ScheduleSettings:
    """What follows training progress, the fraction of the planned training time spent, in [0,1]."""

    lr_schedule: str  # constant | cosine | linear: the learning-rate factor over progress
    lr_final: float  # learning-rate factor at progress 1 (cosine, linear), a fraction of the start's


@dataclass(frozen=True)
class AveragingSettings:
    """The averaged copies of G that can be shipped instead of G itself."""

    ema: bool  # keep an exponential moving average of G's weights (and float buffers)
    ema_half_life_images: float  # images (over all ranks) after which a weight's share in the EMA has halved
    ema_start: int  # G steps during which the EMA copies G instead of averaging (it starts averaging after)
    swa: bool  # keep the plain average of G over the second half of training (shipped once it has averaged)
    swa_every: int  # G steps between SWA updates


@dataclass(frozen=True)
class DInputSettings:
    """What D sees of every image batch, real and fake, besides the images themselves."""

    instance_noise: float  # std of Gaussian noise added (in [-1,1] pixel units) at progress 0, decaying linearly to 0
    diffaug: str  # DiffAugment policy: comma-separated color, translation, cutout; "" = off


@dataclass(frozen=True)
class TrainerSettings:
    """Everything a Trainer is built with besides the models, the data and the ranks' layout."""

    z_dim: int  # latent size
    batch_per_rank: int  # images per step on this rank (Config.batch_size is over all ranks)
    amp: str  # Config.amp: auto | off | fp16 | bf16, resolved against the device by precision.resolve_amp
    loss: LossSettings
    optim: OptimSettings
    schedule: ScheduleSettings
    averaging: AveragingSettings
    d_input: DInputSettings


def ema_half_life_images(decay, ref_batch):
    """Config's EMA (decay per step at ref_batch images per step) -> its half-life in images: ref_batch * ln 0.5 /
    ln decay (decay 1: never forgets, an infinite half-life)."""
    return math.inf if decay >= 1 else ref_batch * math.log(0.5) / math.log(decay)


def _group(cls, cfg, **derived):
    """A settings group: each field is Config's field of the same name, unless given in `derived`."""
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(derived) <= set(names), f"{cls.__name__} has no field(s) {sorted(set(derived) - set(names))}"
    return cls(**{n: derived[n] if n in derived else getattr(cfg, n) for n in names})


def split_batch(batch_size, batch_per_gpu, world_size):
    """-> per-rank batch. The global batch_size is split over the ranks (same recipe, same step count), unless
    batch_per_gpu > 0 keeps that many per rank (global batch = batch_per_gpu x ranks)."""
    if batch_per_gpu > 0:
        return batch_per_gpu
    if batch_size % world_size:
        raise UsageError(f"batch_size {batch_size} does not split over {world_size} ranks: pick a multiple of "
                         f"{world_size}, or --set batch_per_gpu=N")
    return batch_size // world_size


def trainer_settings(cfg, *, world_size):
    """Config -> TrainerSettings: the one mapping, used by build_trainer (and so by main, the tests and the benches).
    world_size: the number of ranks Config.batch_size is split over."""
    batch_per_rank = split_batch(cfg.batch_size, cfg.batch_per_gpu, world_size) if world_size > 1 else cfg.batch_size
    return _group(
        TrainerSettings, cfg, batch_per_rank=batch_per_rank,
        loss=_group(LossSettings, cfg, name=cfg.loss), optim=_group(OptimSettings, cfg),
        schedule=_group(ScheduleSettings, cfg),
        averaging=_group(AveragingSettings, cfg,
                         ema_half_life_images=ema_half_life_images(cfg.ema_decay, cfg.ema_ref_batch)),
        d_input=_group(DInputSettings, cfg))
