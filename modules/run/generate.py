"""--generate CHECKPOINT: sample a trained generator without training, as StyleGAN2-ADA's generate.py and
BigGAN-PyTorch's sample.py do: images.zip (verified, atomic: an earlier zip stays until a valid one replaces it),
breeds.png, interpolation.png and report.json in --out. With --sweep NAME=V1,V2,...: breeds-NAME-V.png per value and,
with Inception weights, FID and MiFID per value (a table; the best value's zip is shipped).

The model is the checkpoint's own: its architecture and breeds from the config it stores, and the generator a run
ships (Trainer.generator_to_ship: the SWA average once it averaged, else the EMA, else G). truncation and sample_bn
are the checkpoint's unless the command line gives them; the other sampling settings (cli.GENERATE_SETTINGS) are the
command line's. Everything is read and checked before anything is written: a missing, damaged or foreign
checkpoint is one line, exit 2, and the output folder is left as it was.
"""
import dataclasses
import os
import sys
import time

import numpy as np
import torch

from modules.recipe.config import Config
from modules.recipe.device import configure_threads, describe_amp, resolve_amp
from modules.recipe.models import build_models
from modules.recipe.sample import Sampler
from modules.recipe.utils import UsageError, check_device, format_duration, log, say, warn
from modules.run.checkpoint import CHECKPOINT_ARCH_BEFORE, CHECKPOINT_ARCH_KEYS, read_checkpoint
from modules.run.cli import check_value, parse_sweep, resolve_out_dir
from modules.run.evaluate import LOCAL_NOTE, NO_FID, evaluate_images
from modules.run.finish import fast_inference
from modules.run.metrics import build_feature_extractor
from modules.run.rank import EXIT_ZIP_FAILED
from modules.run.report import breeds_sheet, conditioned_on_breed, interpolation_sheet, write_report
from modules.run.setup import check_out_dir, load_training_data
from modules.run.submission import SubmissionError, write_submission

GENERATE_MODEL_KEYS = CHECKPOINT_ARCH_KEYS + ("aux_weight", "upsample", "split_bn")  # build_models' G
GENERATE_INHERITED = ("truncation", "sample_bn")  # the checkpoint's, unless the command line gives them
SWEEP_RANK_BY = "mifid_private"  # the sweep ships the value lowest in this (Kaggle's final board was the private one)
UNIFORM_BREEDS = "the checkpoint has no per-breed image counts (an older kernel's): breeds are drawn uniformly"


@dataclasses.dataclass(frozen=True)
class LoadedGenerator:
    """What --generate takes from a checkpoint."""
    G: torch.nn.Module  # the shipped generator, on the device, no gradients
    config: Config  # the defaults with the checkpoint's model and sampling fields
    classes: list  # breed names (annotation folders)
    label_counts: np.ndarray  # [n_classes] training images per breed; ones for a checkpoint without them
    counts_known: bool  # False: an older checkpoint without label_counts (breeds drawn uniformly)
    weights: str  # which state was loaded: swa | ema | G
    step: int  # the trainer's step when the checkpoint was written


def shipped_state(trainer_state):
    """-> (name, state dict) of the generator a run ships: SWA once it averaged, else the EMA, else G."""
    swa = trainer_state.get("swa")
    if swa and int(swa.get("n_averaged", 0)) > 0:  # AveragedModel's keys: module.<G's key>, n_averaged
        return "swa", {k[len("module."):]: v for k, v in swa.items() if k.startswith("module.")}
    if "ema" in trainer_state:
        return "ema", trainer_state["ema"]
    return "G", trainer_state["G"]


