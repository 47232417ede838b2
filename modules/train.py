"""Training: device-resident batches, the GAN step (AMP, no per-step host sync), EMA/SWA of G, roll-back on divergence,
checkpoints, and the loop that does its upkeep once per check/tick and stops on the Deadline.
"""
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from modules.augment import diff_augment, parse_augment_policy
from modules.losses import LOSSES, gradient_penalty
from modules.models import build_models
from modules.pggan import pggan_growth
from modules.speed import maybe_compile

# data on the device


class DeviceBatches:
    """The uint8 training crops live on the device once; each batch is indexed, flipped, noised and normalised there."""

    def __init__(self, images, labels, *, device, hflip=True, real_noise=0.0):
        # images: numpy uint8 [N,H,W,3] -> device uint8 [N,3,H,W]; labels: [N] long
        self.images = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels).long().to(device)
        self.n = self.images.shape[0]
        self.hflip, self.real_noise = hflip, real_noise
        self.device = device

    def sample(self, batch_size):
        """-> x [B,3,H,W] float32 in about [-1,1] (+ U(0, real_noise)), y [B] long."""
        idx = torch.randint(self.n, (batch_size,), device=self.device)
        x = self.images[idx].float().mul_(2 / 255).sub_(1)
        if self.hflip:
            flip = torch.rand(batch_size, 1, 1, 1, device=self.device) < 0.5
            x = torch.where(flip, x.flip(3), x)
        if self.real_noise:
            x.add_(torch.rand_like(x), alpha=self.real_noise)
        return x, self.labels[idx]

    def fake_labels(self, batch_size):
        """Breeds for G drawn with the training distribution (the label of a random training row)."""
        return self.labels[torch.randint(self.n, (batch_size,), device=self.device)]


# averaging


class EMA:
    """Exponential moving average of a model's parameters and float buffers; integer buffers are copied.

    Written here rather than with swa_utils.AveragedModel, whose update compares a device counter on the host
    (`n_averaged == 0`) and so syncs every step. Decay is per step at ref_batch and rescaled for other batch sizes,
    so the half-life in images stays fixed.
    """

    def __init__(self, model, *, decay=0.999, batch_size=64, ref_batch=64):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay ** (batch_size / ref_batch)

    def _pairs(self, model):
        src = list(model.parameters()) + list(model.buffers())
        dst = list(self.model.parameters()) + list(self.model.buffers())
        return src, dst

    @torch.no_grad()
    def update(self, model, copy_only=False):
        src, dst = self._pairs(model)
        fs = [s for s in src if s.is_floating_point()]
        fd = [d for d in dst if d.is_floating_point()]
        if copy_only:
            torch._foreach_copy_(fd, fs)
        else:
            torch._foreach_lerp_(fd, fs, 1 - self.decay)
        for s, d in zip(src, dst):
            if not s.is_floating_point():
                d.copy_(s)


# the trainer


def resolve_amp(amp, device):
    """-> autocast dtype or None. fp16 + GradScaler on CUDA (P100 has no bf16); bf16 where the GPU supports it."""
    if amp == "off" or device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16


def _adam(params, lr, betas, device):
    # fused Adam on CUDA (one kernel for all parameters), foreach elsewhere
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kw)


