"""The one Config: every setting of a run, its defaults (= the Kaggle run), presets and command-line parsing.

Presets are named sets of overrides applied left to right over the defaults: `--preset pggan,smoke` is the PGGAN recipe at
smoke-test widths. Any field can be set from the command line with `--set name=value` (repeatable).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass


@dataclass
class Config:
    # run
    preset: str = "kaggle"  # comma-separated names from PRESETS, applied left to right
    data_dir: str = ""  # "" = find Kaggle's input automatically
    out: str = ""  # "" = /kaggle/working if it exists, else ./output
    time_budget: str = "8h45m"  # wall time for the whole process; Kaggle kills at 9h, 15 min left for start-up and upload
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpus: str = "auto"  # auto (every visible GPU, one process each) | N; with --device cpu, N gloo processes
    demo: bool = False  # make a synthetic dataset in a temp dir and run on it
    resume: str = ""  # path of a checkpoint.pt to continue from
    evaluate: str = ""  # path of a zip or PNG folder: score it and exit
    # data
    image_size: int = 64  # pixels; the competition wants 64
    crop_margin: float = 0.1  # fraction of the box's longer side added around it (box, padded, top; not square)
    crop_styles: str = "square"  # comma-separated from data.CROP_STYLES: square (2nd place), box, tight, padded, top, whole
    include_whole: bool = False  # also train on the centre square of every whole image (3rd place: crops + originals)
    min_aspect: float = 0.0  # drop boxes with w/h below this (1st place: 0.2)
    max_aspect: float = 0.0  # drop boxes with w/h above this (1st place: 4.0); 0 = no upper limit
    hflip: bool = True  # random horizontal flip of reals
    real_noise: float = 1 / 128  # reals get + U(0, real_noise) (in [-1,1] units) before D; 0 = off
    instance_noise: float = 0.0  # std of Gaussian noise on D's inputs (real and fake) at the start, decays linearly to 0
    data_workers: int = 2  # decoding threads/processes
    threads: int = 0  # torch CPU threads; 0 = auto (GPU run: 1; CPU run: 1 on <= 2 cores, else all but one)
    data_limit: int = 0  # use at most this many images (0 = all); for quick experiments
    # model
    arch: str = "biggan"  # models.ARCHS: biggan | dcgan | dcgan5 | pggan
    z_dim: int = 120  # latent size (biggan: split into 5 chunks)
    g_ch: int = 32  # G width multiplier
    d_ch: int = 32  # D width multiplier
    shared_dim: int = 32  # biggan: shared class-embedding size
    conditional: bool = True  # condition G and D on the breed
    attention: bool = True  # self-attention at 32x32 in G and D (biggan)
    spectral: bool = True  # spectral norm on G's and D's convs/linears (biggan)
    aux_weight: float = 0.1  # auxiliary classifier loss weight in D and G; 0 = no aux head
    mbstd_group: int = 0  # minibatch-stddev group size in D; 0 = off
    upsample: str = "transpose"  # dcgan G: transpose | nearest | bilinear (the tips: resize + conv avoids checkerboards)
    split_bn: bool = False  # dcgan D: BatchNorm statistics computed separately for the real and fake halves
    # loss
    loss: str = "rals"  # losses.LOSSES: rals | bce | hinge | lsgan | wgan
    real_label: float = 1.0  # target for reals in bce (one-sided label smoothing: 0.9)
    margin: float = 0.0  # D's real loss is zero for samples whose real logit exceeds this; 0 = off
    gp_weight: float = 0.0  # gradient penalty weight on interpolates (WGAN-GP: 10); 0 = off
    fresh_real_logits: bool = True  # rals: G's step recomputes D's real logits with the updated D (as RaLS is written;
    # False reuses the D step's, from before its update: ~1.25x cheaper per step on CPU, unproven for quality)
    # optimisation
    batch_size: int = 64  # images per step over all ranks (split over the GPUs: 64 on 2 GPUs = 32 each)
    batch_per_gpu: int = 0  # > 0: this many per rank instead (global batch = batch_per_gpu x ranks); 0 = split batch_size
    lr_g: float = 2e-4
    lr_d: float = 8e-4  # the 2nd place's slide deck; both public copies of their code use 4e-4 (batch 64, 50k steps)
    beta1: float = 0.0
    beta2: float = 0.999
    d_steps: int = 1  # D steps per G step
    max_steps: int = 50000  # stop after this many G steps (0 = at the training window's end); 50,000 = the 2nd place's horizon
    lr_schedule: str = "constant"  # constant | cosine | linear, over the training time the watchdog allows
    lr_final: float = 0.0  # fraction of the learning rate left at the end of a decaying schedule
    # averaging
    ema: bool = True  # ship an exponential moving average of G's weights
    ema_decay: float = 0.999  # per step at batch ema_ref_batch; rescaled for other batch sizes (half-life in images)
    ema_ref_batch: int = 64
    ema_start: int = 1000  # steps before the EMA starts averaging (it copies G until then)
    swa: bool = False  # ship the plain average of G's weights over the second half of training instead
    swa_every: int = 50  # steps between SWA updates
    # sampling
    n_images: int = 10000  # images in the zip: the competition takes exactly 10,000 (others need dev_counts)
    truncation: float = 2.0  # resample |z| entries above this; 0 = no truncation
    sample_batch: int = 500
    amp: str = "auto"  # auto (CUDA: fp16 + GradScalers, bf16 from sm_80; CPU: off) | off | fp16 | bf16 (on any device; issue 18)
    compile: str = "off"  # off | auto | on: torch.compile G and D (auto: CUDA sm_70+ with Triton, never the P100)
    diffaug: str = ""  # DiffAugment on D's inputs, comma-separated: color, translation, cutout ("" = off; not in the 2019 recipes)
    # progressive growing (arch pggan)
    pg_fade: float = 0.5  # fraction of each new level's time spent fading it in
    # issue 17: the 2nd place's discriminator, resize filter and sampling statistics
    d_arch: str = "2nd-place"  # biggan D table, biggan.BIGGAN_D_ARCHS: 2nd-place (4 blocks) | biggan-pytorch (5 blocks)
    crop_filter: str = "box"  # resize of the crops: box (area averaging, the 2nd place's INTER_AREA) | lanczos
    sample_bn: str = "batch"  # G's BN statistics when sampling (sample.py): batch (2nd place) | running | standing
    # upkeep and robustness
    tick_s: float = 180.0  # seconds between progress lines
    check_every: int = 50  # steps between host syncs (finite check, step timing)
    snapshot_every: int = 500  # steps between in-memory snapshots used to roll back a divergence
    max_rollbacks: int = 3  # after this many roll-backs training stops and the run ships what it has
    rollback_lr_factor: float = 0.5
    checkpoint_s: float = 1200.0  # seconds between checkpoints in <out>; 0 = only at the end
    reserve_margin_s: float = 60.0  # added to the measured time of sampling + zip + self-check
    # evaluation
    feature_weights: str = ""  # Inception weights file (torchvision or pytorch-fid); "" = hub cache or proxy network
    self_check: bool = True  # memorization self-check and nearest.png, after the zip is safe (time allowing)
    # development and testing
    dev_counts: bool = False  # allow n_images other than 10,000 (such a zip cannot be submitted)
    fault: str = ""  # fault injection for tests: nan@STEP | raise@STEP | oom@STEP | kill@STEP | slow@SECONDS | slowgen@SECONDS | zipfail, comma-separated


# the other recipes keep their crops, filter, sampling statistics and run length: these defaults are the 2nd place's own
NOT_2ND_PLACE = dict(crop_styles="box", crop_filter="lanczos", sample_bn="running", max_steps=0)

# Preset name -> overrides of the defaults above. The defaults are the "kaggle" preset (2nd place, BigGAN-style + RaLS).
PRESETS = {
    "kaggle": {},
    "smoke": dict(  # tiny widths: data, training, 10,000 images and the zip fit 120 s on 2 CPU cores
        z_dim=20, g_ch=2, d_ch=4, shared_dim=8, batch_size=16, ema_start=20, sample_batch=25, tick_s=15.0,
        check_every=10, snapshot_every=50, checkpoint_s=0.0, reserve_margin_s=5.0, data_limit=0, time_budget="120s",
    ),
    "dcgan": dict(  # the DCGAN paper's baseline: unconditional, BCE, Adam 2e-4 / (0.5, 0.999)
        NOT_2ND_PLACE,
        arch="dcgan", z_dim=128, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", lr_g=2e-4, lr_d=2e-4, beta1=0.5, real_noise=0.0, truncation=0.0, ema=False, hflip=True,
    ),
    "dcgan5": dict(  # the DCGAN article's network: 5x5 stride-2 transposed convs in G, 3x3 stride-2 convs in D
        NOT_2ND_PLACE,
        arch="dcgan5", z_dim=100, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", lr_g=1e-4, lr_d=1e-4, beta1=0.5, real_noise=0.0, truncation=0.0, ema=False,
    ),
    "dcgan-tricks": dict(  # the 1st-public team's DCGAN: head-keeping crops, split BN, margin, SWA, wider G
        NOT_2ND_PLACE,
        arch="dcgan", z_dim=128, g_ch=96, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", real_label=0.9, margin=2.0, lr_g=2e-4, lr_d=2e-4, beta1=0.5, real_noise=0.0, upsample="nearest",
        split_bn=True, crop_styles="box,padded,top,whole", min_aspect=0.2, max_aspect=4.0, ema=False, swa=True,
        truncation=0.8,
    ),
    "pggan": dict(  # Karras et al.: progressive growing, equalized LR, pixelnorm, minibatch stddev, WGAN-GP
        NOT_2ND_PLACE,
        arch="pggan", z_dim=128, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        mbstd_group=4, loss="wgan", gp_weight=10.0, lr_g=1e-3, lr_d=1e-3, beta1=0.0, beta2=0.99, real_noise=0.0,
        truncation=0.0, ema=True, ema_start=0,
    ),
}


class UsageError(Exception):
    """A problem the user can fix (bad flag, no data, unusable GPU). main() prints it as one line and exits 2."""


MAX_DURATION_S = 7 * 86400.0  # issue 19: a time budget beyond a week is a typo (100h, 1e300), not a plan
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text):
    """'9h', '90m', '600s', '8h30m', '1h2m3s' or plain seconds ('3600', '12.5') -> seconds (float > 0)."""
    s = str(text).strip().lower().replace(" ", "")
    if s.startswith("-"):
        raise UsageError(f"duration {text!r} must be positive")
    try:
        value = float(s)
        if not math.isfinite(value):
            raise UsageError(f"duration {text!r} must be a finite number of seconds")
    except ValueError:
        m = _DURATION_RE.match(s)
        if not s or m is None or not any(m.groups()):
            raise UsageError(f"cannot read duration {text!r}: use e.g. 9h, 90m, 600s, 8h30m or plain seconds") from None
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + se
    if value <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    if value > MAX_DURATION_S:
        raise UsageError(f"duration {text!r} is more than a week ({MAX_DURATION_S / 3600:.0f}h), the most a run may "
                         "ask for; Kaggle sessions end after 9h")
    return value


FAULT_RE = re.compile(r"(nan|raise|kill|oom)@\d+|slow@\d+(\.\d*)?|slowgen@\d+(\.\d*)?|zipfail")  # Config.fault items (tests)


def parse_faults(text):
    """Config.fault ('nan@12,slow@0.5', comma-separated; tests only) -> {kind: number} (-1.0 for a kind without one).
    nan@STEP, raise@STEP: at that step; oom@STEP: a CUDA out-of-memory error at that step; kill@STEP: rank 1 of several dies by SIGKILL then; slow@SECONDS: sleep per training step; slowgen@SECONDS: sleep per generation
    batch once training has started (a finish slower than at start); zipfail: a corrupt zip. Else a UsageError."""
    faults = {}
    for item in filter(None, (f.strip() for f in str(text).split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={text}: {item!r} is not nan@STEP, raise@STEP, oom@STEP, kill@STEP, slow@SECONDS, "
                             "slowgen@SECONDS or zipfail")
        kind, _, at = item.partition("@")
        faults[kind] = float(at) if at else -1.0
    return faults


# allowed values: one entry per Config field, checked by check_config() when the settings are parsed, before any data
# is read (a bad value: one line naming the field, the value and what is allowed; exit 2). Choices naming registries in
# other files (models.ARCHS, losses.LOSSES, data.CROP_STYLES, augment.AUGMENTS) are spelled out so that config.py needs
# nothing of ours; tests/test_config.py checks that they match.


class Allowed:
    """What one field may hold: `ok(value) -> bool`, `text` says it in an error message, `choices` for named options."""

    def __init__(self, text, ok, choices=()):
        self.text, self.ok, self.choices = text, ok, tuple(choices)


def _number(lo, hi, *, integer=False, above=False, off=None):
    """A finite number in [lo, hi] ((lo, hi] with above=True); `off`: one more value allowed, meaning "off"."""
    kind, show = ("an integer", str) if integer else ("a number", "{:g}".format)
    text = f"{kind} {'>' if above else 'from'} {show(lo)}{' and <=' if above else ' to'} {show(hi)}"
    types = (int,) if integer else (int, float)

    def ok(v):
        if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            return False
        return v == off or (lo < v <= hi if above else lo <= v <= hi)
    return Allowed(text + (f", or {show(off)} (off)" if off is not None else ""), ok)


def _flag():
    return Allowed("true or false", lambda v: isinstance(v, bool))


def _one_of(*choices):
    return Allowed("one of " + ", ".join(choices), lambda v: v in choices, choices)


def _some_of(*choices, empty=False):
    def ok(v):
        items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else [None]
        return (bool(items) or empty) and all(x in choices for x in items)
    return Allowed("comma-separated from " + ", ".join(choices) + (' (or "" for none)' if empty else ""), ok, choices)


def _text(what):
    return Allowed(what, lambda v: isinstance(v, str) and not any(c in v for c in "\0\n\r"))


def _matching(regex, what):
    return Allowed(what, lambda v: isinstance(v, str) and re.fullmatch(regex, v) is not None)


def _duration():
    def ok(v):
        try:
            return isinstance(v, str) and parse_duration(v) > 0
        except UsageError:
            return False
    return Allowed("a positive duration up to a week (168h): 9h, 90m, 600s, 8h30m or seconds", ok)


def _items_matching(regex, what):
    def ok(v):
        return isinstance(v, str) and all(re.fullmatch(regex, x.strip()) for x in v.split(",") if x.strip())
    return Allowed(what, ok)


ALLOWED = {
    # run
    "preset": Allowed("comma-separated from " + ", ".join(PRESETS),
                      lambda v: isinstance(v, str) and all(n.strip() in PRESETS for n in v.split(",")), PRESETS),
    "data_dir": _text("a folder path"), "out": _text("a folder path"), "time_budget": _duration(),
    "seed": _number(0, 2**32 - 1, integer=True), "device": _matching(r"auto|cpu|cuda|cuda:\d+", "auto, cpu, cuda or cuda:N"),
    "gpus": _matching(r"auto|[1-9]\d{0,3}", "auto or a whole number of ranks from 1"),
    "demo": _flag(), "resume": _text("a checkpoint.pt path"), "evaluate": _text("a zip or folder path"),
    # data
    "image_size": _number(64, 64, integer=True), "crop_margin": _number(0, 1),
    "crop_styles": _some_of("square", "box", "tight", "padded", "top", "whole"), "include_whole": _flag(),
    "min_aspect": _number(0, 100), "max_aspect": _number(0, 100), "hflip": _flag(), "real_noise": _number(0, 1),
    "instance_noise": _number(0, 10), "data_workers": _number(1, 256, integer=True),
    "threads": _number(0, 1024, integer=True),
    "data_limit": _number(0, 10**7, integer=True),
    # model
    "arch": _one_of("biggan", "dcgan", "dcgan5", "pggan"), "z_dim": _number(1, 4096, integer=True),
    "g_ch": _number(1, 1024, integer=True), "d_ch": _number(1, 1024, integer=True),
    "shared_dim": _number(1, 1024, integer=True), "conditional": _flag(), "attention": _flag(), "spectral": _flag(),
    "aux_weight": _number(0, 100), "mbstd_group": _number(0, 1024, integer=True),
    "upsample": _one_of("transpose", "nearest", "bilinear"), "split_bn": _flag(),
    # loss
    "loss": _one_of("rals", "bce", "hinge", "lsgan", "wgan"), "real_label": _number(0, 1, above=True),
    "margin": _number(0, 100), "gp_weight": _number(0, 1000), "fresh_real_logits": _flag(),
    # optimisation
    "batch_size": _number(2, 8192, integer=True),  # BatchNorm needs 2 samples
    "batch_per_gpu": _number(2, 8192, integer=True, off=0),
    "lr_g": _number(0, 1, above=True), "lr_d": _number(0, 1, above=True), "beta1": _number(0, 0.9999),
    "beta2": _number(0, 0.9999), "d_steps": _number(1, 100, integer=True), "max_steps": _number(0, 10**9, integer=True),
    "lr_schedule": _one_of("constant", "cosine", "linear"), "lr_final": _number(0, 1),
    # averaging
    "ema": _flag(), "ema_decay": _number(0, 1, above=True), "ema_ref_batch": _number(1, 8192, integer=True),
    "ema_start": _number(0, 10**9, integer=True), "swa": _flag(), "swa_every": _number(1, 10**6, integer=True),
    # sampling
    "n_images": _number(1, 100000, integer=True), "truncation": _number(0.05, 10, off=0),
    "sample_batch": _number(1, 10000, integer=True), "amp": _one_of("auto", "off", "fp16", "bf16"), "compile": _one_of("off", "auto", "on"),
    "diffaug": _some_of("color", "translation", "cutout", empty=True), "pg_fade": _number(0, 1),
    # issue 17
    "d_arch": _one_of("2nd-place", "biggan-pytorch"), "crop_filter": _one_of("box", "lanczos"),
    "sample_bn": _one_of("batch", "running", "standing"),
    # upkeep and robustness
    "tick_s": _number(0, 86400, above=True), "check_every": _number(1, 10**6, integer=True),
    "snapshot_every": _number(1, 10**9, integer=True), "max_rollbacks": _number(0, 1000, integer=True),
    "rollback_lr_factor": _number(0, 1, above=True), "checkpoint_s": _number(0, 86400),
    "reserve_margin_s": _number(0, 86400),
    # evaluation
    "feature_weights": _text("a weights file path"), "self_check": _flag(),
    # development and testing
    "dev_counts": _flag(), "fault": _items_matching(FAULT_RE.pattern, "comma-separated nan@STEP, raise@STEP, oom@STEP, kill@STEP, "
                                                                      "slow@SECONDS, slowgen@SECONDS, zipfail"),
}


def check_config(cfg):
    """Every field against ALLOWED, then the rules between fields; the first problem -> UsageError (one line)."""
    for field in dataclasses.fields(cfg):
        value, allowed = getattr(cfg, field.name), ALLOWED[field.name]
        if not allowed.ok(value):
            raise UsageError(f"setting {field.name}={value!r} is not allowed: {allowed.text}")
    if cfg.n_images != 10000 and not cfg.dev_counts:
        raise UsageError(f"setting n_images={cfg.n_images} is not allowed: the competition takes exactly 10000 images "
                         f"(for a development run, also --set dev_counts=true)")
    if cfg.max_aspect and cfg.max_aspect < cfg.min_aspect:
        raise UsageError(f"setting max_aspect={cfg.max_aspect} is not allowed: 0 (no limit) or >= min_aspect "
                         f"({cfg.min_aspect})")


def _convert_value(name, raw, default):
    """Parse a --set string into the type of the field's default."""
    try:
        if isinstance(default, bool):
            low = str(raw).lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        return str(raw)
    except ValueError:
        raise UsageError(f"--set {name}={raw}: expected a {type(default).__name__}") from None


