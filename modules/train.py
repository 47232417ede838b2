"""Training: device-resident batches, the GAN step (AMP, no per-step host sync), EMA/SWA of G, snapshots and roll-back
on divergence, and the trainer's state dict. The loop that drives it is in loop.py; checkpoint files in checkpoint.py.
"""
import copy
import math
import os
import signal
import time
import warnings

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from modules.augment import diff_augment, parse_augment_policy
from modules.losses import LOSSES, gradient_penalty
from modules.models import build_models
from modules.pggan import pggan_growth
from modules.speed import maybe_compile
from modules.utils import UsageError, parse_faults

# data on the device


class DeviceBatches:
    """The uint8 training crops live on the device once; each batch is indexed, flipped, noised and normalised there."""

    def __init__(self, images, labels, *, device, hflip, real_noise):
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

    def __init__(self, model, *, decay, batch_size, ref_batch):
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


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # Config.amp's forced choices


def resolve_amp(amp, device):
    """Config.amp -> autocast dtype or None (fp32). auto: on CUDA fp16 (+ GradScalers; the P100 and T4 have no bf16),
    bf16 from sm_80; on the CPU nothing. fp16 / bf16: that dtype on any device, the CPU included (fp16 with the
    GradScalers on, exactly as on CUDA), so the GPU's reduced-precision path can be exercised without a GPU.
    A forced dtype this torch cannot autocast to on this device is a UsageError (one line): torch 2.1/2.2 have no
    torch.amp.GradScaler("cpu"), and an older CPU autocast silently falls back to fp32 for float16."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16
    dtype = AMP_DTYPES[amp]
    problem = _amp_problem(dtype, device)
    if problem:
        raise UsageError(f"setting amp={amp} cannot be used on {device.type} with torch {torch.__version__}: {problem}; "
                         "use amp=auto or amp=off")
    return dtype


def _amp_problem(dtype, device):
    """-> why autocast to `dtype` (with a GradScaler for fp16) does not work on `device`, or "" when it does: a tiny
    linear layer is run under autocast and must come out in `dtype`."""
    if dtype == torch.float16 and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        return f"it has no torch.amp.GradScaler({device.type!r}) (torch 2.3+)"
    try:
        with warnings.catch_warnings():  # old torch: "In CPU autocast, but the target dtype is not supported"
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                out = F.linear(torch.ones(2, 4, device=device), torch.ones(3, 4, device=device))
            if dtype == torch.float16:
                _grad_scaler(device.type, enabled=True)
    except Exception as exc:  # RuntimeError of an old torch; AssertionError of a GradScaler without this device
        return f"autocast to {dtype} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if out.dtype != dtype:
        return f"its {device.type} autocast does not compute in {dtype} (got {out.dtype})"
    return ""


def describe_skips(precision):
    """precision_summary() -> the log's line, e.g. "GradScalers skipped 3 of 500 G steps and 5 of 500 D steps ...";
    "" without GradScalers."""
    p = precision
    if not p.get("grad_scalers"):
        return ""
    if p.get("skipped_g") is None:
        return "GradScalers: skipped steps not counted (this torch's GradScaler does not show them)"
    return (f"GradScalers skipped {p['skipped_g']} of {p['g_steps']} G steps and {p['skipped_d']} of {p['d_steps']} "
            f"D steps (inf/NaN gradients in fp16); scales now G {p['scale_g']:g}, D {p['scale_d']:g}")


def describe_amp(amp_dtype):
    """The precision a Trainer runs in, for the log and report.json."""
    if amp_dtype is None:
        return "fp32"
    return {torch.float16: "fp16 autocast + GradScalers", torch.bfloat16: "bf16 autocast"}.get(amp_dtype, str(amp_dtype))


def _grad_scaler(device_type, *, enabled):
    """torch.amp.GradScaler(device) exists from torch 2.3; torch 2.1/2.2 (the P100's route in README) have only
    torch.cuda.amp.GradScaler, which is all they need: there, scaling is enabled only for fp16 on CUDA (resolve_amp
    refuses amp=fp16 on their CPU)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def _adam(params, lr, betas, device):
    # fused Adam on CUDA (one kernel for all parameters), foreach elsewhere
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kw)


