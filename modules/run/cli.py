"""The command line -> a checked Config: `parse_config(argv) -> (cfg, print_config)`. Every field is checked here,
before anything is read or written, against config.LIMITS, its parser, or the registry it names (a new loss is one
edit: the registry); deeper code trusts the values. A bad value is one UsageError line (exit 2)."""
import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from collections import namedtuple

from modules.data.annotations import CROP_STYLES, RESIZE_FILTERS
from modules.recipe.biggan import BIGGAN_D_ARCHS, BIGGAN_G_ARCH
from modules.recipe.config import (Choice, Config, LIMITS, Match, PRESETS, Range, Text, UsageError, apply_overrides,
                                   parse_duration, parse_faults)
from modules.recipe.losses import AUGMENTS, LOSSES
from modules.recipe.models import ARCHS
from modules.recipe.sample import SAMPLE_BN_MODES

# what each field may hold

REGISTRY_CHOICES = {  # field -> the registry whose names it takes
    "arch": Choice(tuple(ARCHS)), "loss": Choice(tuple(LOSSES)), "d_arch": Choice(tuple(BIGGAN_D_ARCHS)),
    "crop_filter": Choice(tuple(RESIZE_FILTERS)), "sample_bn": Choice(tuple(SAMPLE_BN_MODES)),
    "crop_styles": Choice(tuple(CROP_STYLES), many=True), "diffaug": Choice(tuple(AUGMENTS), many=True, empty=True),
}


Allowed = namedtuple("Allowed", "text ok")  # what one field may hold: ok(value) -> bool; text for the error message


def _range(spec, *, integer):
    """Range -> Allowed: a finite number (an integer for an int field) in [lo, hi] ((lo, hi] above), or `off`."""
    kind, show = ("an integer", str) if integer else ("a number", "{:g}".format)
    lo, hi, above, off = spec.lo, spec.hi, spec.above, spec.off
    text = f"{kind} {'>' if above else 'from'} {show(lo)}{' and <=' if above else ' to'} {show(hi)}"
    types = (int,) if integer else (int, float)

    def ok(v):
        if isinstance(v, bool) or not isinstance(v, types) or (isinstance(v, float) and not math.isfinite(v)):
            return False
        return v == off or (lo < v <= hi if above else lo <= v <= hi)
    return Allowed(text + (f", or {show(off)} (off)" if off is not None else ""), ok)


def _choice(spec):
    """Choice -> Allowed: one of the names, or (many) a comma-separated list of them."""
    names = spec.names
    if not spec.many:
        return Allowed("one of " + ", ".join(names), lambda v: v in names)

    def ok(v):
        items = [x.strip() for x in v.split(",") if x.strip()] if isinstance(v, str) else [None]
        return (bool(items) or spec.empty) and all(x in names for x in items)
    return Allowed("comma-separated from " + ", ".join(names) + (' (or "" for none)' if spec.empty else ""), ok)


def _parsed_by(parse, text):
    """Text that `parse` (which raises UsageError on bad input) accepts."""
    def ok(v):
        try:
            parse(v)
            return isinstance(v, str)
        except UsageError:
            return False
    return Allowed(text, ok)


def _allowed(field):
    """The Allowed of one Config field: by its type, config.LIMITS, the registries or its parser."""
    if field.name == "preset":  # the presets are a registry too; an empty name between commas is refused
        return Allowed("comma-separated from " + ", ".join(PRESETS),
                       lambda v: isinstance(v, str) and all(n.strip() in PRESETS for n in v.split(",")))
    if field.name == "time_budget":
        return _parsed_by(parse_duration, "a positive duration up to a week (168h): 9h, 90m, 600s, 8h30m or seconds")
    if field.name == "fault":
        return _parsed_by(parse_faults, "comma-separated nan@STEP, raise@STEP, oom@STEP, kill@STEP, slow@SECONDS, "
                                        "slowgen@SECONDS, zipfail")
    if isinstance(field.default, bool):
        return Allowed("true or false", lambda v: isinstance(v, bool))
    spec = REGISTRY_CHOICES.get(field.name) or LIMITS.get(field.name)
    if isinstance(spec, Range):
        return _range(spec, integer=isinstance(field.default, int))
    if isinstance(spec, Choice):
        return _choice(spec)
    if isinstance(spec, Match):
        return Allowed(spec.text, lambda v: isinstance(v, str) and re.fullmatch(spec.regex, v) is not None)
    if isinstance(spec, Text):
        return Allowed(spec.text, lambda v: isinstance(v, str) and not any(c in v for c in "\0\n\r"))
    return Allowed("nothing: this field has no entry in config.LIMITS (add one)", lambda v: False)


