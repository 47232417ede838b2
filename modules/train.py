"""Training: device-resident batches, the GAN step (AMP, no per-step host sync), EMA/SWA of G, roll-back on divergence,
checkpoints, and the loop that does its upkeep once per check/tick and stops on the Deadline.
"""
import contextlib
import copy
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel

from modules.losses import LOSSES, gradient_penalty
from modules.models import build_models
from modules.pggan import pggan_growth
from modules.sample import truncated_z
from modules.utils import UsageError, format_duration, log, warn

CHECKPOINT_FORMAT = "dogs-gan-checkpoint-1"
CHECKPOINT_ARCH_KEYS = ("arch", "z_dim", "g_ch", "d_ch", "shared_dim", "conditional", "attention", "spectral")
SYNC_MAX_S = 10.0  # a host sync (finite check, step timing, upkeep) at least this often, whatever check_every says
SLOWDOWN_MAX = 3.0  # the finish reserve grows with the measured slowdown of the steps, up to this factor

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
                 pg_fade=0.5, amp="auto", fault=""):
        self.device = batches.device
        self.G, self.D = G.to(self.device), D.to(self.device)
        self.batches = batches
        self.z_dim, self.batch_size, self.d_steps = z_dim, batch_size, d_steps
        self.d_loss_fn, self.g_loss_fn = LOSSES[loss]
        self.aux_weight, self.real_target, self.margin = aux_weight, real_target, margin
        self.gp_weight, self.instance_noise = gp_weight, instance_noise
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
        # G step: the real logits come from the D step above (detached), saving a D forward over reals
        y_fake = self.batches.fake_labels(B)
        z = torch.randn(B, self.z_dim, device=dev)
        with torch.autocast(**ac):
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


