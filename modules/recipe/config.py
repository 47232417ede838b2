"""The one Config: every setting of a run, its defaults (= the Kaggle run), the presets, and what each setting may hold.

Presets are overrides applied left to right over the defaults (`--preset dcgan,smoke`), then `--set name=value`; the
command line (cli.py) checks every field against LIMITS and the registries before any data is read.

The two settings written in a small language of their own: durations (time_budget: `8h45m`) and fault lists (fault:
`nan@12,slow@0.5`, tests only). Their parsers raise UsageError, so a bad one stops the run in one line.
"""
import dataclasses
import math
import re
from dataclasses import dataclass


@dataclass
class Config:
    # run
    preset: str = "kaggle"  # comma-separated names from PRESETS, applied left to right
    data_dir: str = ""  # "" = find Kaggle's input automatically
    out: str = ""  # "" = /kaggle/working if it exists, else ./output
    time_budget: str = "8h45m"  # wall time of the whole process; Kaggle kills at 9h (15 min for start-up, upload)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpus: str = "auto"  # auto (every visible GPU, one process each) | N; with --device cpu, N gloo processes
    demo: bool = False  # make a synthetic dataset in a temp dir and run on it
    resume: str = ""  # path of a checkpoint.pt to continue from
    evaluate: str = ""  # path of a zip or PNG folder: score it and exit
    generate: str = ""  # path of a checkpoint.pt: sample its generator (no training): images.zip, breeds.png, ...
    sweep: str = ""  # with generate: truncation=V1,V2,... (or sample_bn=...) sampled, scored with Inception weights
    # data
    image_size: int = 64  # pixels; the competition wants 64
    crop_margin: float = 0.1  # fraction of the box's longer side added around it (box, padded, top; not square)
    crop_styles: str = "square"  # comma-separated: square (2nd place), box, padded, top, whole
    include_whole: bool = False  # also train on the centre square of every whole image (3rd place: crops + originals)
    min_aspect: float = 0.0  # drop boxes with w/h below this (1st place: 0.2)
    max_aspect: float = 0.0  # drop boxes with w/h above this (1st place: 4.0); 0 = no upper limit
    hflip: bool = True  # random horizontal flip of reals
    real_noise: float = 1 / 128  # reals get + U(0, real_noise) (in [-1,1] units) before D; 0 = off
    data_workers: int = 2  # decoding threads/processes
    threads: int = 0  # torch CPU threads; 0 = auto (GPU: 1; CPU: OMP_NUM_THREADS, else the faster of 1 and all but one)
    data_limit: int = 0  # use at most this many images (0 = all); for quick experiments
    # model
    arch: str = "biggan"  # models.ARCHS: biggan | dcgan | dcgan5
    z_dim: int = 120  # latent size (biggan: split into 5 chunks)
    g_ch: int = 32  # G width multiplier
    d_ch: int = 32  # D width multiplier
    shared_dim: int = 32  # biggan: shared class-embedding size
    conditional: bool = True  # condition G and D on the breed
    attention: bool = True  # self-attention at 32x32 in G and D (biggan)
    spectral: bool = True  # spectral norm on G's and D's convs/linears (biggan)
    aux_weight: float = 0.1  # auxiliary classifier loss weight in D and G; 0 = no aux head
    upsample: str = "transpose"  # dcgan G: transpose | nearest | bilinear (resize + conv: no checkerboard)
    split_bn: bool = False  # dcgan D: BatchNorm statistics computed separately for the real and fake halves
    # loss
    loss: str = "rals"  # losses.LOSSES: rals | bce | hinge | lsgan
    real_label: float = 1.0  # target for reals in bce (one-sided label smoothing: 0.9)
    margin: float = 0.0  # D's real loss is zero for samples whose real logit exceeds this; 0 = off
    fresh_real_logits: bool = True  # rals: G's step recomputes D's real logits (False: reuse D's, ~1.25x faster on CPU)
    # optimisation
    batch_size: int = 64  # images per step over all ranks (split over the GPUs: 64 on 2 GPUs = 32 each)
    batch_per_gpu: int = 0  # > 0: this many per rank instead of splitting batch_size; 0 = off
    lr_g: float = 2e-4
    lr_d: float = 8e-4  # the 2nd place's slide deck; both public copies of their code use 4e-4 (batch 64, 50k steps)
    beta1: float = 0.0
    beta2: float = 0.999
    d_steps: int = 1  # D steps per G step
    max_steps: int = 50000  # stop after this many G steps (the 2nd place's); 0 = at the training window's end
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
    sample_batch: int = 500  # images generated at once (~10 MB each at full width, fp32); lowered where it does not fit
    amp: str = "auto"  # auto (CUDA: fp16 + GradScalers, bf16 from sm_80; CPU: off) | off | fp16 | bf16 (on any device)
    diffaug: str = ""  # DiffAugment on D's inputs, comma-separated: color, translation, cutout; "" = off
    # the 2nd place's discriminator, resize filter and sampling statistics (the other presets: NOT_2ND_PLACE)
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
    feature_weights: str = ""  # Inception weights file (torchvision or pytorch-fid); "" = the hub cache's, else no FID
    self_check: bool = True  # memorization self-check and nearest.png, after the zip is safe (time allowing)
    # development and testing
    dev_counts: bool = False  # allow n_images other than 10,000 (such a zip cannot be submitted)
    fault: str = ""  # fault injection for tests, comma-separated (parse_faults): nan@STEP, slow@SECONDS, ...


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
}


