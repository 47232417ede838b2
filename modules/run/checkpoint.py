"""Checkpoints: written atomically and durably, read back with checks, restored into a Trainer. They hold state dicts,
the config as a dict, the step and the training time spent and planned: never pickled modules."""
import contextlib
import errno
import math
import os
import shutil
from dataclasses import dataclass

import torch

from modules.recipe.utils import UsageError, atomic_file, require_regular_file, warn

CHECKPOINT_FORMAT = "dogs-gan-checkpoint-1"
CHECKPOINT_ARCH_KEYS = ("arch", "z_dim", "g_ch", "d_ch", "shared_dim", "conditional", "attention", "spectral", "d_arch")
CHECKPOINT_ARCH_BEFORE = {"d_arch": "biggan-pytorch"}  # what a checkpoint from before a key existed was built with
CHECKPOINT_MAX_SECONDS = 366 * 86400.0  # train/plan seconds beyond a year of training are not a real run's
CHECKPOINT_MAX_CLASSES = 100000  # breeds (the dataset has 120)
CHECKPOINT_TRAINER_KEYS = ("G", "D", "opt_g", "opt_d", "scaler_g", "scaler_d", "step")  # Trainer.load_state_dict reads these


def save_checkpoint(path, trainer, *, config, train_seconds, n_classes, classes, plan_seconds=0.0, complete=False,
                    history=None, label_counts=None):
    """Atomic and durable: written to path.tmp, flushed to the disk, then renamed over path, so a kill at any moment
    leaves the previous checkpoint or the new one. plan_seconds: the training time the run's plan spans; complete:
    training ran to its end; label_counts: training images per breed, so that --generate draws the breeds as the run
    did without the data."""
    payload = {"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(), "config": config,
               "train_seconds": float(train_seconds), "plan_seconds": float(plan_seconds), "complete": bool(complete),
               "n_classes": n_classes, "classes": list(classes), "history": history or {}}
    if label_counts is not None:
        payload["label_counts"] = [int(c) for c in label_counts]
    with atomic_file(path) as f:
        torch.save(payload, f)


def describe_write_error(exc, path):
    """A failed checkpoint write -> one line for the log; a full disk reads "disk full" whether it came as an OSError
    or as the RuntimeError of torch's zip writer ("PytorchStreamWriter failed writing file ...")."""
    text = str(exc)
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or "No space left" in text or (
        isinstance(exc, RuntimeError) and "PytorchStreamWriter" in text and "write" in text)
    if full:
        free = ""
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2**20:.0f} MiB free"
        return f"disk full: {path} needs more space than is left{free}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first[:200]}"


def _is_real(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _real_in(x, lo, hi, *, whole=False):
    """x is a finite number (an int if whole) in [lo, hi]."""
    return _is_real(x) and (isinstance(x, int) or not whole) and math.isfinite(x) and lo <= x <= hi


def check_checkpoint_fields(ckpt, path, flag="--resume"):
    """Every field --resume reads, by type and range: a crafted or damaged file that loads must not crash the run
    after the data is read. The state dicts' tensors are checked by load_state_dict."""
    def bad(field, value, want):
        shown = repr(value) if len(repr(value)) <= 40 else f"{type(value).__name__} {repr(value)[:40]}..."
        raise UsageError(f"{flag} {path}: damaged checkpoint: {field} is {shown}, want {want}; use the checkpoint.pt "
                         "of an earlier run")

    for field, default in (("train_seconds", None), ("plan_seconds", 0.0)):
        if not _real_in(ckpt.get(field, default), 0, CHECKPOINT_MAX_SECONDS):
            bad(field, ckpt.get(field), f"seconds in [0, {CHECKPOINT_MAX_SECONDS:.0f}]")
    if not isinstance(ckpt.get("complete", True), bool):
        bad("complete", ckpt["complete"], "true or false")
    n = ckpt.get("n_classes")
    if not _real_in(n, 1, CHECKPOINT_MAX_CLASSES, whole=True):
        bad("n_classes", n, f"a whole number in [1, {CHECKPOINT_MAX_CLASSES}]")
    classes = ckpt.get("classes")
    if not isinstance(classes, (list, tuple)) or len(classes) != n or not all(isinstance(c, str) for c in classes):
        bad("classes", classes, f"a list of {n} breed names")
    counts = ckpt.get("label_counts", [1] * n)
    if not isinstance(counts, list) or len(counts) != n or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts) or not sum(counts):
        bad("label_counts", counts, f"{n} image counts >= 0, not all 0")
    history = ckpt.get("history", {})
    if not isinstance(history, dict) or not all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and all(
                _is_real(x) or (isinstance(x, (list, tuple)) and all(map(_is_real, x))) for x in v)
            for k, v in history.items()):
        bad("history", history, "{name: [numbers or (step, value) pairs]}")
    if not isinstance(ckpt.get("config"), dict):
        bad("config", ckpt.get("config"), "the run's settings")
    state = ckpt.get("trainer")
    if not isinstance(state, dict) or not all(k in state for k in CHECKPOINT_TRAINER_KEYS):
        bad("trainer", state, "the state of a trainer: " + ", ".join(CHECKPOINT_TRAINER_KEYS))
    for key in ("G", "D", "opt_g", "opt_d", "scaler_g", "scaler_d", "ema", "swa"):
        if key in state and not isinstance(state[key], dict):
            bad(f"trainer.{key}", state[key], "a state dict")
    if not _real_in(state["step"], 0, 2**53 - 1, whole=True):
        bad("trainer.step", state["step"], "a whole number >= 0")
    lr_scale = state.get("lr_scale", 1.0)
    if not _real_in(lr_scale, 0, 1e3) or lr_scale == 0:
        bad("trainer.lr_scale", lr_scale, "a number in (0, 1000]")