class Trainer:
    """Holds G, D, the averaged G, optimisers and scalers, and makes one GAN step at a time without host syncs.
    Every keyword is required: the values come from Config through build_trainer, never from defaults here.

    Losses and a non-finite counter accumulate on the device; `read_stats()` is the one sync, made every check_every steps.
    """

    def __init__(self, G, D, batches, *, z_dim, loss, batch_size, lr_g, lr_d, betas, d_steps, aux_weight, real_target,
                 margin, gp_weight, instance_noise, ema, ema_decay, ema_ref_batch, ema_start, swa, swa_every,
                 lr_schedule, lr_final, pg_fade, amp, diffaug, fault, fresh_real_logits,
                 rank=0, world_size=1):
        self.device = batches.device
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.batches = batches
        self.z_dim, self.batch_size, self.d_steps = z_dim, batch_size, d_steps  # batch_size: per rank
        self.rank, self.world_size, self.group = rank, world_size, None  # group: attach_group()
        self.global_batch = batch_size * world_size  # images per step over all ranks
        self.group_broken = ""  # set when a collective failed: no more collectives, rank 0 ships what it has
        # Several ranks: G and D step through DistributedDataParallel wrappers (gradients averaged over the ranks);
        # self.G / self.D stay the plain modules: EMA/SWA copies, state dicts (a checkpoint of N ranks loads on M),
        # sampling and the G step's pass through D never touch DDP, hence never a collective on one rank alone.
        # - BatchNorm: per-rank batch statistics (as BigGAN-PyTorch; SyncBatchNorm has no CPU/gloo path to test here
        #   and was not measured on GPUs); the running statistics of rank 0 are the ones used (EMA, checkpoint), and
        #   sync_buffers() copies them to every rank at each host sync.
        # - spectral-norm u/v: identical on every rank by construction (same weights, same u, a deterministic power
        #   iteration), and re-broadcast from rank 0 at each host sync, so no float drift can build up.
        # - EMA/SWA: updated identically on every rank (cheap, no rank-specific code); only rank 0's is shipped.
        # - RaLS's relativistic averages and BN statistics are taken per rank (B/N samples), like BN in BigGAN-PyTorch.
        self.G_train, self.D_train = self.G, self.D  # DDP wrappers once attach_group() is called
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
        self.scaler_g = _grad_scaler(self.device.type, enabled=use_scaler)
        self.scaler_d = _grad_scaler(self.device.type, enabled=use_scaler)
        self.ema = EMA(self.G, decay=ema_decay, batch_size=self.global_batch, ref_batch=ema_ref_batch) if ema else None
        self.ema_start = ema_start
        self.swa = AveragedModel(self.G, use_buffers=True) if swa else None
        self.swa_every = swa_every
        self.progressive = hasattr(self.G, "set_growth")
        self.pg_fade = pg_fade
        self.progress = 0.0
        self.step_count = 0
        self.faults = parse_faults(fault)  # fault injection for tests: kind -> step (nan, raise) or seconds (slow); see config.FAULT_RE
        self.stats = torch.zeros(5, device=self.device)  # [sum loss_d, sum loss_g, non-finite, skipped D, skipped G]
        self.stats_n = 0
        # optimiser steps the GradScalers skipped (inf/NaN gradients; fp16 only), counted on the device in stats[3:] and
        # added up here at each read_stats(): no host sync of their own. steps_counted: G steps read so far.
        self.skipped = {"d": 0, "g": 0}
        self.steps_counted = 0
        self.skips_known = True  # False if this torch's GradScaler no longer shows its found_inf (then not counted)

    def attach_group(self, group):
        """Several ranks: wrap G and D in DistributedDataParallel over `group` (parameters broadcast from rank 0)."""
        self.group = group
        ddp = dict(process_group=group, broadcast_buffers=False,  # buffers: distributed.sync_buffers at host syncs
                   find_unused_parameters=self.progressive)  # PGGAN: the layers above the current level are idle
        if self.device.type == "cuda":
            ddp["device_ids"] = [self.device]
        with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; 2.1 knows only that name
            warnings.simplefilter("ignore", FutureWarning)
            self.G_train = DistributedDataParallel(self.G, **ddp)
            self.D_train = DistributedDataParallel(self.D, **ddp)

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
            logits, cls = self.D_train(torch.cat([real, fake]), torch.cat([y_real, y_fake]))
            n = real.shape[0]
            return logits[:n], logits[n:], (cls[:n] if cls is not None else None)
        r, cls = self.D_train(real, y_real)
        f, _ = self.D_train(fake, y_fake)
        return r, f, cls

    def _latents(self, batch_size):
        return torch.randn(batch_size, self.z_dim, device=self.device)

    def step(self):
        """One G step after d_steps D steps. Returns nothing; no host sync."""
        self._inject_fault()
        B, dev, amp = self.batch_size, self.device, self.amp_dtype
        ac = dict(device_type=dev.type, dtype=amp, enabled=amp is not None)
        for _ in range(self.d_steps):
            real, y_real = self.batches.sample(B)
            if self.progressive:  # PGGAN: the reals blended like the fakes while a level fades in (fade_reals)
                real = self.D.fade_reals(real)
            y_fake = self.batches.fake_labels(B)
            z = self._latents(B)
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
            self._update_scaler(self.scaler_d, self.opt_d, 3)
        # G step. Real logits (rals): recomputed on the same reals with the updated D, as RaLS is written, so G's
        # relativistic target compares its fakes with the D it is trained against; fresh_real_logits=False reuses
        # the D step's (detached, from before D's update), saving a D forward over reals
        y_fake = self.batches.fake_labels(B)
        z = self._latents(B)
        # D's gradients of the G step would be thrown away: not computed (BigGAN-PyTorch's toggle_grads, StyleGAN2-ADA),
        # and with several ranks never all-reduced (the plain D, not DDP's wrapper, so no D collective at all)
        self.D.requires_grad_(False)
        with torch.autocast(**ac):
            if self.fresh_real_logits:
                with torch.no_grad():
                    real_logits, _ = self.D(self._noisy(real), y_real)
            fake = self.G_train(z, y_fake)
            fake_logits, cls_fake = self.D(self._noisy(fake), y_fake)
            loss_g = self.g_loss_fn(real_logits.detach(), fake_logits)
            if cls_fake is not None and self.aux_weight:
                loss_g = loss_g + self.aux_weight * F.cross_entropy(cls_fake.float(), y_fake)
        self.opt_g.zero_grad(set_to_none=True)
        self.scaler_g.scale(loss_g).backward()
        self.D.requires_grad_(True)
        self.scaler_g.step(self.opt_g)
        self._update_scaler(self.scaler_g, self.opt_g, 4)
        self.step_count += 1
        self._average()
        ld, lg = loss_d.detach(), loss_g.detach()
        self.stats[:3] += torch.stack([ld, lg, (~torch.isfinite(ld)).float() + (~torch.isfinite(lg)).float()])
        self.stats_n += 1

    def _update_scaler(self, scaler, opt, slot):
        """scaler.update() after scaler.step(opt), adding to stats[slot] on the device whether that step was skipped.
        GradScaler keeps the step's found_inf tensors (one per device, 1.0 = inf/NaN found, step skipped) until
        update(); they are read there (torch 1.6-2.14 keep them in _per_optimizer_states), never synced here."""
        if scaler.is_enabled() and self.skips_known:
            found = getattr(scaler, "_per_optimizer_states", {}).get(id(opt), {}).get("found_inf_per_device")
            if found:
                self.stats[slot] += sum(v.to(self.device, torch.float32) for v in found.values())
            else:
                self.skips_known = False
        scaler.update()

    def precision_summary(self):
        """report.json's "precision": the autocast dtype, and the optimiser steps the GradScalers skipped out of those
        made (this process, read at host syncs), with their final scales. None where not known."""
        on = self.scaler_g.is_enabled()
        out = {"amp": describe_amp(self.amp_dtype), "grad_scalers": on, "g_steps": self.steps_counted,
               "d_steps": self.steps_counted * self.d_steps}
        if on:
            out.update(skipped_g=self.skipped["g"] if self.skips_known else None,
                       skipped_d=self.skipped["d"] if self.skips_known else None,
                       scale_g=float(self.scaler_g.get_scale()), scale_d=float(self.scaler_d.get_scale()))
        return out

    def _average(self):
        if self.ema is not None:
            self.ema.update(self.G, copy_only=self.step_count <= self.ema_start)
        if self.swa is not None and self.progress >= 0.5 and self.step_count % self.swa_every == 0:
            self.swa.update_parameters(self.G)  # syncs once per swa_every steps, not per step

    def _inject_fault(self):
        if self.faults.get("raise") == self.step_count:
            del self.faults["raise"]  # one shot
            raise RuntimeError(f"injected fault at step {self.step_count} (--set fault=...)")
        if self.faults.get("oom") == self.step_count:  # issue 18: what a GPU too small for the batch raises
            del self.faults["oom"]
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step "
                                              f"{self.step_count}, --set fault=oom@STEP)")
        if "slow" in self.faults:
            time.sleep(self.faults["slow"])
        if self.faults.get("kill") == self.step_count and self.rank == 1:  # a rank dies without a word (tests)
            os.kill(os.getpid(), signal.SIGKILL)
        if "slowgen" in self.faults:  # from the first step on, generation (G in eval mode) runs slower than measured
            delay = self.faults.pop("slowgen")
            for m in {id(m): m for m in (self.G, *self.shipped_models()[2:])}.values():
                m.register_forward_pre_hook(lambda module, args, d=delay: None if module.training else time.sleep(d))

    def read_stats(self):
        """The one host sync: -> (mean loss_d, mean loss_g, non-finite count) since the last call; resets them.
        Several ranks: summed over the ranks (one all-reduce), so every rank takes the same roll-back decision."""
        n, ranks = max(self.stats_n, 1), 1
        self.steps_counted += self.stats_n
        if self.group is not None and not self.group_broken:
            torch.distributed.all_reduce(self.stats, group=self.group)
            n, ranks = n * self.world_size, self.world_size
        s = self.stats.tolist()
        self.stats.zero_()
        self.stats_n = 0
        # skips: DDP's averaged gradients are the same on every rank, so each rank skipped the same steps
        self.skipped["d"] += round(s[3] / ranks)
        self.skipped["g"] += round(s[4] / ranks)
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
        for scaler, saved in ((self.scaler_g, state["scaler_g"]), (self.scaler_d, state["scaler_d"])):
            if scaler.is_enabled() and not saved:  # a run without fp16 (CPU, bf16) resumed in fp16: the scalers start
                continue  # at their initial scale (torch would refuse the empty state of a disabled GradScaler)
            scaler.load_state_dict(saved)  # the scale and its growth tracker; a disabled scaler ignores them
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