def save_checkpoint(path, trainer, *, config, train_seconds, n_classes, classes, plan_seconds=0.0, complete=False,
                    history=None):
    """Atomic and durable: written to path.tmp, flushed to the disk, then renamed over path, so a kill at any moment
    leaves the previous checkpoint or the new one. Holds state dicts and plain data only, never pickled modules.

    plan_seconds: the training time the run's schedule (LR, PGGAN growth) spans; complete: training ran to its end.
    """
    payload = {"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(), "config": config,
               "train_seconds": float(train_seconds), "plan_seconds": float(plan_seconds), "complete": bool(complete),
               "n_classes": n_classes, "classes": list(classes), "history": history or {}}
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_checkpoint(path, *, arch):
    """Load a checkpoint onto the CPU and check it -> its payload (see save_checkpoint).

    arch: {key: value} of this run's architecture settings (CHECKPOINT_ARCH_KEYS), which must equal the checkpoint's.
    A missing, unreadable, foreign or mismatched file is a UsageError naming the path.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"--resume {path}: no such file") from None
    except Exception as exc:  # truncated zip, garbage, a folder, a pickle with code in it
        raise UsageError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__}); use the checkpoint.pt "
                         "of an earlier run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"--resume {path}: not a checkpoint written by this kernel")
    missing = [k for k in ("trainer", "config", "train_seconds", "n_classes", "classes") if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["trainer"], dict):
        raise UsageError(f"--resume {path}: incomplete checkpoint (missing {', '.join(missing) or 'its state'})")
    for key, value in arch.items():
        if ckpt["config"].get(key) != value:
            raise UsageError(f"--resume {path}: checkpoint has {key}={ckpt['config'].get(key)!r}, this run {value!r}; "
                             "resume with the same preset and settings")
    return ckpt


def build_trainer(cfg, data, device):
    """Config + loaded data -> Trainer (models built, moved to the device, data on the device)."""
    n_classes = len(data.classes)
    G, D = build_models(cfg, n_classes)
    batches = DeviceBatches(data.images, data.labels, device=device, hflip=cfg.hflip, real_noise=cfg.real_noise)
    return Trainer(
        G, D, batches, z_dim=cfg.z_dim, loss=cfg.loss, batch_size=cfg.batch_size, lr_g=cfg.lr_g, lr_d=cfg.lr_d,
        betas=(cfg.beta1, cfg.beta2), d_steps=cfg.d_steps, aux_weight=cfg.aux_weight, real_target=cfg.real_label,
        margin=cfg.margin, gp_weight=cfg.gp_weight, instance_noise=cfg.instance_noise, ema=cfg.ema,
        ema_decay=cfg.ema_decay, ema_ref_batch=cfg.ema_ref_batch, ema_start=cfg.ema_start, swa=cfg.swa,
        swa_every=cfg.swa_every, lr_schedule=cfg.lr_schedule, lr_final=cfg.lr_final, pg_fade=cfg.pg_fade, amp=cfg.amp,
        fault=cfg.fault)


# the loop


@torch.no_grad()
def sample_spread(G, z):
    """Mean per-pixel std over a fixed batch of samples: near 0 means mode collapse."""
    was = G.training
    G.eval()
    y = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    spread = float(G(z, y).float().std(0).mean())
    G.train(was)
    return spread


def train_loop(trainer, *, deadline, train_until, stop_event, tick_s=180.0, check_every=50, snapshot_every=500,
               max_rollbacks=3, rollback_lr_factor=0.5, checkpoint_fn=None, checkpoint_s=0.0, prior_train_s=0.0,
               plan_s=None, finish_s=0.0, first_step_s=0.0, history=None):
    """Train until the Deadline's clock reaches train_until (seconds from process start), an interrupt, divergence or a
    failure. Never raises for a failure inside training (an Exception, or a KeyboardInterrupt as a notebook delivers
    it): it returns with reason "crashed" or "interrupted", so that the caller ships what there is.

    Time: a step starts only if it is predicted to end in time: 2x the measured step time (first_step_s before one is
    measured). Other processes slow the finish as much as the steps, so the deadline moves earlier by
    finish_s * (slowdown - 1), slowdown being how much slower the steps run now than at first (1..SLOWDOWN_MAX).
    Schedule: progress = (prior_train_s + seconds trained here) / plan_s (default: prior_train_s + this window);
    training also stops where the plan ends (a resumed run trains what its plan has left).
    Upkeep happens at host syncs only (every check_every steps or SYNC_MAX_S): the finite check and roll-back,
    snapshots, progress lines, and checkpoints, which so never hold unchecked state: checkpoint_fn(train_seconds,
    plan_seconds, complete) every checkpoint_s seconds. The steps after the last sync are checked on the way out too.
    Returns a summary dict (steps, seconds, stop reason, roll-backs, images/s, slowdown, error).
    """
    history = history if history is not None else {}
    t_start = deadline.elapsed()
    plan = max(plan_s or prior_train_s + train_until - t_start, 1e-6)
    window = max(min(train_until - t_start, plan - prior_train_s), 0.0)  # this run's training time
    step_s = None  # seconds per step for the margin, measured at syncs (the first steps, with autotuning, weigh in)
    base_s = recent_s = None  # steady seconds per step: the first measured (per PGGAN level), and a running average
    slowdown, level = 1.0, None
    last_sync_t, last_sync_step = time.monotonic(), trainer.step_count
    last_tick = last_ckpt = time.monotonic()
    ckpt_est = 0.0  # duration of the last checkpoint
    snapshot, snapshot_step, rollbacks = None, trainer.step_count, 0
    first_step = trainer.step_count
    reason, error = "budget", None
    loss_d = loss_g = float("nan")

    def trained():
        return prior_train_s + deadline.elapsed() - t_start

    try:
        snapshot = trainer.snapshot()
        fixed_z = truncated_z(16, trainer.z_dim, 0, generator=torch.Generator().manual_seed(1)).to(trainer.device)
        while True:
            if stop_event is not None and stop_event.is_set():
                reason = "interrupted"
                log(f"{getattr(stop_event, 'why', 'interrupt')}: stopping training, writing the zip "
                    "(interrupt again to exit at once)")
                break
            until = train_until - finish_s * (slowdown - 1)
            margin = 2 * step_s if step_s is not None else first_step_s  # the step we start + one queued on the GPU
            if deadline.elapsed() + margin >= until or trained() >= plan:
                break
            trainer.set_progress(trained() / plan)
            trainer.step()
            done = trainer.step_count - first_step
            if not (done <= 2 or trainer.step_count % check_every == 0 or time.monotonic() - last_sync_t >= SYNC_MAX_S):
                continue
            loss_d, loss_g, bad = trainer.read_stats()  # host sync
            t = time.monotonic()
            measured = (t - last_sync_t) / max(trainer.step_count - last_sync_step, 1)
            if done <= 2:  # the first steps carry autotuning: they set the margin until steady steps are measured
                step_s = max(step_s or 0.0, measured)
            else:
                step_s = 0.7 * step_s + 0.3 * measured
                if trainer.progressive:  # each PGGAN level has its own step time: measure the slowdown within a level
                    new_level = pggan_growth(trainer.progress, fade_fraction=trainer.pg_fade)[0]
                    if new_level != level:
                        level, base_s = new_level, None
                if base_s is None:
                    base_s = recent_s = measured
                recent_s = 0.7 * recent_s + 0.3 * measured
                slowdown = min(max(recent_s / base_s, 1.0), SLOWDOWN_MAX)
            last_sync_t, last_sync_step = t, trainer.step_count
            history.setdefault("loss_d", []).append((trained(), loss_d))
            history.setdefault("loss_g", []).append((trained(), loss_g))
            if bad:
                rollbacks += 1
                if rollbacks > max_rollbacks:
                    warn(f"non-finite losses at step {trainer.step_count} after {max_rollbacks} roll-backs: "
                         "stopping training, shipping the last good averaged generator")
                    trainer.rollback(snapshot, 1.0)
                    reason = "diverged"
                    break
                trainer.rollback(snapshot, rollback_lr_factor)
                warn(f"non-finite losses by step {last_sync_step}: rolled back to step {snapshot_step}, "
                     f"learning rates x{trainer.lr_scale:g} (roll-back {rollbacks}/{max_rollbacks})")
                last_sync_t, last_sync_step = time.monotonic(), trainer.step_count
                continue
            # upkeep, on checked state only; its time is not step time
            if trainer.step_count - snapshot_step >= snapshot_every:
                snapshot, snapshot_step = trainer.snapshot(), trainer.step_count
            now = time.monotonic()
            if now - last_tick >= tick_s:
                last_tick = now
                spread = sample_spread(trainer.generator_to_ship(), fixed_z)
                rate = (trainer.step_count - first_step) / max(deadline.elapsed() - t_start, 1e-9)
                log(f"step {trainer.step_count}  {rate:.2f} it/s  loss_d {loss_d:.4f}  loss_g {loss_g:.4f}  "
                    f"lr_g {trainer.opt_g.param_groups[0]['lr']:.2e}  spread {spread:.3f}  "
                    f"train {format_duration(deadline.elapsed() - t_start)}/{format_duration(window)}"
                    + (f"  steps {slowdown:.1f}x slower than at first" if slowdown > 1.1 else ""))
                history.setdefault("spread", []).append((trained(), spread))
                if spread < 0.02:
                    warn(f"samples of a fixed batch barely differ (spread {spread:.4f}): possible mode collapse")
            if (checkpoint_fn is not None and checkpoint_s > 0 and now - last_ckpt >= checkpoint_s
                    and deadline.elapsed() + 2 * ckpt_est + margin < until):  # never start one that would overrun
                t0 = time.monotonic()
                checkpoint_fn(trained(), plan, False)
                last_ckpt = time.monotonic()
                ckpt_est = last_ckpt - t0
            last_sync_t = time.monotonic()
    except KeyboardInterrupt:  # a notebook's interrupt, where no signal handler could be installed
        reason = "interrupted"
        if stop_event is not None:
            stop_event.set()
        warn(f"KeyboardInterrupt at step {trainer.step_count}: stopping training, writing the zip")
    except Exception as exc:  # CUDA OOM included: ship what there is
        reason = "crashed"
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warn(f"training crashed at step {trainer.step_count} ({error}); shipping the averaged generator")
        traceback.print_exc(file=sys.stdout)
        if trainer.device.type == "cuda":
            torch.cuda.empty_cache()
    if reason != "diverged":  # the steps since the last sync are unchecked: check them before anything ships
        try:
            if trainer.device.type == "cuda":
                torch.cuda.synchronize(trainer.device)
            bad = trainer.read_stats()[2]
            if bad and snapshot is not None:
                warn(f"non-finite losses in the last steps: rolled back to step {snapshot_step}")
                trainer.rollback(snapshot, 1.0)
                rollbacks += 1
        except Exception as exc:
            warn(f"could not check the last steps ({type(exc).__name__}: {exc})")
    seconds = deadline.elapsed() - t_start
    steps = trainer.step_count - first_step
    return {"steps": steps, "total_steps": trainer.step_count, "seconds": seconds, "reason": reason,
            "rollbacks": rollbacks, "it_per_s": steps / max(seconds, 1e-9),
            "images_per_s": steps * trainer.batch_size / max(seconds, 1e-9), "train_seconds_total": prior_train_s + seconds,
            "plan_seconds": plan, "slowdown": slowdown, "error": error}