def read_checkpoint(path, *, arch, flag="--resume"):
    """Load a checkpoint onto the CPU and check it -> its payload (see save_checkpoint). arch: {key: value} of this
    run's CHECKPOINT_ARCH_KEYS, which must equal the checkpoint's. A file that will not do is a UsageError naming the
    flag and the path."""
    require_regular_file(path, flag)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"{flag} {path}: no such file") from None
    except Exception as exc:  # truncated zip, garbage, a folder, a pickle with code in it
        raise UsageError(f"{flag} {path}: not a readable checkpoint ({type(exc).__name__}); use the "
                         "checkpoint.pt of an earlier run") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{flag} {path}: not a checkpoint written by this kernel")
    check_checkpoint_fields(ckpt, path, flag=flag)
    for key, value in arch.items():
        had = ckpt["config"].get(key, CHECKPOINT_ARCH_BEFORE.get(key))
        if had != value:
            raise UsageError(f"{flag} {path}: checkpoint has {key}={had!r}, this run {value!r}; "
                             "resume with the same preset and settings")
    return ckpt


@dataclass(frozen=True)
class Resumed:
    """What --resume carries into a run: the checked checkpoint and the times of the run it continues."""
    path: str
    payload: dict  # the checked checkpoint (see save_checkpoint): trainer state, config, classes, ...
    step: int  # the trainer's step count in the checkpoint
    train_seconds: float  # training done by the run(s) it continues
    plan_seconds: float  # the training time their schedule spans
    complete: bool  # did that training reach the end of its plan?
    history: dict  # {series: [(train seconds, value)]}, carried on in report.json and losses.png

    @classmethod
    def read(cls, path, *, arch):
        ckpt = read_checkpoint(path, arch=arch)
        train_s = float(ckpt["train_seconds"])
        return cls(path=path, payload=ckpt, step=ckpt["trainer"]["step"], train_seconds=train_s,
                   plan_seconds=float(ckpt.get("plan_seconds", train_s)), complete=bool(ckpt.get("complete", True)),
                   history={k: list(v) for k, v in ckpt.get("history", {}).items()})

    def restore(self, trainer, *, classes):
        """Load the trainer's state. Another dataset's breeds or another model is a UsageError."""
        n = self.payload["n_classes"]
        if n != len(classes):
            raise UsageError(f"--resume {self.path}: the checkpoint was trained on {n} breeds, this data has "
                             f"{len(classes)}; resume with the same data")
        if list(self.payload["classes"]) != list(classes):
            warn(f"--resume {self.path}: the breed names differ from the checkpoint's; continuing with this data's")
        try:
            trainer.load_state_dict(self.payload["trainer"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            why = " ".join(line.strip() for line in str(exc).splitlines()[:2])
            raise UsageError(f"--resume {self.path}: does not fit this model ({why[:200]})") from None