def build_trainer(cfg, data, device, *, rank=0, world_size=1):
    """Config + loaded data -> Trainer (models built, moved to the device, data on the device).
    Several ranks (world_size > 1; then trainer.attach_group()): the models are built identically on every rank (same
    seed), then the torch RNG is seeded per rank, so each rank draws its own batches and latents."""
    n_classes = len(data.classes)
    G, D = build_models(cfg, n_classes)
    batch_size = cfg.batch_size
    if world_size > 1:
        batch_size = cfg.batch_per_gpu or cfg.batch_size // world_size  # checked by distributed.split_batch
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    batches = DeviceBatches(data.images, data.labels, device=device, hflip=cfg.hflip, real_noise=cfg.real_noise)
    trainer = Trainer(
        G, D, batches, z_dim=cfg.z_dim, loss=cfg.loss, batch_size=batch_size, lr_g=cfg.lr_g, lr_d=cfg.lr_d,
        betas=(cfg.beta1, cfg.beta2), d_steps=cfg.d_steps, aux_weight=cfg.aux_weight, real_target=cfg.real_label,
        margin=cfg.margin, gp_weight=cfg.gp_weight, instance_noise=cfg.instance_noise, ema=cfg.ema,
        ema_decay=cfg.ema_decay, ema_ref_batch=cfg.ema_ref_batch, ema_start=cfg.ema_start, swa=cfg.swa,
        swa_every=cfg.swa_every, lr_schedule=cfg.lr_schedule, lr_final=cfg.lr_final, pg_fade=cfg.pg_fade, amp=cfg.amp,
        diffaug=cfg.diffaug, fault=cfg.fault, fresh_real_logits=cfg.fresh_real_logits,
        rank=rank, world_size=world_size)
    maybe_compile(trainer.G, mode=cfg.compile, device=device)  # in place, after the EMA/SWA copies (they stay eager)
    maybe_compile(trainer.D, mode=cfg.compile, device=device)
    return trainer