class Trainer:
    """Holds G, D, the averaged G, optimisers and scalers, and makes one GAN step at a time without host syncs.

    Losses and a non-finite counter accumulate on the device; `read_stats()` is the one sync, made every check_every steps.
    """

    def __init__(self, G, D, batches, *, z_dim, loss, batch_size, lr_g, lr_d, betas, d_steps=1, aux_weight=0.0,
                 real_target=1.0, margin=0.0, gp_weight=0.0, instance_noise=0.0, ema=True, ema_decay=0.999,
                 ema_ref_batch=64, ema_start=0, swa=False, swa_every=50, lr_schedule="constant", lr_final=0.0,
                 pg_fade=0.5, amp="auto", diffaug="", fault="", fresh_real_logits=True):
        self.device = batches.device
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.batches = batches
        self.z_dim, self.batch_size, self.d_steps = z_dim, batch_size, d_steps
        self.d_loss_fn, self.g_loss_fn = LOSSES[loss]
        self.fresh_real_logits = fresh_real_logits and loss == "rals"  # rals is the one G loss that reads real logits
        self.aux_weight, self.real_target, self.margin = aux_weight, real_target, margin
        self.gp_weight, self.instance_noise = gp_weight, instance_noise
        self.diffaug = parse_augment_policy(diffaug)
        self.base_lr = {"g": lr_g, "d": lr_d}
        self.lr_scale = 1.0  # lowered by each roll-back
        self.lr_schedule, self.lr_final = lr_schedule, lr_final
        self.opt_g = _adam(self.G.parameters(), lr_g, betas, self.device)
        self.opt_d = _adam(self.D.parameters(), lr_d, betas, self.device)
        self.amp_dtype = resolve_amp(amp, self.device)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler_g = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.scaler_d = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.ema = EMA(self.G, decay=ema_decay, batch_size=batch_size, ref_batch=ema_ref_batch) if ema else None
        self.ema_start = ema_start
        self.swa = AveragedModel(self.G, use_buffers=True) if swa else None
        self.swa_every = swa_every
        self.progressive = hasattr(self.G, "set_growth")
        self.pg_fade = pg_fade
        self.progress = 0.0
        self.step_count = 0
        self.faults = {}  # fault injection for tests: kind -> step (nan, raise) or seconds (slow); see main.FAULT_RE
        for item in filter(None, (f.strip() for f in fault.split(","))):
            kind, _, at = item.partition("@")
            self.faults[kind] = float(at) if at else -1.0
        self.stats = torch.zeros(3, device=self.device)  # [sum loss_d, sum loss_g, non-finite count]
        self.stats_n = 0

    # schedule

    def set_progress(self, progress):
        """progress = fraction of the training time spent, in [0,1]: drives the LR schedule, PGGAN growth, noise decay."""
        self.progress = p = min(max(progress, 0.0), 1.0)
        if self.lr_schedule == "cosine":
            f = self.lr_final + (1 - self.lr_final) * 0.5 * (1 + math.cos(math.pi * p))
        elif self.lr_schedule == "linear":
            f = 1 - (1 - self.lr_final) * p
        else:
            f = 1.0
        for opt, key in ((self.opt_g, "g"), (self.opt_d, "d")):
            for group in opt.param_groups:
                group["lr"] = self.base_lr[key] * f * self.lr_scale
        if self.progressive:
            level, alpha = pggan_growth(p, fade_fraction=self.pg_fade)
            for m in self.shipped_models():
                m.set_growth(level, alpha)

    def shipped_models(self):
        models = [self.G, self.D]
        if self.ema is not None:
            models.append(self.ema.model)
        if self.swa is not None:
            models.append(self.swa.module)
        return models

    def generator_to_ship(self):
        """SWA average if it has averaged anything, else the EMA, else G itself."""
        if self.swa is not None and int(self.swa.n_averaged) > 0:
            return self.swa.module
        return self.ema.model if self.ema is not None else self.G

    # one step

    def _noisy(self, x):
        """What D sees of an image batch: DiffAugment (if on), then instance noise decaying with progress."""
        x = diff_augment(x, self.diffaug)
        if self.instance_noise:
            sigma = self.instance_noise * (1 - self.progress)
            if sigma > 0:
                x = x + sigma * torch.randn_like(x)
        return x

    def _d_logits(self, real, y_real, fake, y_fake):
        """D on reals and fakes: one forward on the concatenation when D allows it (no BN mixing), else two."""
        if self.D.joint_ok:
            logits, cls = self.D(torch.cat([real, fake]), torch.cat([y_real, y_fake]))
            n = real.shape[0]
            return logits[:n], logits[n:], (cls[:n] if cls is not None else None)
        r, cls = self.D(real, y_real)
        f, _ = self.D(fake, y_fake)
        return r, f, cls

    def step(self):
        """One G step after d_steps D steps. Returns nothing; no host sync."""
        self._inject_fault()
        B, dev, amp = self.batch_size, self.device, self.amp_dtype
        ac = dict(device_type=dev.type, dtype=amp, enabled=amp is not None)
        for _ in range(self.d_steps):
            real, y_real = self.batches.sample(B)
            y_fake = self.batches.fake_labels(B)
            z = torch.randn(B, self.z_dim, device=dev)
            with torch.autocast(**ac):
                with torch.no_grad():
                    fake = self.G(z, y_fake)
                real_logits, fake_logits, cls_real = self._d_logits(self._noisy(real), y_real, self._noisy(fake), y_fake)
                loss_d = self.d_loss_fn(real_logits, fake_logits, real_target=self.real_target, margin=self.margin)
                if cls_real is not None and self.aux_weight:
                    loss_d = loss_d + self.aux_weight * F.cross_entropy(cls_real.float(), y_real)
            if self.gp_weight:
                loss_d = loss_d + self.gp_weight * gradient_penalty(self.D, real, fake, y_real)
            if self.faults.get("nan") == self.step_count:
                del self.faults["nan"]  # one shot: the step after a roll-back passes
                loss_d = loss_d * float("nan")
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(loss_d).backward()
            self.scaler_d.step(self.opt_d)
            self.scaler_d.update()
        # G step. Real logits (rals): recomputed on the same reals with the updated D, as RaLS is written, so G's
        # relativistic target compares its fakes with the D it is trained against; fresh_real_logits=False reuses
        # the D step's (detached, from before D's update), saving a D forward over reals
        y_fake = self.batches.fake_labels(B)
        z = torch.randn(B, self.z_dim, device=dev)
        with torch.autocast(**ac):
            if self.fresh_real_logits:
                with torch.no_grad():
                    real_logits, _ = self.D(self._noisy(real), y_real)
            fake = self.G(z, y_fake)
            fake_logits, cls_fake = self.D(self._noisy(fake), y_fake)
            loss_g = self.g_loss_fn(real_logits.detach(), fake_logits)
            if cls_fake is not None and self.aux_weight:
                loss_g = loss_g + self.aux_weight * F.cross_entropy(cls_fake.float(), y_fake)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.scaler_g.step(self.opt_g)
        self.scaler_g.update()
        self.step_count += 1
        self._average()
        ld, lg = loss_d.detach(), loss_g.detach()
        self.stats += torch.stack([ld, lg, (~torch.isfinite(ld)).float() + (~torch.isfinite(lg)).float()])
        self.stats_n += 1

    def _average(self):
        if self.ema is not None:
            self.ema.update(self.G, copy_only=self.step_count <= self.ema_start)
        if self.swa is not None and self.progress >= 0.5 and self.step_count % self.swa_every == 0:
            self.swa.update_parameters(self.G)  # syncs once per swa_every steps, not per step

    def _inject_fault(self):
        if self.faults.get("raise") == self.step_count:
            del self.faults["raise"]  # one shot
            raise RuntimeError(f"injected fault at step {self.step_count} (--set fault=...)")
        if "slow" in self.faults:
            time.sleep(self.faults["slow"])

    def read_stats(self):
        """The one host sync: -> (mean loss_d, mean loss_g, non-finite count) since the last call; resets them."""
        s = self.stats.tolist()
        n = max(self.stats_n, 1)
        self.stats.zero_()
        self.stats_n = 0
        return s[0] / n, s[1] / n, int(s[2])

    # snapshots and checkpoints

    def state_dict(self):
        state = {"G": self.G.state_dict(), "D": self.D.state_dict(), "opt_g": self.opt_g.state_dict(),
                 "opt_d": self.opt_d.state_dict(), "scaler_g": self.scaler_g.state_dict(),
                 "scaler_d": self.scaler_d.state_dict(), "step": self.step_count, "lr_scale": self.lr_scale}
        if self.ema is not None:
            state["ema"] = self.ema.model.state_dict()
        if self.swa is not None:
            state["swa"] = self.swa.state_dict()
        return state

    def load_state_dict(self, state):
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.scaler_g.load_state_dict(state["scaler_g"])
        self.scaler_d.load_state_dict(state["scaler_d"])
        self.step_count = state["step"]
        self.lr_scale = state.get("lr_scale", 1.0)
        if self.ema is not None and "ema" in state:
            self.ema.model.load_state_dict(state["ema"])
        if self.swa is not None and "swa" in state:
            self.swa.load_state_dict(state["swa"])

    def snapshot(self):
        """A deep copy of the whole state, kept on the device (cheap next to a step)."""
        return copy.deepcopy(self.state_dict())

    def rollback(self, snapshot, lr_factor):
        self.load_state_dict(copy.deepcopy(snapshot))
        self.lr_scale *= lr_factor
        self.stats.zero_()
        self.stats_n = 0