def load_generator(path, device):
    """read_checkpoint's checks, then G built from the checkpoint's own settings and its shipped weights loaded
    -> LoadedGenerator. A setting that this kernel does not build (another architecture) or weights that do not fit it
    are a UsageError naming the path."""
    ckpt = read_checkpoint(path, arch={}, flag="--generate")
    saved = ckpt["config"]
    fields = {k: saved.get(k, CHECKPOINT_ARCH_BEFORE.get(k)) for k in GENERATE_MODEL_KEYS + GENERATE_INHERITED}
    fields = {k: v for k, v in fields.items() if v is not None}
    for name, value in fields.items():
        try:
            check_value(name, value)
        except UsageError as exc:
            raise UsageError(f"--generate {path}: this kernel cannot build the checkpoint's model ({exc})") from None
    config = dataclasses.replace(Config(), **fields)
    try:  # the settings' rules between fields (a biggan z_dim split in 5) and the weights' shapes
        G, _ = build_models(config, ckpt["n_classes"])
        weights, state = shipped_state(ckpt["trainer"])
        G.load_state_dict(state)
    except (AssertionError, KeyError, RuntimeError, ValueError, TypeError) as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise UsageError(f"--generate {path}: its shipped weights do not fit its own settings "
                         f"({why[:200]})") from None
    counts = ckpt.get("label_counts")
    return LoadedGenerator(G=G.to(device).eval().requires_grad_(False), config=config, classes=list(ckpt["classes"]),
                           label_counts=np.asarray(counts if counts else [1] * ckpt["n_classes"], np.int64),
                           counts_known=counts is not None, weights=weights, step=int(ckpt["trainer"]["step"]))


def build_generate_sampler(cfg, loaded, device, *, given):
    """The Sampler of --generate: the loaded G and breeds; truncation and sample_bn the command line's where it gave
    them (given: the names it gave), else the checkpoint's; batch and precision the command line's."""
    pick = {k: getattr(cfg if k in given else loaded.config, k) for k in GENERATE_INHERITED}
    return Sampler(model=lambda: loaded.G, z_dim=loaded.config.z_dim, truncation=pick["truncation"],
                   label_counts=loaded.label_counts, amp_dtype=resolve_amp(cfg.amp, device), device=device,
                   batch=cfg.sample_batch, sample_bn=pick["sample_bn"])


