"""GAN losses as a registry: LOSSES[name] = (d_loss, g_loss) of D's logits on reals and fakes, in float32.
D's losses take `real_target` (label smoothing; bce, lsgan) and `margin` (the 1st-public team's: no real loss once a
real logit is above it; 0 = off).

DiffAugment (Zhao et al. 2020): random colour, translation and cutout on every input of D, real and fake, in D's
step and G's, so D cannot memorise 20k crops while G still learns the un-augmented images. Newer than the 2019
competition: off by default. Each transform: x [N,3,H,W] -> same shape, random per sample, differentiable in x.
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


def augment_color(x):
    """Random brightness (± 0.5), saturation (× 0..2) and contrast (× 0.5..1.5), per sample."""
    def rand():
        return torch.rand(x.shape[0], 1, 1, 1, device=x.device, dtype=x.dtype)
    x = x + (rand() - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (rand() * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (rand() + 0.5) + mean


def augment_translation(x, ratio=0.125):
    """Shift each image by up to ratio × size pixels in x and y (integer shifts), filling with zeros."""
    n, _, h, w = x.shape
    max_dy, max_dx = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-max_dy, max_dy + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-max_dx, max_dx + 1, (n, 1, 1), device=x.device)
    rows = torch.arange(h, device=x.device).view(1, h, 1) - dy  # source row of each output row, [N,H,1]
    cols = torch.arange(w, device=x.device).view(1, 1, w) - dx  # [N,1,W]
    valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).unsqueeze(1)  # [N,1,H,W]
    flat = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).view(n, 1, h * w).expand(-1, x.shape[1], -1)
    out = x.flatten(2).gather(2, flat).view_as(x)
    return out * valid.to(x.dtype)


def augment_cutout(x, ratio=0.5):
    """Zero one square of side ratio × size at a random place in each image."""
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    top = torch.randint(0, h - ch + 1, (n, 1, 1), device=x.device)  # the square lies fully inside the image
    left = torch.randint(0, w - cw + 1, (n, 1, 1), device=x.device)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (ys >= top) & (ys < top + ch) & (xs >= left) & (xs < left + cw)  # [N,H,W]
    return x * (~inside).unsqueeze(1).to(x.dtype)


AUGMENTS = {"color": augment_color, "translation": augment_translation, "cutout": augment_cutout}


def parse_augment_policy(policy):
    """'color,translation' -> ('color', 'translation'); '' -> ()."""
    return tuple(p.strip() for p in policy.split(",") if p.strip())


def diff_augment(x, policy):
    for name in policy:
        x = AUGMENTS[name](x)
    return x
