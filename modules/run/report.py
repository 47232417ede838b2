"""Run artefacts drawn with PIL only: loss curves, image grids, and the JSON report (written atomically).

The labelled sample sheets: breeds.png (one row per breed, the same latents in every row, the breed's name at the
row's start) and interpolation.png (latent interpolation within a breed; breed to breed through the shared class
embedding where G has one), as BigGAN-PyTorch's sample sheets.
"""
import contextlib
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from PIL import Image, ImageDraw, ImageFont
from torch import nn
from torchvision.utils import make_grid

from modules.recipe.sample import sampling_mode, to_uint8, truncated_z
from modules.recipe.utils import atomic_file, format_duration, warn


PLOT_SIZE = (800, 400)  # loss plot, pixels
PLOT_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
               (227, 119, 194), (127, 127, 127))


# loss curves

def _plot_axis_range(values, robust, pad):
    """(lo, hi) for an axis; robust: 0.5-99.5 percentiles so a few spikes do not flatten the curves."""
    lo, hi = (np.percentile(values, [0.5, 99.5]) if robust else (np.min(values), np.max(values)))
    lo, hi = float(lo), float(hi)
    if hi - lo < 1e-12 * max(1.0, abs(lo)):
        span = abs(lo) * 0.1 or 1.0
        return lo - span, hi + span
    return lo - pad * (hi - lo), hi + pad * (hi - lo)


def _plot_point(p):
    """(seconds, value) as two floats; anything unreadable becomes (nan, nan) and is skipped."""
    try:
        return float(p[0]), float(p[1])
    except (TypeError, ValueError, IndexError):
        return math.nan, math.nan