ALLOWED = {field.name: _allowed(field) for field in dataclasses.fields(Config)}


def check_value(name, value):
    """One field's value against ALLOWED -> UsageError (one line) when it is not allowed."""
    if not ALLOWED[name].ok(value):
        raise UsageError(f"setting {name}={value!r} is not allowed: {ALLOWED[name].text}")


def check_config(cfg):
    """Every field against ALLOWED, then the rules between fields; the first problem -> UsageError (one line)."""
    for field in dataclasses.fields(cfg):
        check_value(field.name, getattr(cfg, field.name))
    if cfg.n_images != 10000 and not cfg.dev_counts:
        raise UsageError(f"setting n_images={cfg.n_images} is not allowed: the competition takes exactly 10000 images "
                         f"(for a development run, also --set dev_counts=true)")
    chunks = len(BIGGAN_G_ARCH[cfg.image_size][1]) + 1  # BigGenerator splits z over its blocks + 1
    if cfg.arch == "biggan" and cfg.z_dim % chunks:
        raise UsageError(f"setting z_dim={cfg.z_dim} is not allowed with arch=biggan: G splits z into {chunks} equal "
                         f"chunks; use a multiple of {chunks} (e.g. {max(chunks, cfg.z_dim - cfg.z_dim % chunks)})")
    if cfg.max_aspect and cfg.max_aspect < cfg.min_aspect:
        raise UsageError(f"setting max_aspect={cfg.max_aspect} is not allowed: 0 (no limit) or >= min_aspect "
                         f"({cfg.min_aspect})")


# the command line

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


# added by others, not typed by the user: Jupyter's --f=FILE, traitlets' --IPKernelApp.x=y, and the --local-rank=N that
# the older `python -m torch.distributed.launch` passes each process
FOREIGN_ARG = re.compile(r"--?f=.*|--[A-Z]\w*(\.\w+)+(=.*)?|--local[-_]rank(=.*)?")


def _refuse_unknown(parser, unknown):
    """Skips FOREIGN_ARG and `-f FILE` (with their values); any other unknown argument is a UsageError naming it and
    the closest flag: a mistyped flag must not be silently ignored."""
    i = 0
    while i < len(unknown):
        item = unknown[i]
        if item == "-f" or FOREIGN_ARG.fullmatch(item):
            has_value = "=" not in item and i + 1 < len(unknown) and not unknown[i + 1].startswith("-")
            i += 2 if has_value else 1
            continue
        if not item.startswith("-"):
            raise UsageError(f"unexpected argument {item!r}: kernel.py takes only flags (see --help)")
        flag = item.split("=", 1)[0]
        near = difflib.get_close_matches(flag, [o for o in parser._option_string_actions if o.startswith("--")], n=1)
        raise UsageError(f"unknown flag {flag}" + (f"; did you mean {near[0]}?" if near else " (see --help)"))


