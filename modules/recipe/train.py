"""The Trainer: the GAN step (AMP, no per-step host sync), EMA/SWA of G, snapshots and roll-back, its state dict.
The loop that drives it is loop.py.

The EMA of G: an exponential moving average of a model's weights whose half-life is set in images, so it stays
the same when the batch (or the number of ranks) changes, as StyleGAN2-ADA defines its G_ema.

The training crops on the device: loaded there once as uint8, each batch indexed, flipped, noised and normalised
there (no host-to-device copy per step, no DataLoader).
"""
import copy
import warnings

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel

from modules.recipe.device import describe_amp, grad_scaler, resolve_amp
from modules.recipe.losses import LOSSES, diff_augment, parse_augment_policy
from modules.recipe.models import build_models
from modules.recipe.settings import trainer_settings


class EMA:
    """EMA of a model's parameters and float buffers (integer buffers copied); not swa_utils.AveragedModel, whose
    update syncs with the host every step. batch: images per update over all ranks."""

    def __init__(self, model, *, half_life_images, batch):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = 0.5 ** (batch / half_life_images)

    @torch.no_grad()
    def update(self, model, copy_only=False):
        src = list(model.parameters()) + list(model.buffers())
        dst = list(self.model.parameters()) + list(self.model.buffers())
        fs = [s for s in src if s.is_floating_point()]
        fd = [d for d in dst if d.is_floating_point()]
        if copy_only:
            torch._foreach_copy_(fd, fs)
        else:
            torch._foreach_lerp_(fd, fs, 1 - self.decay)
        for s, d in zip(src, dst):
            if not s.is_floating_point():
                d.copy_(s)


class DeviceBatches:
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


ADAM_IMPLEMENTATION_KEYS = ("fused", "foreach", "capturable")  # per-device choices, not training state


def _adam(params, lr, betas, device):
    # fused Adam on CUDA (one kernel for all parameters), foreach elsewhere
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=lr, betas=betas, **kw)


def _load_optimizer(opt, saved):
    """opt.load_state_dict(saved), keeping this device's Adam implementation: torch would restore the saved
    fused/foreach flags too (a GPU checkpoint would ask for fused CPU Adam, missing before torch 2.4)."""
    mine, groups = opt.param_groups, saved["param_groups"]
    if len(groups) == len(mine):  # else torch names the mismatch
        groups = [{**g, **{k: m[k] for k in ADAM_IMPLEMENTATION_KEYS if k in m}} for g, m in zip(groups, mine)]
    opt.load_state_dict({**saved, "param_groups": groups})