def plot_losses(history, path, title="losses"):
    """history: {series name: [(seconds, value), ...]} -> PNG of the curves over wall time. A non-finite point breaks
    its line; any history, even an empty one, gives a valid image."""
    w, h = PLOT_SIZE
    x0, y0, x1, y1 = 70, 16, w - 16, h - 36  # plot area
    img = Image.new("RGB", PLOT_SIZE, "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle([x0, y0, x1, y1], outline="black")
    draw.text((x0 + 4, 2), title, fill="black")
    series = {str(name): np.asarray([_plot_point(p) for p in points or ()], np.float64).reshape(-1, 2)
              for name, points in (history or {}).items()}
    finite = np.concatenate([np.zeros((0, 2))] + [p[np.isfinite(p).all(axis=1)] for p in series.values()])
    if len(finite) == 0:
        draw.text(((x0 + x1) // 2 - 40, (y0 + y1) // 2), "no finite data", fill="gray")
        return _save_report_png(img, path)
    t_lo, t_hi = _plot_axis_range(finite[:, 0], robust=False, pad=0.0)
    v_lo, v_hi = _plot_axis_range(finite[:, 1], robust=len(finite) >= 200, pad=0.05)

    def px(t, v):  # values are clipped into the plot area
        x = x0 + (t - t_lo) / (t_hi - t_lo) * (x1 - x0)
        return x, y1 - (np.clip(v, v_lo, v_hi) - v_lo) / (v_hi - v_lo) * (y1 - y0)

    for k in range(5):  # grid and tick labels
        t, v = t_lo + (t_hi - t_lo) * k / 4, v_lo + (v_hi - v_lo) * k / 4
        x, y = px(t, v)
        draw.line([(x, y0), (x, y1)], fill=(225, 225, 225))
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        label = format_duration(t) if t >= 0 else f"{t:.3g}s"
        lw = draw.textlength(label)
        draw.text((min(max(x - lw / 2, 0), w - lw - 2), y1 + 4), label, fill="black")
        draw.text((4, y - 6), f"{v:.4g}", fill="black")
    draw.text(((x0 + x1) // 2 - 30, h - 14), "wall time", fill="black")
    for i, (name, pts) in enumerate(series.items()):
        color = PLOT_COLORS[i % len(PLOT_COLORS)]
        xy = np.stack(px(pts[:, 0], pts[:, 1]), axis=1)
        for piece in np.split(xy, np.flatnonzero(~np.isfinite(pts).all(axis=1))):  # the pieces between gaps
            line = [tuple(p) for p in piece if np.isfinite(p).all()]
            if len(line) == 1:
                draw.ellipse([line[0][0] - 2, line[0][1] - 2, line[0][0] + 2, line[0][1] + 2], fill=color)
            elif line:
                draw.line(line, fill=color)
        draw.text((x1 - 130, y0 + 4 + 14 * i), name[:18], fill=color)  # the legend, top right
    return _save_report_png(img, path)


def _save_report_png(img, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return Path(path)


def image_grid(images_uint8, nrow, pad=2):
    """uint8 [N,H,W,3] -> PIL image: `nrow` images per row, `pad` white pixels around and between them."""
    assert images_uint8.dtype == np.uint8 and images_uint8.ndim == 4 and images_uint8.shape[-1] == 3, images_uint8.shape
    grid = make_grid(torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2), nrow=nrow, padding=pad,
                     pad_value=255)
    return Image.fromarray(grid.permute(1, 2, 0).numpy())


def save_grid(images_uint8, path, nrow, pad=2):
    """image_grid's picture -> PNG at path."""
    return _save_report_png(image_grid(images_uint8, nrow, pad), path)


# json report

def _jsonable(obj):
    """Plain JSON types only; non-finite floats become null, numpy and torch values lists or numbers, the rest str()."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in obj]
    return _jsonable(obj.tolist()) if hasattr(obj, "tolist") else str(obj)


def write_report(path, report):
    """Write `report` (a dict) as indented JSON with atomic_file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w", tmp=path.with_name(f"{path.name}.tmp{os.getpid()}")) as f:
        json.dump(_jsonable(report), f, indent=2, allow_nan=False)
        f.write("\n")
    return path


# the run's report


@dataclass
class RunReport:
    """report.json: filled in as the run goes (main, then finish). A part that did not happen (no resume, no
    self-check, no pictures) is left out of the file, its key too; only `zip` stays, null, when no zip was written."""

    config: dict  # the resolved Config, dataclasses.asdict
    device: str
    torch: str
    warnings: list = field(default_factory=list)  # one line per thing that went wrong but did not stop the run
    degraded: bool = False  # training crashed or diverged, or no zip could be written
    history: dict = field(default_factory=dict)  # {series: [(train seconds, value)]}, resumed runs' included
    data: dict = None  # DogData.stats
    resumed_from: dict = None  # path, step, train_seconds, plan_seconds, complete of the --resume checkpoint
    reserve: dict = None  # the measured finish parts (seconds), margin, disk_mib_s
    train: dict = None  # TrainSummary, as a dict
    zip: str = None  # the verified zip's path; None when none could be written
    metrics: dict = None  # the self-check's FID, MiFID, memorization (with Inception weights; not Kaggle's score)
    self_check: dict = None  # the self-check's pixel copy check: nearest crops, near copies, nearest.png
    samples_breeds: list = None  # the breeds in samples.png, one per row
    phases: dict = None  # wall seconds per phase
    wall_seconds: float = None
    ranks: dict = None  # several ranks: world_size, launcher (fork | torchrun), batch_per_rank
    failed_ranks: dict = None  # several ranks, after a failure: {rank: why} (killed by SIGKILL, its error)
    precision: dict = None  # amp, grad_scalers, g_steps, d_steps, skipped_g/_d and scale_g/_d (fp16 only)

    def warn(self, text):
        self.warnings.append(text)

    def to_dict(self):
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v for k, v in d.items() if v is not None or k == "zip"}

    def write(self, path):
        """report.json at path; a failure to write it is a warning: the zip is what counts."""
        try:
            write_report(path, self.to_dict())
        except Exception as exc:
            warn(f"report.json not written ({type(exc).__name__}: {exc})")


SHEET_PER_BREED = 6  # samples per breed in breeds.png
INTERP_STEPS = 8  # images per interpolation row, both ends included
INTERP_ROWS = 3  # rows of each kind in interpolation.png
SHEET_PAD = 2  # pixels around and between images (image_grid's)


def breed_label(name):
    """An annotation folder's name -> the breed as people write it: "n02106662-German_shepherd" -> "German shepherd"."""
    return re.sub(r"^n\d+-", "", name).replace("_", " ")


def shared_embedding(G):
    """G's class embedding shared by its blocks (the BigGAN G's `shared`) when it has more than one breed, else None."""
    shared = getattr(G, "shared", None)
    return shared if isinstance(shared, nn.Embedding) and shared.num_embeddings > 1 else None


def conditioned_on_breed(G):
    """Does G's output depend on the breed? (an unconditional G has no embedding of more than one class)"""
    return any(isinstance(m, nn.Embedding) and m.num_embeddings > 1 for m in G.modules())


@contextlib.contextmanager
def _embedding_replaced(G, vectors):
    """G.shared(y) answers `vectors` [N,shared_dim] instead (a forward hook), so that a forward pass can take class
    embeddings between two breeds; vectors None: unchanged."""
    if vectors is None:
        yield
        return
    handle = shared_embedding(G).register_forward_hook(lambda module, inputs, output: vectors.to(output.dtype))
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def sample_rows(sampler, z, y, *, shared=None):
    """uint8 [N,H,W,3] from the sampler's generator (its sampling mode, precision and device) at latents z [N,z_dim]
    and breeds y [N] long, in batches of sampler.batch. shared: [N,shared_dim] class embeddings to use instead of
    G.shared(y)."""
    G, device, out = sampler.model(), sampler.device, []
    with sampling_mode(G, sampler.sample_bn):
        for i in range(0, len(z), sampler.batch):
            part = slice(i, i + sampler.batch)
            with _embedding_replaced(G, None if shared is None else shared[part].to(device)), torch.autocast(
                    device.type, dtype=sampler.amp_dtype, enabled=sampler.amp_dtype is not None):
                out.append(to_uint8(G(z[part].to(device), y[part].to(device))))
    return np.concatenate(out)


def labelled_rows(images, labels, *, per_row):
    """uint8 [rows*per_row,H,W,3] -> PIL image: image_grid's rows, each row's label in black on white at its start
    (PIL's default font)."""
    grid = image_grid(images, nrow=per_row, pad=SHEET_PAD)
    font = ImageFont.load_default()
    margin = int(max(ImageDraw.Draw(grid).textlength(text, font=font) for text in labels)) + 4 * SHEET_PAD
    sheet = Image.new("RGB", (grid.width + margin, grid.height), "white")
    sheet.paste(grid, (margin, 0))
    draw, h = ImageDraw.Draw(sheet), images.shape[1]
    for row, text in enumerate(labels):
        draw.text((2 * SHEET_PAD, SHEET_PAD + row * (h + SHEET_PAD) + h // 2 - 6), text, fill="black", font=font)
    return sheet


def breeds_sheet(sampler, classes, *, seed, per_breed=SHEET_PER_BREED):
    """breeds.png: one row per breed (all of them), the same per_breed latents (seeded) in every row."""
    z = truncated_z(per_breed, sampler.z_dim, sampler.truncation, generator=torch.Generator().manual_seed(seed))
    y = torch.arange(len(classes)).repeat_interleave(per_breed)
    return labelled_rows(sample_rows(sampler, z.repeat(len(classes), 1), y), [breed_label(c) for c in classes],
                         per_row=per_breed)


def interpolation_sheet(sampler, classes, *, seed):
    """interpolation.png: INTERP_ROWS rows from one latent to another within a breed; then, where G has a shared class
    embedding, INTERP_ROWS rows from one breed to another at a fixed latent, through that embedding. Linear steps:
    a point between two truncated latents is within the truncation too."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 1, INTERP_STEPS)[:, None]  # [S,1]
    pairs = torch.randint(len(classes), (INTERP_ROWS, 2), generator=gen).tolist()  # (breed, second breed) per row
    ends = truncated_z(2 * INTERP_ROWS, sampler.z_dim, sampler.truncation, generator=gen)
    z = torch.cat([(1 - t) * ends[2 * r] + t * ends[2 * r + 1] for r in range(INTERP_ROWS)])  # [ROWS*S, z_dim]
    y = torch.as_tensor([a for a, _ in pairs]).repeat_interleave(INTERP_STEPS)
    images, labels = [sample_rows(sampler, z, y)], [breed_label(classes[a]) for a, _ in pairs]
    embedding = shared_embedding(sampler.model())
    if embedding is not None:
        emb = embedding.weight.detach().float().cpu()
        shared = torch.cat([(1 - t) * emb[a] + t * emb[b] for a, b in pairs])  # [ROWS*S, shared_dim]
        images.append(sample_rows(sampler, ends[:INTERP_ROWS].repeat_interleave(INTERP_STEPS, 0), y, shared=shared))
        labels += [f"{breed_label(classes[a])} > {breed_label(classes[b])}" for a, b in pairs]
    return labelled_rows(np.concatenate(images), labels, per_row=INTERP_STEPS)
