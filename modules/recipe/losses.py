"""GAN losses as a registry: LOSSES[name] = (d_loss, g_loss) of D's logits on reals and fakes, in float32.
D's losses take `real_target` (label smoothing; bce, lsgan) and `margin` (the 1st-public team's: no real loss once a
real logit is above it; 0 = off).
"""
import torch
import torch.nn.functional as F

# helpers

def _margin_mask(real, margin):
    """1 where a real sample still needs pushing up, 0 once its logit passed the margin."""
    return (real < margin).to(real.dtype) if margin else torch.ones_like(real)


def _masked_mean(values, mask):
    return (values * mask).sum() / values.numel()


# relativistic average least squares (2nd place)

def rals_d(real, fake, *, real_target=1.0, margin=0.0):
    real, fake = real.float(), fake.float()
    real_term = (real - fake.mean() - 1) ** 2
    fake_term = (fake - real.mean() + 1) ** 2
    return (_masked_mean(real_term, _margin_mask(real, margin)) + fake_term.mean()) / 2


def rals_g(real, fake):
    real, fake = real.float(), fake.float()
    return (((fake - real.mean() - 1) ** 2).mean() + ((real - fake.mean() + 1) ** 2).mean()) / 2


# non-saturating BCE (DCGAN; 1st place with real label 0.9)

def bce_d(real, fake, *, real_target=1.0, margin=0.0):
    real, fake = real.float(), fake.float()
    real_term = F.binary_cross_entropy_with_logits(real, torch.full_like(real, real_target), reduction="none")
    fake_term = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
    return _masked_mean(real_term, _margin_mask(real, margin)) + fake_term


def bce_g(real, fake):
    fake = fake.float()
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


# hinge (5th place, SAGAN/BigGAN)

def hinge_d(real, fake, *, real_target=1.0, margin=0.0):
    real, fake = real.float(), fake.float()
    return _masked_mean(F.relu(1 - real), _margin_mask(real, margin)) + F.relu(1 + fake).mean()


def hinge_g(real, fake):
    return -fake.float().mean()


# least squares (LSGAN, a = 0, b = c = 1)

def lsgan_d(real, fake, *, real_target=1.0, margin=0.0):
    real, fake = real.float(), fake.float()
    return (_masked_mean((real - real_target) ** 2, _margin_mask(real, margin)) + (fake ** 2).mean()) / 2


def lsgan_g(real, fake):
    return ((fake.float() - 1) ** 2).mean() / 2


LOSSES = {
    "rals": (rals_d, rals_g),
    "bce": (bce_d, bce_g),
    "hinge": (hinge_d, hinge_g),
    "lsgan": (lsgan_d, lsgan_g),
}

