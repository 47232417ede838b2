"""The Trainer's settings in small frozen groups (as StyleGAN2-ADA's loss_kwargs, G_opt_kwargs). A field is Config's
field of the same name (its comment there says the unit and choices) unless trainer_settings derives it.
"""
import dataclasses
import math
from dataclasses import dataclass

from modules.recipe.config import UsageError


@dataclass(frozen=True)
class LossSettings:
    name: str  # Config.loss
    aux_weight: float
    real_label: float
    margin: float
    fresh_real_logits: bool


@dataclass(frozen=True)
class OptimSettings:
    """Adam for G and D (learning rates before roll-backs scale them)."""
    lr_g: float
    lr_d: float
    beta1: float
    beta2: float
    d_steps: int


@dataclass(frozen=True)
class AveragingSettings:
    ema: bool
    ema_half_life_images: float  # images (over all ranks) after which a weight's share in the EMA has halved
    ema_start: int
    swa: bool
    swa_every: int


@dataclass(frozen=True)
class DInputSettings:
    """What D sees of every batch, real and fake, besides the images themselves."""
    diffaug: str


@dataclass(frozen=True)
class TrainerSettings:
    """Everything a Trainer is built with besides the models, the data and the ranks' layout."""
    z_dim: int
    batch_per_rank: int  # images per step on this rank (Config.batch_size is over all ranks)
    amp: str
    loss: LossSettings
    optim: OptimSettings
    averaging: AveragingSettings
    d_input: DInputSettings


def ema_half_life_images(decay, ref_batch):
    """Config's EMA decay per step at ref_batch images per step -> its half-life in images (decay 1: infinite)."""
    return math.inf if decay >= 1 else ref_batch * math.log(0.5) / math.log(decay)


def _group(cls, cfg, **derived):
    """A settings group: each field is Config's field of the same name, unless given in `derived`."""
    names = [f.name for f in dataclasses.fields(cls)]
    assert set(derived) <= set(names), f"{cls.__name__} has no field(s) {sorted(set(derived) - set(names))}"
    return cls(**{n: derived[n] if n in derived else getattr(cfg, n) for n in names})


def split_batch(batch_size, batch_per_gpu, world_size):
    """-> per-rank batch: batch_size split over the ranks (same recipe, same step count), unless batch_per_gpu > 0."""
    if batch_per_gpu > 0:
        return batch_per_gpu
    if batch_size % world_size:
        raise UsageError(f"batch_size {batch_size} does not split over {world_size} ranks: pick a multiple of "
                         f"{world_size}, or --set batch_per_gpu=N")
    return batch_size // world_size


def trainer_settings(cfg, *, world_size):
    """Config -> TrainerSettings, for `world_size` ranks."""
    batch_per_rank = split_batch(cfg.batch_size, cfg.batch_per_gpu, world_size) if world_size > 1 else cfg.batch_size
    return _group(
        TrainerSettings, cfg, batch_per_rank=batch_per_rank,
        loss=_group(LossSettings, cfg, name=cfg.loss), optim=_group(OptimSettings, cfg),
        averaging=_group(AveragingSettings, cfg,
                         ema_half_life_images=ema_half_life_images(cfg.ema_decay, cfg.ema_ref_batch)),
        d_input=_group(DInputSettings, cfg))