def build_trainer(cfg, data, device):
    """Config + loaded data -> Trainer (models built, moved to the device, data on the device)."""
    n_classes = len(data.classes)
    G, D = build_models(cfg, n_classes)
    batches = DeviceBatches(data.images, data.labels, device=device, hflip=cfg.hflip, real_noise=cfg.real_noise)
    trainer = Trainer(
        G, D, batches, z_dim=cfg.z_dim, loss=cfg.loss, batch_size=cfg.batch_size, lr_g=cfg.lr_g, lr_d=cfg.lr_d,
        betas=(cfg.beta1, cfg.beta2), d_steps=cfg.d_steps, aux_weight=cfg.aux_weight, real_target=cfg.real_label,
        margin=cfg.margin, gp_weight=cfg.gp_weight, instance_noise=cfg.instance_noise, ema=cfg.ema,
        ema_decay=cfg.ema_decay, ema_ref_batch=cfg.ema_ref_batch, ema_start=cfg.ema_start, swa=cfg.swa,
        swa_every=cfg.swa_every, lr_schedule=cfg.lr_schedule, lr_final=cfg.lr_final, pg_fade=cfg.pg_fade, amp=cfg.amp,
        diffaug=cfg.diffaug, fault=cfg.fault, fresh_real_logits=cfg.fresh_real_logits)
    maybe_compile(trainer.G, mode=cfg.compile, device=device)  # in place, after the EMA/SWA copies (they stay eager)
    maybe_compile(trainer.D, mode=cfg.compile, device=device)
    return trainer