class Trainer:
    """G, D, the averaged G, optimisers and scalers; one GAN step at a time without host syncs. settings: a
    settings.TrainerSettings. Losses and a non-finite counter accumulate on the device; read_stats() is the one sync."""

    def __init__(self, G, D, batches, settings, *, world_size=1):
        s = settings
        self.device = batches.device
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.batches = batches
        self.z_dim, self.batch_per_rank = s.z_dim, s.batch_per_rank
        self.loss, self.optim, self.averaging = s.loss, s.optim, s.averaging
        self.world_size, self.group = world_size, None  # group: attach_group()
        self.global_batch = s.batch_per_rank * world_size  # images per step over all ranks
        self.group_broken = ""  # set when a collective failed: no more collectives, rank 0 ships what it has
        # Several ranks: G and D train through DDP wrappers; self.G / self.D stay plain (EMA/SWA, state dicts,
        # sampling and the G step's pass through D never run a collective). BatchNorm statistics and RaLS's averages
        # are per rank (as BigGAN-PyTorch); rank 0's buffers are copied to every rank at each host sync.
        self.G_train, self.D_train = self.G, self.D  # DDP wrappers once attach_group() is called
        self.d_loss_fn, self.g_loss_fn = LOSSES[s.loss.name]
        self.fresh_real_logits = s.loss.fresh_real_logits and s.loss.name == "rals"  # the one G loss reading real logits
        self.diffaug = parse_augment_policy(s.d_input.diffaug)
        self.base_lr = {"g": s.optim.lr_g, "d": s.optim.lr_d}
        self.lr_scale = 1.0  # lowered by each roll-back
        betas = (s.optim.beta1, s.optim.beta2)
        self.opt_g = _adam(self.G.parameters(), s.optim.lr_g, betas, self.device)
        self.opt_d = _adam(self.D.parameters(), s.optim.lr_d, betas, self.device)
        self.amp_dtype = resolve_amp(s.amp, self.device)
        use_scaler = self.amp_dtype == torch.float16
        self.scaler_g = grad_scaler(self.device.type, enabled=use_scaler)
        self.scaler_d = grad_scaler(self.device.type, enabled=use_scaler)
        av = s.averaging
        self.ema = EMA(self.G, half_life_images=av.ema_half_life_images, batch=self.global_batch) if av.ema else None
        self.swa = AveragedModel(self.G, use_buffers=True) if av.swa else None
        self.progress = 0.0
        self.step_count = 0
        self.stats = torch.zeros(5, device=self.device)  # [sum loss_d, sum loss_g, non-finite, skipped D, skipped G]
        self.stats_n = 0
        self.skipped = {"d": 0, "g": 0}  # steps the GradScalers skipped, summed from stats[3:] at each read_stats()
        self.steps_counted = 0  # G steps read by read_stats()
        self.skips_known = True  # False if this torch's GradScaler no longer shows its found_inf (then not counted)

    def attach_group(self, group):
        """Several ranks: wrap G and D in DistributedDataParallel over `group` (parameters broadcast from rank 0)."""
        self.group = group
        ddp = dict(process_group=group, broadcast_buffers=False)  # buffers: distributed.sync_buffers at host syncs
        if self.device.type == "cuda":
            ddp["device_ids"] = [self.device]
        with warnings.catch_warnings():  # torch 2.14 renames broadcast_buffers; 2.1 knows only that name
            warnings.simplefilter("ignore", FutureWarning)
            self.G_train = DistributedDataParallel(self.G, **ddp)
            self.D_train = DistributedDataParallel(self.D, **ddp)

    # schedule

    def set_progress(self, progress):
        """progress: fraction of the planned training time spent, in [0,1]."""
        self.progress = min(max(progress, 0.0), 1.0)
        for opt, key in ((self.opt_g, "g"), (self.opt_d, "d")):
            for group in opt.param_groups:
                group["lr"] = self.base_lr[key] * self.lr_scale

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
        B, dev, amp, loss = self.batch_per_rank, self.device, self.amp_dtype, self.loss
        ac = dict(device_type=dev.type, dtype=amp, enabled=amp is not None)
        for _ in range(self.optim.d_steps):
            real, y_real = self.batches.sample(B)
            y_fake = self.batches.fake_labels(B)
            z = self._latents(B)
            with torch.autocast(**ac):
                with torch.no_grad():
                    fake = self.G(z, y_fake)
                real_logits, fake_logits, cls_real = self._d_logits(diff_augment(real, self.diffaug), y_real,
                                                                    diff_augment(fake, self.diffaug), y_fake)
                loss_d = self.d_loss_fn(real_logits, fake_logits, real_target=loss.real_label, margin=loss.margin)
                if cls_real is not None and loss.aux_weight:
                    loss_d = loss_d + loss.aux_weight * F.cross_entropy(cls_real.float(), y_real)
            self.opt_d.zero_grad(set_to_none=True)
            self.scaler_d.scale(loss_d).backward()
            self.scaler_d.step(self.opt_d)
            self._update_scaler(self.scaler_d, self.opt_d, 3)
        # G step. RaLS's real logits: recomputed with the updated D, as RaLS is written; fresh_real_logits=False
        # reuses the D step's, saving a D forward
        y_fake = self.batches.fake_labels(B)
        z = self._latents(B)
        # D frozen: its gradients here would be thrown away (BigGAN-PyTorch's toggle_grads); plain D: no collective
        self.D.requires_grad_(False)
        try:  # D trainable again even if this step fails
            with torch.autocast(**ac):
                if self.fresh_real_logits:
                    with torch.no_grad():
                        real_logits, _ = self.D(diff_augment(real, self.diffaug), y_real)
                fake = self.G_train(z, y_fake)
                fake_logits, cls_fake = self.D(diff_augment(fake, self.diffaug), y_fake)
                loss_g = self.g_loss_fn(real_logits.detach(), fake_logits)
                if cls_fake is not None and loss.aux_weight:
                    loss_g = loss_g + loss.aux_weight * F.cross_entropy(cls_fake.float(), y_fake)
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler_g.scale(loss_g).backward()
        finally:
            self.D.requires_grad_(True)
        self.scaler_g.step(self.opt_g)
        self._update_scaler(self.scaler_g, self.opt_g, 4)
        self.step_count += 1
        self._average()
        ld, lg = loss_d.detach(), loss_g.detach()
        self.stats[:3] += torch.stack([ld, lg, (~torch.isfinite(ld)).float() + (~torch.isfinite(lg)).float()])
        self.stats_n += 1

    def _update_scaler(self, scaler, opt, slot):
        """scaler.update(), first adding the step's found_inf (1.0 = skipped) to stats[slot] on the device; GradScaler
        keeps it in _per_optimizer_states until update() (torch 1.6-2.14)."""
        if scaler.is_enabled() and self.skips_known:
            found = getattr(scaler, "_per_optimizer_states", {}).get(id(opt), {}).get("found_inf_per_device")
            if found:
                self.stats[slot] += sum(v.to(self.device, torch.float32) for v in found.values())
            else:
                self.skips_known = False
        scaler.update()

    def precision_summary(self):
        """report.json's "precision": the autocast dtype; the steps the GradScalers skipped and their final scales."""
        on = self.scaler_g.is_enabled()
        out = {"amp": describe_amp(self.amp_dtype), "grad_scalers": on, "g_steps": self.steps_counted,
               "d_steps": self.steps_counted * self.optim.d_steps}
        if on:
            out.update(skipped_g=self.skipped["g"] if self.skips_known else None,
                       skipped_d=self.skipped["d"] if self.skips_known else None,
                       scale_g=float(self.scaler_g.get_scale()), scale_d=float(self.scaler_d.get_scale()))
        return out

    def _average(self):
        if self.ema is not None:
            self.ema.update(self.G, copy_only=self.step_count <= self.averaging.ema_start)
        if self.swa is not None and self.progress >= 0.5 and self.step_count % self.averaging.swa_every == 0:
            self.swa.update_parameters(self.G)  # syncs once per swa_every steps, not per step

    def read_stats(self):
        """The one host sync: -> (mean loss_d, mean loss_g, non-finite count) since the last call, over all ranks
        (one all-reduce), so every rank takes the same roll-back decision."""
        n, ranks = max(self.stats_n, 1), 1
        self.steps_counted += self.stats_n
        if self.group is not None and not self.group_broken:
            torch.distributed.all_reduce(self.stats, group=self.group)
            n, ranks = n * self.world_size, self.world_size
        s = self.stats.tolist()
        self.stats.zero_()
        self.stats_n = 0
        # every rank skipped the same steps (DDP's averaged gradients are the same)
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
        _load_optimizer(self.opt_g, state["opt_g"])
        _load_optimizer(self.opt_d, state["opt_d"])
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
        """A deep copy of the whole state, kept on the device."""
        return copy.deepcopy(self.state_dict())

    def rollback(self, snapshot, lr_factor):
        self.load_state_dict(copy.deepcopy(snapshot))
        self.lr_scale *= lr_factor
        self.stats.zero_()
        self.stats_n = 0


def build_trainer(cfg, data, device, *, rank=0, world_size=1):
    """Config + loaded data -> Trainer on the device. Several ranks: the models are built identically (same seed),
    then the RNG is seeded per rank, so each rank draws its own batches and latents."""
    G, D = build_models(cfg, len(data.classes))
    if world_size > 1:
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
    batches = DeviceBatches(data.images, data.labels, device=device, hflip=cfg.hflip, real_noise=cfg.real_noise)
    return Trainer(G, D, batches, trainer_settings(cfg, world_size=world_size), world_size=world_size)