def build_parser():
    p = _Parser(  # allow_abbrev=False: Jupyter's --f=FILE must not be taken for --feature-weights, nor a typo for a flag
        prog="kernel.py", description="Generative Dog Images: train a GAN and write images.zip (10,000 64x64 PNGs).",
        allow_abbrev=False)
    p.add_argument("--data-dir", help="folder holding all-dogs/ and Annotation/ (default: Kaggle's input), or a folder of images")
    p.add_argument("--out", help="output folder (default: /kaggle/working if it exists, else ./output)")
    p.add_argument("--time-budget", help="wall time for the whole run: 9h, 90m, 600s, 8h30m or seconds (default 8h45m)")
    p.add_argument("--preset", help=f"comma-separated presets applied in order: {', '.join(PRESETS)} (default kaggle)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--gpus", help="auto (every visible GPU, default) | N ranks; 1 = one process; with --device cpu: N "
                   "CPU processes (gloo)")
    p.add_argument("--demo", action="store_const", const=True, help="run on a small synthetic dataset made in a temp dir")
    p.add_argument("--resume", help="continue from this checkpoint.pt with the remaining budget")
    p.add_argument("--evaluate", help="score a zip or PNG folder against the training data, print JSON and exit")
    p.add_argument("--generate", metavar="CHECKPOINT", help="sample this checkpoint.pt's generator (no training): "
                   "images.zip, breeds.png, interpolation.png, report.json; only sampling settings may be changed")
    p.add_argument("--sweep", metavar="NAME=V1,V2", help="with --generate: sample at each value (truncation or "
                   "sample_bn); with Inception weights scored by FID/MiFID and the best one's zip shipped")
    p.add_argument("--feature-weights", help="Inception-v3 weights file (torchvision's or pytorch-fid's) for FID")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="override any config field")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as JSON and exit")
    return p


def parse_config(argv=None):
    """argv -> (Config, print_config flag): presets in order, then the flags, then --set, then every check."""
    cfg, print_config, _given = read_command_line(argv)
    return cfg, print_config


def read_command_line(argv=None):
    """parse_config's work -> (Config, print_config flag, the names of the fields the command line gave)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(_dash_values(parser, argv))
    _refuse_unknown(parser, unknown)
    cfg = Config()
    preset = args.preset or cfg.preset
    check_value("preset", preset)  # before its overrides are applied
    for name in [n.strip() for n in preset.split(",")]:
        cfg = apply_overrides(cfg, PRESETS[name], f"preset {name}")
    cfg = dataclasses.replace(cfg, preset=preset)
    fields = {field.name for field in dataclasses.fields(Config)} - {"preset"}
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    cfg = apply_overrides(cfg, flags, "command line")
    sets = {}
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        sets[name.strip()] = value.strip()
    cfg = apply_overrides(cfg, sets, "--set")
    check_config(cfg)  # every field against ALLOWED, before anything is read or written
    given = set(flags) | set(sets) | ({"preset"} if args.preset else set())
    check_generate(cfg, given)
    return cfg, args.print_config, given


# --generate: what it takes (sampling and where; data_dir: the sweep's FID reference) and what --sweep may vary

GENERATE_SETTINGS = ("generate", "sweep", "out", "device", "seed", "truncation", "sample_bn", "sample_batch", "amp",
                     "n_images", "dev_counts", "feature_weights", "data_dir", "threads", "data_workers")
SWEEP_FIELDS = ("truncation", "sample_bn")


def parse_sweep(text):
    """--sweep NAME=V1,V2,... -> (NAME, [values]), each value converted and checked as NAME's own setting."""
    name, _, values = text.partition("=")
    name = name.strip()
    if name not in SWEEP_FIELDS or not values.strip():
        raise UsageError(f"--sweep {text!r}: expected NAME=V1,V2,... with NAME one of {', '.join(SWEEP_FIELDS)}")
    out = []
    for raw in values.split(","):
        value = getattr(apply_overrides(Config(), {name: raw.strip()}, "--sweep"), name)
        try:
            check_value(name, value)
        except UsageError as exc:
            raise UsageError(f"--sweep: {exc}") from None
        out.append(value)
    return name, out


def check_generate(cfg, given):
    """--generate samples the checkpoint's own model: a training setting given with it (a flag or --set) is refused,
    naming the field; --sweep needs --generate and its values are checked here, before anything is read."""
    if cfg.sweep and not cfg.generate:
        raise UsageError("--sweep samples a checkpoint: pass --generate CHECKPOINT with it")
    if not cfg.generate:
        return
    refused = sorted(given - set(GENERATE_SETTINGS))
    if refused:
        raise UsageError(f"setting {refused[0]} cannot be changed with --generate: it samples the checkpoint's own "
                         f"model, with only these settings: {', '.join(GENERATE_SETTINGS[1:])}")
    if cfg.sweep:
        parse_sweep(cfg.sweep)


def resolve_out_dir(out):
    return out or ("/kaggle/working" if os.path.isdir("/kaggle/working") else "output")


def config_to_json(cfg):
    return json.dumps(dataclasses.asdict(cfg), indent=2, default=str)