def apply_overrides(cfg, overrides, source):
    """Return a copy of cfg with overrides (name -> value, strings are parsed) applied; unknown names are an error."""
    values = dataclasses.asdict(cfg)
    for name, value in overrides.items():
        if name not in values:
            raise UsageError(f"{source}: unknown config field {name!r} (see --print-config for the list)")
        values[name] = _convert_value(name, value, values[name]) if isinstance(value, str) else value
    return Config(**values)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 through main(), not argparse's usage block
        raise UsageError(f"{message} (see --help)")


def _dash_values(parser, argv):
    """`--time-budget -5m` -> `--time-budget=-5m`: argparse would not take a value that starts with '-' (and would
    print its usage block); the value is then checked like any other."""
    takes_value = {opt for action in parser._actions if action.nargs is None for opt in action.option_strings}
    out = []
    for item in argv:
        if out and out[-1] in takes_value and item.startswith("-") and item not in parser._option_string_actions:
            out[-1] = f"{out[-1]}={item}"
        else:
            out.append(item)
    return out


def build_parser():
    p = _Parser(
        prog="kernel.py", description="Generative Dog Images: train a GAN and write images.zip (10,000 64x64 PNGs).")
    p.add_argument("--data-dir", help="folder holding all-dogs/ and Annotation/ (default: Kaggle's input), or a folder of images")
    p.add_argument("--out", help="output folder (default: /kaggle/working if it exists, else ./output)")
    p.add_argument("--time-budget", help="wall time for the whole run: 9h, 90m, 600s, 8h30m or seconds (default 8h45m)")
    p.add_argument("--preset", help=f"comma-separated presets applied in order: {', '.join(PRESETS)} (default kaggle)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpus", help="auto (every visible GPU, default) | N ranks; 1 = one process; with --device cpu: N "
                   "CPU processes (gloo)")
    p.add_argument("--demo", action="store_true", help="run on a small synthetic dataset made in a temp dir")
    p.add_argument("--resume", help="continue from this checkpoint.pt with the remaining budget")
    p.add_argument("--evaluate", help="score a zip or PNG folder against the training data, print JSON and exit")
    p.add_argument("--feature-weights", help="Inception-v3 weights file (torchvision's or pytorch-fid's) for FID")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override any config field")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    return p


def parse_config(argv=None):
    """argv -> (Config, print_config flag). Unknown arguments (Jupyter's `-f kernel.json`) are ignored."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, _unknown = parser.parse_known_args(_dash_values(parser, argv))
    cfg = Config()
    preset = args.preset or cfg.preset
    for name in [n.strip() for n in preset.split(",") if n.strip()]:
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[name], f"preset {name}")
    cfg = dataclasses.replace(cfg, preset=preset)
    flags = {"data_dir": args.data_dir, "out": args.out, "time_budget": args.time_budget, "seed": args.seed,
             "device": args.device, "gpus": args.gpus, "resume": args.resume, "evaluate": args.evaluate,
             "feature_weights": args.feature_weights}
    cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if v is not None}, "command line")
    if args.demo:
        cfg = dataclasses.replace(cfg, demo=True)
    sets = {}
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        sets[name.strip()] = value.strip()
    cfg = apply_overrides(cfg, sets, "--set")
    check_config(cfg)  # every field against ALLOWED, before anything is read or written
    return cfg, args.print_config


def resolve_out_dir(out):
    if out:
        return out
    return "/kaggle/working" if os.path.isdir("/kaggle/working") else "output"


def config_to_json(cfg):
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
