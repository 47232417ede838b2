"""The output folder: what can be told of it before anything is read, its creation with a write probe that also
measures the disk, and what a killed run left in it."""
import contextlib
import os
import re
import tempfile
import time

from modules.data.dogs import KAGGLE_DATA_ROOTS
from modules.recipe.utils import UsageError, warn

DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk


def check_out_dir(out_dir):
    """A UsageError if a file stands in the folder's place or on its path, or it cannot be written: a probe file is
    made and removed in it, or in its nearest existing parent."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f"output folder {out_dir} is a file: pass another --out")
    zip_path = os.path.join(out_dir, "images.zip")
    if os.path.lexists(zip_path) and not os.path.isfile(zip_path):
        raise UsageError(f"{zip_path} exists and is not a file: move it away")
    exists, parent = os.path.isdir(out_dir), os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    what = "write to output folder" if exists else "create output folder"
    if not os.path.isdir(parent):
        raise UsageError(f"cannot {what} {out_dir}: {parent} is a file")
    try:
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as exc:
        raise UsageError(f"cannot {what} {out_dir}: {exc.strerror or exc}") from None


def check_out_not_in_data(out_dir, data_dir):
    """Not the data folder or inside it: the next run would train on samples.png. data_dir "": Kaggle's input."""
    out = os.path.realpath(out_dir)
    for root in [data_dir] if data_dir else KAGGLE_DATA_ROOTS:
        root = os.path.realpath(os.path.expanduser(root))
        if os.path.isdir(root) and (out == root or out.startswith(root.rstrip(os.sep) + os.sep)):
            where = "is the data folder" if out == root else f"is inside the data folder {root}"
            raise UsageError(f"output folder {out_dir} {where}: its samples.png and losses.png would be read as "
                             "training images by the next run; pass another --out")


@contextlib.contextmanager
def removed_if_left_empty(out_dir):
    """A UsageError inside removes the folder again if this run created it and left it empty."""
    existed = os.path.isdir(out_dir)
    try:
        yield
    except UsageError:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only an empty folder
        raise


def remove_stale_temp_files(out_dir):
    """Remove what a killed run left while writing: atomic_file's images.zip.tmpPID and checkpoint.pt.tmpPID (or with
    no PID) whose process is gone. Two live runs sharing a folder each write their own (the later rename wins)."""
    for name in os.listdir(out_dir):
        m = re.fullmatch(r"(?:images\.zip|checkpoint\.pt)\.tmp(\d*)", name)
        if m and not (m[1] and int(m[1]) != os.getpid() and process_alive(int(m[1]))):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: another user's live process
        pass
    return True


def prepare_out_dir(out_dir, *, resume):
    """Create the output folder and prove it takes a file before training, not after 9 hours (its checks ran at start).
    -> disk write speed in bytes/s."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    data, t0 = os.urandom(DISK_PROBE_BYTES), time.monotonic()
    try:
        with tempfile.TemporaryFile(dir=out_dir) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    speed = DISK_PROBE_BYTES / max(time.monotonic() - t0, 1e-6)
    remove_stale_temp_files(out_dir)
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(ckpt) and not (resume and os.path.exists(resume) and os.path.samefile(resume, ckpt)):
        warn(f"{ckpt} of an earlier run will be replaced by this run's checkpoints; to continue that run instead, "
             f"pass --resume {ckpt}")
    return speed