# What each field may hold, checked by cli.py before any data is read (a bad value: one line, exit 2). Not here: bool
# fields (their type says it), the fields naming a registry (arch: models.ARCHS, loss: losses.LOSSES, ...: cli.py
# checks them against the registry itself), and time_budget and fault (parse_duration,
# parse_faults below).

@dataclass(frozen=True)
class Range:
    """A finite number in [lo, hi] ((lo, hi] with above=True); `off`: one more value allowed, meaning "off"."""
    lo: float
    hi: float
    above: bool = False
    off: float | None = None


@dataclass(frozen=True)
class Choice:
    """One of `names` (many=True: a comma-separated list of them; empty=True: "" too)."""
    names: tuple
    many: bool = False
    empty: bool = False


@dataclass(frozen=True)
class Match:
    """Text matching the regular expression `regex` whole; `text` says what that is in an error message."""
    regex: str
    text: str


@dataclass(frozen=True)
class Text:
    """Any text on one line (no NUL, CR or LF): a path; `text` names it in an error message."""
    text: str


LIMITS = {
    # run
    "data_dir": Text("a folder path"), "out": Text("a folder path"),
    "seed": Range(0, 2**32 - 1), "device": Match(r"auto|cpu|cuda|cuda:\d+", "auto, cpu, cuda or cuda:N"),
    "gpus": Match(r"auto|[1-9]\d{0,3}", "auto or a whole number of ranks from 1"),
    "resume": Text("a checkpoint.pt path"), "evaluate": Text("a zip or folder path"),
    "generate": Text("a checkpoint.pt path"), "sweep": Text("NAME=V1,V2,... (each value checked as NAME's)"),
    # data
    "image_size": Range(64, 64), "crop_margin": Range(0, 1), "min_aspect": Range(0, 100), "max_aspect": Range(0, 100),
    "real_noise": Range(0, 1), "data_workers": Range(1, 256), "threads": Range(0, 1024),
    "data_limit": Range(0, 10**7),
    # model
    "z_dim": Range(1, 4096), "g_ch": Range(1, 1024), "d_ch": Range(1, 1024), "shared_dim": Range(1, 1024),
    "aux_weight": Range(0, 100),
    "upsample": Choice(("transpose", "nearest", "bilinear")),
    # loss
    "real_label": Range(0, 1, above=True), "margin": Range(0, 100),
    # optimisation
    "batch_size": Range(2, 8192),  # BatchNorm needs 2 samples
    "batch_per_gpu": Range(2, 8192, off=0), "lr_g": Range(0, 1, above=True), "lr_d": Range(0, 1, above=True),
    "beta1": Range(0, 0.9999), "beta2": Range(0, 0.9999), "d_steps": Range(1, 100), "max_steps": Range(0, 10**9),
    # averaging
    "ema_decay": Range(0, 1, above=True), "ema_ref_batch": Range(1, 8192), "ema_start": Range(0, 10**9),
    "swa_every": Range(1, 10**6),
    # sampling
    "n_images": Range(1, 100000), "truncation": Range(0.05, 10, off=0), "sample_batch": Range(1, 2000),
    "amp": Choice(("auto", "off", "fp16", "bf16")),
    # upkeep and robustness
    "tick_s": Range(0, 86400, above=True), "check_every": Range(1, 10**6), "snapshot_every": Range(1, 10**9),
    "max_rollbacks": Range(0, 1000), "rollback_lr_factor": Range(0, 1, above=True), "checkpoint_s": Range(0, 86400),
    "reserve_margin_s": Range(0, 86400),
    # evaluation
    "feature_weights": Text("a weights file path"),
}


