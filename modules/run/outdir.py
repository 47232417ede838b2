"""The output folder: what can be told of it before anything is read (a file in its place, an unwritable parent, inside
the data), its creation with a write probe that also measures the disk, and what a killed run left in it."""
import contextlib
import os
import time

from modules.data.dogs import KAGGLE_DATA_ROOTS
from modules.recipe.utils import UsageError, warn

DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk


def check_out_dir(out_dir):
    """What can be told of the output folder without creating it: a UsageError if a file stands in its place, if it
    cannot be created (a file on its path, an unwritable parent) or written. A probe file is made and removed in the
    folder, or in its nearest existing parent when the folder does not exist yet."""
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
    probe = os.path.join(parent, f".out-probe-{os.getpid()}")
    try:
        os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"cannot {what} {out_dir}: {exc.strerror or exc}") from None


def check_out_not_in_data(out_dir, data_dir):
    """The output folder must not be the data folder or inside it: samples.png and losses.png would land among the
    training images, and the next run on that folder would train on them. data_dir "" means Kaggle's input."""
    out = os.path.realpath(out_dir)
    for root in [data_dir] if data_dir else KAGGLE_DATA_ROOTS:
        root = os.path.realpath(os.path.expanduser(root))
        if os.path.isdir(root) and (out == root or out.startswith(root.rstrip(os.sep) + os.sep)):
            where = "is the data folder" if out == root else f"is inside the data folder {root}"
            raise UsageError(f"output folder {out_dir} {where}: its samples.png and losses.png would be read as "
                             "training images by the next run; pass another --out")


@contextlib.contextmanager
def removed_if_left_empty(out_dir):
    """Around the checks that follow the output folder's creation: if one fails (a UsageError), a folder this run
    created and left empty is removed again."""
    existed = os.path.isdir(out_dir)
    try:
        yield
    except UsageError:
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(out_dir)  # only an empty folder
        raise


def remove_stale_temp_files(out_dir):
    """Remove what a killed run left while writing: images.zip.tmpPID and checkpoint.pt.tmpPID (atomic_file's names)
    whose process is gone, and the unnumbered names of earlier versions. Another live run's files are left alone: two
    runs sharing a folder each write their own temporary file (the later rename wins)."""
    for name in os.listdir(out_dir):
        for stem in ("images.zip.tmp", "checkpoint.pt.tmp"):
            suffix = name[len(stem):] if name.startswith(stem) else None
            if suffix is None or (suffix and not suffix.isdigit()):
                continue
            if suffix and int(suffix) != os.getpid():
                try:
                    os.kill(int(suffix), 0)
                    continue  # that process still runs
                except ProcessLookupError:
                    pass
                except (OSError, OverflowError):  # EPERM: another user's live process
                    continue
            with contextlib.suppress(OSError):
                os.remove(os.path.join(out_dir, name))


def prepare_out_dir(out_dir, *, resume):
    """Create the output folder and prove it takes a file before any training (not after 9 hours): a DISK_PROBE_BYTES
    file is written, fsynced and removed. Leftovers of a killed run are removed. -> disk write speed in bytes/s."""
    check_out_dir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    probe, data = os.path.join(out_dir, f".write-probe-{os.getpid()}"), os.urandom(DISK_PROBE_BYTES)
    t0 = time.monotonic()
    try:
        with open(probe, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {out_dir}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.remove(probe)
    speed = DISK_PROBE_BYTES / max(time.monotonic() - t0, 1e-6)
    remove_stale_temp_files(out_dir)
    ckpt = os.path.join(out_dir, "checkpoint.pt")
    if os.path.isfile(ckpt) and not (resume and os.path.exists(resume) and os.path.samefile(resume, ckpt)):
        warn(f"{ckpt} of an earlier run will be replaced by this run's checkpoints; to continue that run instead, "
             f"pass --resume {ckpt}")
    return speed