def _shown(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def generate_command(cfg, *, given):
    """--generate (given: the names of the settings the command line gave): load and check everything (checkpoint,
    model, sweep, Inception weights and reference data for a scored sweep), then write the zip, report.json and the
    pictures -> exit code (0, or EXIT_ZIP_FAILED)."""
    t0 = time.monotonic()
    device = check_device(cfg.device)
    configure_threads(cfg.threads, device)  # as a run starts (a CPU run on 2 cores: 1; not re-measured here)
    loaded = load_generator(cfg.generate, device)
    sampler = build_generate_sampler(cfg, loaded, device, given=given)
    sweep = parse_sweep(cfg.sweep) if cfg.sweep else None
    extractor = data = None
    if sweep:
        extractor = build_feature_extractor(cfg.feature_weights or None, device)
        if extractor is not None:
            data, _ = load_training_data(cfg)  # FID's reference: the training images
    out_dir = resolve_out_dir(cfg.out)
    check_out_dir(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    report = {"generate": {"checkpoint": cfg.generate, "step": loaded.step, "weights": loaded.weights,
                           "arch": loaded.config.arch, "breeds": len(loaded.classes),
                           "breed_frequencies": "the training set's" if loaded.counts_known else "uniform"},
              "device": str(device), "files": [], "warnings": []}
    if not loaded.counts_known:
        warn(UNIFORM_BREEDS)
        report["warnings"].append(UNIFORM_BREEDS)
    log(f"--generate {cfg.generate}: {loaded.config.arch}, step {loaded.step}, {loaded.weights} weights, "
        f"{len(loaded.classes)} breeds")
    with fast_inference(loaded.G, device):
        if sweep:
            sampler, images = run_sweep(sampler, *sweep, n=cfg.n_images, seed=cfg.seed, extractor=extractor, data=data,
                                        classes=loaded.classes, out_dir=out_dir, report=report)
        else:
            sampler = sampler.ready()
            images = sampler(cfg.n_images, cfg.seed)
        report["settings"] = {"truncation": sampler.truncation, "sample_bn": sampler.sample_bn, "seed": cfg.seed,
                              "n_images": cfg.n_images, "sample_batch": sampler.batch,
                              "amp": describe_amp(sampler.amp_dtype)}
        zip_path = os.path.join(out_dir, "images.zip")
        try:
            write_submission(images, zip_path, workers=cfg.data_workers)
        except SubmissionError as exc:
            say(f"error: no valid zip written ({exc}); any earlier {zip_path} is left as it was", sys.stderr)
            return EXIT_ZIP_FAILED
        shown = ", ".join(f"{k} {_shown(v)}" for k, v in report["settings"].items())
        log(f"wrote {zip_path}: {len(images)} verified PNGs ({shown})")
        report["files"].append(zip_path)
        report_path = os.path.join(out_dir, "report.json")
        write_report(report_path, report)
        write_pictures(sampler, loaded, seed=cfg.seed, out_dir=out_dir, report=report)
    report["wall_seconds"] = time.monotonic() - t0
    write_report(report_path, report)
    log(f"done: --generate in {format_duration(report['wall_seconds'])}; files in {out_dir}")
    return 0


def write_pictures(sampler, loaded, *, seed, out_dir, report):
    """breeds.png (a conditional G only) and interpolation.png; a failure is a warning: the zip is written."""
    sheets = [("interpolation.png", interpolation_sheet)]
    if conditioned_on_breed(loaded.G):
        sheets.insert(0, ("breeds.png", breeds_sheet))
    else:
        log("breeds.png skipped: this model is not conditioned on the breed")
    for name, make in sheets:
        path = os.path.join(out_dir, name)
        try:
            make(sampler, loaded.classes, seed=seed).save(path, format="PNG")
            report["files"].append(path)
        except Exception as exc:
            warn(f"{name} failed ({type(exc).__name__}: {exc}); the zip is written")
            report["warnings"].append(f"{name} failed: {exc}")


def run_sweep(sampler, name, values, *, n, seed, extractor, data, classes, out_dir, report):
    """--sweep: breeds-NAME-V.png per value; with an extractor each value's n images scored (FID, MiFID: a table),
    -> (the best value's sampler, its images); without one -> (the configured sampler, its images) and a line saying
    that the sweep could not be scored."""
    rows, best = [], None
    for value in values:
        one = dataclasses.replace(sampler, **{name: value}).ready()
        sheet = os.path.join(out_dir, f"breeds-{name}-{_shown(value)}.png")
        breeds_sheet(one, classes, seed=seed).save(sheet, format="PNG")
        report["files"].append(sheet)
        row = {name: value, "sheet": sheet}
        if extractor is not None:
            images = one(n, seed)
            scores = evaluate_images(images, data.reference, extractor)
            row.update({k: scores[k] for k in ("fid", "mifid_public", "mifid_private", "memorization_distance")})
            if best is None or row[SWEEP_RANK_BY] < best[0][SWEEP_RANK_BY]:
                best = row, one, images
        rows.append(row)
    report["sweep"] = {"setting": name, "rows": rows, "scored": extractor is not None}
    if extractor is None:
        log(f"--sweep {name}: could not score it ({NO_FID}); wrote a sheet per value, the zip at "
            f"{name}={_shown(getattr(sampler, name))}")
        report["sweep"]["note"] = NO_FID
        sampler = sampler.ready()
        return sampler, sampler(n, seed)
    say(f"{name:>12} {'FID':>9} {'MiFID pub':>10} {'MiFID priv':>10}  ({LOCAL_NOTE})")
    for row in rows:
        say(f"{_shown(row[name]):>12} {row['fid']:9.3f} {row['mifid_public']:10.3f} {row['mifid_private']:10.3f}")
    row, one, images = best
    log(f"--sweep: shipping {name}={_shown(row[name])} (lowest {SWEEP_RANK_BY})")
    report["sweep"].update(shipped=row[name], note=LOCAL_NOTE)
    return one, images