class UsageError(Exception):
    """A problem the user can fix (bad flag, no data, unusable GPU). main() prints it as one line and exits 2."""


_BOOL_WORDS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def _convert_value(name, raw, default):
    """Parse a --set string into the type of the field's default."""
    try:
        return _BOOL_WORDS[raw.lower()] if isinstance(default, bool) else type(default)(raw)
    except (KeyError, ValueError):
        raise UsageError(f"--set {name}={raw}: expected a {type(default).__name__}") from None


def apply_overrides(cfg, overrides, source):
    """Return a copy of cfg with overrides (name -> value, strings are parsed) applied; unknown names are an error."""
    values = dataclasses.asdict(cfg)
    for name, value in overrides.items():
        if name not in values:
            raise UsageError(f"{source}: unknown config field {name!r} (see --print-config for the list)")
        values[name] = _convert_value(name, value, values[name]) if isinstance(value, str) else value
    return Config(**values)


MAX_DURATION_S = 7 * 86400.0  # a time budget beyond a week is a typo (100h, 1e300), not a plan
_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text):
    """'9h', '90m', '600s', '8h30m', '1h2m3s' or plain seconds ('3600', '12.5') -> seconds."""
    s = str(text).strip().lower().replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        m = _DURATION_RE.match(s)
        if m is None or not any(m.groups()):
            raise UsageError(f"cannot read duration {text!r}: use e.g. 9h, 90m, 600s, 8h30m or plain seconds") from None
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + se
    if not 0 < value < math.inf:  # also refuses nan
        raise UsageError(f"duration {text!r} must be a positive, finite number of seconds")
    if value > MAX_DURATION_S:
        raise UsageError(f"duration {text!r} is more than a week ({MAX_DURATION_S / 3600:.0f}h), the most a run may "
                         "ask for; Kaggle sessions end after 9h")
    return value


FAULT_RE = re.compile(r"(nan|raise|kill|oom)@\d+|slow@\d+(\.\d*)?|slowgen@\d+(\.\d*)?|zipfail")


def parse_faults(text):
    """Config.fault ('nan@12,slow@0.5') -> {kind: number} (-1.0 for zipfail). kill@STEP: rank 1 of several dies by
    SIGKILL; slow@SECONDS: sleep per training step; slowgen@SECONDS: per generation batch once training started."""
    faults = {}
    for item in filter(None, (f.strip() for f in str(text).split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={text}: {item!r} is not nan@STEP, raise@STEP, oom@STEP, kill@STEP, "
                             "slow@SECONDS, slowgen@SECONDS or zipfail")
        kind, _, at = item.partition("@")
        faults[kind] = float(at) if at else -1.0
    return faults
