"""The one Config: every setting of a run, its defaults (= the Kaggle run), presets and command-line parsing.

Presets are named sets of overrides applied left to right over the defaults: `--preset pggan,smoke` is the PGGAN recipe at
smoke-test widths. Any field can be set from the command line with `--set name=value` (repeatable).
"""
import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass

from modules.utils import UsageError, parse_duration


@dataclass
class Config:
    # run
    preset: str = "kaggle"  # comma-separated names from PRESETS, applied left to right
    data_dir: str = ""  # "" = find Kaggle's input automatically
    out: str = ""  # "" = /kaggle/working if it exists, else ./output
    time_budget: str = "8h45m"  # wall time for the whole process; Kaggle kills at 9h, 15 min left for start-up and upload
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    demo: bool = False  # make a synthetic dataset in a temp dir and run on it
    resume: str = ""  # path of a checkpoint.pt to continue from
    evaluate: str = ""  # path of a zip or PNG folder: score it and exit
    # data
    image_size: int = 64  # pixels; the competition wants 64
    crop_margin: float = 0.1  # fraction of the box's longer side added around it
    crop_styles: str = "box"  # comma-separated from data.CROP_STYLES: box, tight, padded, top, whole
    include_whole: bool = False  # also train on the centre square of every whole image (3rd place: crops + originals)
    min_aspect: float = 0.0  # drop boxes with w/h below this (1st place: 0.2)
    max_aspect: float = 0.0  # drop boxes with w/h above this (1st place: 4.0); 0 = no upper limit
    hflip: bool = True  # random horizontal flip of reals
    real_noise: float = 1 / 128  # reals get + U(0, real_noise) (in [-1,1] units) before D; 0 = off
    instance_noise: float = 0.0  # std of Gaussian noise on D's inputs (real and fake) at the start, decays linearly to 0
    data_workers: int = 2  # decoding threads/processes
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
    batch_size: int = 64
    lr_g: float = 2e-4
    lr_d: float = 8e-4
    beta1: float = 0.0
    beta2: float = 0.999
    d_steps: int = 1  # D steps per G step
    max_steps: int = 0  # stop training after this many G steps (0 = train until the budget's training window closes)
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
    n_images: int = 10000  # images in the zip
    truncation: float = 2.0  # resample |z| entries above this; 0 = no truncation
    sample_batch: int = 500
    amp: str = "auto"  # auto (fp16 on CUDA, bf16 where supported) | off
    compile: str = "off"  # off | auto | on: torch.compile G and D (auto: CUDA sm_70+ with Triton, never the P100)
    diffaug: str = ""  # DiffAugment on D's inputs, comma-separated: color, translation, cutout ("" = off; not in the 2019 recipes)
    # progressive growing (arch pggan)
    pg_fade: float = 0.5  # fraction of each new level's time spent fading it in
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
    # testing
    fault: str = ""  # fault injection for tests: nan@STEP | raise@STEP | slow@SECONDS


# Preset name -> overrides of the defaults above. The defaults are the "kaggle" preset (2nd place, BigGAN-style + RaLS).
PRESETS = {
    "kaggle": {},
    "smoke": dict(  # tiny widths: data, training, 10,000 images and the zip fit 120 s on 2 CPU cores
        z_dim=20, g_ch=2, d_ch=4, shared_dim=8, batch_size=16, ema_start=20, sample_batch=25, tick_s=15.0,
        check_every=10, snapshot_every=50, checkpoint_s=0.0, reserve_margin_s=5.0, data_limit=0, time_budget="120s",
    ),
    "dcgan": dict(  # the DCGAN paper's baseline: unconditional, BCE, Adam 2e-4 / (0.5, 0.999)
        arch="dcgan", z_dim=128, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", lr_g=2e-4, lr_d=2e-4, beta1=0.5, real_noise=0.0, truncation=0.0, ema=False, hflip=True,
    ),
    "dcgan5": dict(  # the DCGAN article's network: 5x5 stride-2 transposed convs in G, 3x3 stride-2 convs in D
        arch="dcgan5", z_dim=100, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", lr_g=1e-4, lr_d=1e-4, beta1=0.5, real_noise=0.0, truncation=0.0, ema=False,
    ),
    "dcgan-tricks": dict(  # the 1st-public team's DCGAN: head-keeping crops, split BN, margin, SWA, wider G
        arch="dcgan", z_dim=128, g_ch=96, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        loss="bce", real_label=0.9, margin=2.0, lr_g=2e-4, lr_d=2e-4, beta1=0.5, real_noise=0.0, upsample="nearest",
        split_bn=True, crop_styles="box,padded,top,whole", min_aspect=0.2, max_aspect=4.0, ema=False, swa=True,
        truncation=0.8,
    ),
    "pggan": dict(  # Karras et al.: progressive growing, equalized LR, pixelnorm, minibatch stddev, WGAN-GP
        arch="pggan", z_dim=128, g_ch=64, d_ch=64, conditional=False, attention=False, spectral=False, aux_weight=0.0,
        mbstd_group=4, loss="wgan", gp_weight=10.0, lr_g=1e-3, lr_d=1e-3, beta1=0.0, beta2=0.99, real_noise=0.0,
        truncation=0.0, ema=True, ema_start=0,
    ),
}


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


def build_parser():
    p = argparse.ArgumentParser(
        prog="kernel.py", description="Generative Dog Images: train a GAN and write images.zip (10,000 64x64 PNGs).")
    p.add_argument("--data-dir", help="folder holding all-dogs/ and Annotation/ (default: Kaggle's input), or a folder of images")
    p.add_argument("--out", help="output folder (default: /kaggle/working if it exists, else ./output)")
    p.add_argument("--time-budget", help="wall time for the whole run: 9h, 90m, 600s, 8h30m or seconds (default 8h45m)")
    p.add_argument("--preset", help=f"comma-separated presets applied in order: {', '.join(PRESETS)} (default kaggle)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
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
    args, _unknown = build_parser().parse_known_args(argv)
    cfg = Config()
    preset = args.preset or cfg.preset
    for name in [n.strip() for n in preset.split(",") if n.strip()]:
        if name not in PRESETS:
            raise UsageError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
        cfg = apply_overrides(cfg, PRESETS[name], f"preset {name}")
    cfg = dataclasses.replace(cfg, preset=preset)
    flags = {"data_dir": args.data_dir, "out": args.out, "time_budget": args.time_budget, "seed": args.seed,
             "device": args.device, "resume": args.resume, "evaluate": args.evaluate,
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
    parse_duration(cfg.time_budget)  # fail early on a bad budget
    return cfg, args.print_config


def resolve_out_dir(out):
    if out:
        return out
    return "/kaggle/working" if os.path.isdir("/kaggle/working") else "output"


def config_to_json(cfg):
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
