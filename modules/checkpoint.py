"""Checkpoints: written atomically and durably, read back with checks, restored into a Trainer. They hold state dicts,
the config as a dict, the step and the training time spent and planned: never pickled modules."""
import contextlib
import errno
import os
import shutil

import torch

from modules.utils import UsageError, atomic_file, warn

CHECKPOINT_FORMAT = "dogs-gan-checkpoint-1"
CHECKPOINT_ARCH_KEYS = ("arch", "z_dim", "g_ch", "d_ch", "shared_dim", "conditional", "attention", "spectral", "d_arch")
CHECKPOINT_ARCH_BEFORE = {"d_arch": "biggan-pytorch"}  # what a checkpoint from before a key existed was built with


def save_checkpoint(path, trainer, *, config, train_seconds, n_classes, classes, plan_seconds=0.0, complete=False,
                    history=None):
    """Atomic and durable: written to path.tmp, flushed to the disk, then renamed over path, so a kill at any moment
    leaves the previous checkpoint or the new one. Holds state dicts and plain data only, never pickled modules.

    plan_seconds: the training time the run's schedule (LR, PGGAN growth) spans; complete: training ran to its end.
    """
    payload = {"format": CHECKPOINT_FORMAT, "trainer": trainer.state_dict(), "config": config,
               "train_seconds": float(train_seconds), "plan_seconds": float(plan_seconds), "complete": bool(complete),
               "n_classes": n_classes, "classes": list(classes), "history": history or {}}
    with atomic_file(path) as f:
        torch.save(payload, f)


def describe_write_error(exc, path):
    """A failed checkpoint write -> one line for the log. A full disk reads "disk full", whether it came as an OSError
    (ENOSPC, EDQUOT) or as the RuntimeError torch's zip writer raises ("[enforce fail at inline_container.cc:...]
    PytorchStreamWriter failed writing file ...: file write failed")."""
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
        had = ckpt["config"].get(key, CHECKPOINT_ARCH_BEFORE.get(key))
        if had != value:
            raise UsageError(f"--resume {path}: checkpoint has {key}={had!r}, this run {value!r}; "
                             "resume with the same preset and settings")
    return ckpt


def restore_checkpoint(ckpt, path, trainer, *, classes):
    """Load a read_checkpoint() payload into the trainer. Another dataset's breeds or another model is a UsageError."""
    if ckpt["n_classes"] != len(classes):
        raise UsageError(f"--resume {path}: the checkpoint was trained on {ckpt['n_classes']} breeds, this data has "
                         f"{len(classes)}; resume with the same data")
    if list(ckpt["classes"]) != list(classes):
        warn(f"--resume {path}: the breed names differ from the checkpoint's; continuing with this data's")
    try:
        trainer.load_state_dict(ckpt["trainer"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        why = " ".join(line.strip() for line in str(exc).splitlines()[:2])
        raise UsageError(f"--resume {path}: does not fit this model ({why[:200]})") from None
