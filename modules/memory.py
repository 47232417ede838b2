"""Memory: what a setting needs, estimated before training from the models' own layers, checked against what the
device and the host have (one estimator for both); and an out-of-memory error in the first training steps said as a
problem the user can fix.

The estimate builds G and D at three small widths on the CPU (never at the asked width: g_ch=1024 would not fit), counts
their parameters (a quadratic in the width, fitted exactly), and runs them on two images, counting the tensors autograd
keeps for backward in training mode, and in eval mode the largest few that generation holds one operation at a time
(all linear in the width and in the images, fitted from two widths); widths up to DIRECT_WIDTH are measured as they
are. From these: the optimiser state, the activations of the larger of the D and G steps at the batch per rank, and
the generation batch's working memory. Activations are counted in fp32 (autocast keeps fewer bytes: an upper bound).
Checked on the CPU: smoke widths, 1,000 images generated at once raised the peak resident memory by 2.15 GiB; the
estimate says 2.70 GiB.
"""
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from modules.models import build_models
from modules.pggan import pggan_growth
from modules.utils import UsageError, eval_mode, log, warn

GIB = 2 ** 30
PROBE_WIDTHS = (8, 16, 24)  # g_ch = d_ch the models are built at for the fits (multiples of 8: attention has ch // 8)
DIRECT_WIDTH = 16  # up to this g_ch / d_ch the models are measured at their own widths (cheaper than the fits)
PROBE_IMAGES = 2
ACTIVATION_OVERHEAD = 1.3  # on counted activations: gradients of activations in backward, allocator rounding, workspace
MEMORY_FRACTION = 0.85  # of the memory available that a run may plan to use
GENERATE_FRACTION = 0.5  # ... and one generation batch (past a few hundred images a larger one buys no speed)
KAGGLE_IMAGES = 20579  # the competition's images, for the crop cache before the data is read (1.07 boxes each)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank needs: `state` (parameters, gradients, Adam's two moments, EMA/SWA copies and the roll-back
    snapshot), `crops` (the uint8 training crops on the device), `train` (activations of one step at batch_per_rank),
    `generate` (working memory of one generation batch of sample_batch). Per-image figures scale the last two."""

    params: int  # G + D parameters
    state: int
    crops: int
    train_per_image: float
    generate_per_image: float
    batch_per_rank: int
    sample_batch: int

    @property
    def train(self):
        return int(self.train_per_image * self.batch_per_rank)

    @property
    def generate(self):
        return int(self.generate_per_image * self.sample_batch)

    @property
    def peak(self):  # generation (the finish's measurement, the loop's re-timing) runs beside the trainer's state
        return self.state + self.crops + max(self.train, self.generate)

    def text(self):
        return (f"~{self.peak / GIB:.2f} GiB (model state {self.state / GIB:.2f} GiB for {self.params / 1e6:.1f}M "
                f"parameters, crops {self.crops / GIB:.2f}, training activations {self.train / GIB:.2f} at "
                f"{self.batch_per_rank} images per rank, generation {self.generate / GIB:.2f} at sample_batch "
                f"{self.sample_batch})")


def _probe_models(cfg, n_classes, width=None):
    """Build G and D at g_ch = d_ch = width (None: the Config's widths) on the CPU -> (G params, D params, G's saved
    bytes per image, D's saved bytes per image, [bytes per image of each tensor G keeps in eval mode, in order])."""
    G, D = build_models(cfg if width is None else dataclasses.replace(cfg, g_ch=width, d_ch=width), n_classes)
    if hasattr(G, "set_growth"):  # PGGAN: the last level holds the most
        level, alpha = pggan_growth(1.0, fade_fraction=cfg.pg_fade)
        G.set_growth(level, alpha)
        D.set_growth(level, alpha)
    params = {id(p) for m in (G, D) for p in m.parameters()}
    saved = []

    def pack(t):
        if id(t) not in params:
            saved.append(t.numel() * t.element_size())
        return t

    n = PROBE_IMAGES
    z = torch.randn(n, cfg.z_dim, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(n, dtype=torch.long)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x = G(z, y)
        n_g = len(saved)
        D(x.detach(), y)
        g_saved, d_saved = sum(saved[:n_g]), sum(saved[n_g:])
        saved.clear()
        with eval_mode(G):  # generation: what G's operations hold, in eval mode (one by one under no_grad)
            G(z, y)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return count(G), count(D), g_saved / n, d_saved / n, np.asarray(saved, np.float64) / n


def build_memory_estimate(cfg, *, batch_per_rank, n_classes, n_crops):
    """Config -> MemoryEstimate for one rank (see the module's docstring). A few hundred ms on a CPU."""
    if max(cfg.g_ch, cfg.d_ch) <= DIRECT_WIDTH:  # small models (smoke widths): measured as they are, no fit
        p_g, p_d, g_s, d_s, sizes = _probe_models(cfg, n_classes)
    else:
        probes = [_probe_models(cfg, n_classes, w) for w in PROBE_WIDTHS]
        w = np.asarray(PROBE_WIDTHS, np.float64)

        def quad(values, at):  # exact for a parameter count, a quadratic in the width
            return max(float(np.polyval(np.polyfit(w, np.asarray(values, np.float64), 2), at)), 0.0)

        def line(values, at):  # activations are linear in the width (attention maps: constant)
            return float(np.polyval(np.polyfit(w[:2], np.asarray(values[:2], np.float64), 1), at))

        p_g, p_d = quad([p[0] for p in probes], cfg.g_ch), quad([p[1] for p in probes], cfg.d_ch)
        g_s, d_s = line([p[2] for p in probes], cfg.g_ch), line([p[3] for p in probes], cfg.d_ch)
        ops = [p[4] for p in probes[:2]]  # the same tensors at both probe widths: each one fitted to the asked width
        if len(ops[0]) == len(ops[1]):
            sizes = ops[0] + (ops[1] - ops[0]) / (w[1] - w[0]) * (cfg.g_ch - w[0])
        else:  # (not seen) the larger probe's, scaled with the width
            sizes = ops[1] * max(cfg.g_ch / w[1], 1.0)
    # generation under no_grad holds about one operation's inputs and output at a time (plus a residual branch): the
    # 3 largest tensors G keeps in eval mode
    gen = float(np.sort(sizes)[-3:].sum())
    # D step: D keeps its activations for 2B images (reals + fakes); G step: G's for B, D's for B; WGAN-GP runs D on B
    # interpolates with a graph of its gradient (about twice D's)
    train = max(2 * d_s, g_s + d_s) + (2 * d_s if cfg.gp_weight else 0.0)
    copies = (1 if cfg.ema else 0) + (1 if cfg.swa else 0)
    # parameters + gradients + Adam's 2 moments = 16 bytes each; EMA/SWA 4 per G parameter; the roll-back snapshot
    # holds G, D, Adam's state and the EMA again
    state = 16 * (p_g + p_d) + 4 * copies * p_g + (12 * (p_g + p_d) + 4 * copies * p_g)
    return MemoryEstimate(params=round(p_g + p_d), state=int(state), crops=int(n_crops * cfg.image_size ** 2 * 3),
                          train_per_image=ACTIVATION_OVERHEAD * train, generate_per_image=ACTIVATION_OVERHEAD * gen,
                          batch_per_rank=batch_per_rank, sample_batch=cfg.sample_batch)


# what there is


def host_available_bytes():
    """Memory this process can still take on the host: /proc/meminfo's MemAvailable, capped by a container's cgroup
    limit (v2 or v1; page cache that can be dropped is not counted as used). None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_path, usage_path, stat_path in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "/sys/fs/cgroup/memory/memory.stat")):
        try:
            with open(limit_path) as f:
                limit = int(f.read().strip())  # "max" (no limit) -> ValueError
            with open(usage_path) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        cache = 0
        try:
            with open(stat_path) as f:
                stats = dict(line.split()[:2] for line in f if len(line.split()) >= 2)
            cache = int(stats.get("inactive_file", stats.get("total_inactive_file", 0)))
        except (OSError, ValueError):
            pass
        if limit < 2 ** 60:
            found.append(max(limit - usage + cache, 0))
        break
    return min(found) if found else None


def device_available_bytes(device):
    """Free memory on a CUDA device (torch.cuda.mem_get_info), or the host's for the CPU; None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()


# the check


def check_memory(est, *, available, where, ranks=1, world=1):
    """est: MemoryEstimate of one rank; available: bytes free on `where` (a device's name; None = unknown: no check),
    shared by `ranks` ranks (CPU ranks share the host; world: all ranks, for the batch_size to suggest). -> the sample_batch to use: the estimate's, or a lower one that
    fits, with a warning (generation's batch only sets speed). A training batch, or widths, that cannot fit even so is
    a UsageError naming what to set (one line, exit 2)."""
    if available is None:
        log(f"memory: needs {est.text()}; free memory on {where} unknown, not checked")
        return est.sample_batch
    room = MEMORY_FRACTION * available / ranks  # what one rank may plan to use
    gen_room = GENERATE_FRACTION * available / ranks
    head = (f"settings need {est.text()}{f' per rank, {ranks} ranks' if ranks > 1 else ''} on {where}, which has "
            f"{available / GIB:.2f} GiB free")
    if est.peak <= room and est.generate <= gen_room:
        log(f"memory: needs {est.text()} of {available / GIB:.2f} GiB free on {where}")
        return est.sample_batch
    left = room - est.state - est.crops
    if left <= 0:
        raise UsageError(f"{head}: the models alone (g_ch, d_ch) take {(est.state + est.crops) / GIB:.2f} GiB; "
                         "lower g_ch / d_ch")
    if est.train > left:
        fits = int(left // est.train_per_image)
        what = (f"set --set batch_size={fits * world}" + (f" (or batch_per_gpu={fits})" if world > 1 else "")
                + " or lower" if fits >= 2 else "lower g_ch / d_ch")
        raise UsageError(f"{head}: a training step at {est.batch_per_rank} images per rank needs "
                         f"{est.train / GIB:.2f} GiB of activations; {what}")
    batch = int(min(left, gen_room) // est.generate_per_image)
    if batch < 1:
        raise UsageError(f"{head}: generating one image needs {est.generate_per_image / GIB:.2f} GiB; "
                         "lower g_ch / d_ch")
    batch = min(est.sample_batch - 1, batch if batch < 50 else batch // 25 * 25)
    warn(f"sample_batch={est.sample_batch} would need {est.generate / GIB:.2f} GiB to generate at once, more than "
         f"{GENERATE_FRACTION:.0%} of the {available / GIB:.2f} GiB free on {where}: generating {batch} at a time instead")
    return batch


# out of memory in training


def describe_early_oom(exc, *, step, batch_per_rank, world_size, device):
    """The one line for an out-of-memory error in the first training steps: the batch per rank, the memory seen, and
    what to set (half the batch per rank)."""
    if device.type == "cuda":
        seen = (f"peak {torch.cuda.max_memory_allocated(device) / GIB:.2f} GiB allocated of "
                f"{torch.cuda.get_device_properties(device).total_memory / GIB:.1f} GiB on {device}")
    else:
        free = host_available_bytes()
        seen = f"{free / GIB:.2f} GiB free on the host now" if free is not None else "host memory unknown"
    half = max(batch_per_rank // 2, 2)
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return (f"out of memory in training step {step} at {batch_per_rank} images per rank"
            + (f" x {world_size} ranks" if world_size > 1 else "") + f" ({seen}): set --set batch_size="
            f"{half * world_size}" + (f" (or batch_per_gpu={half})" if world_size > 1 else "")
            + f" or lower g_ch / d_ch [{type(exc).__name__}: {first}]")
