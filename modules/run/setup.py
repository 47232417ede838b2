"""Before any rank starts: the checks that need no device, then the data, read once (forked ranks share it) ->
RunSetup; each rank's device; the output folder, checked first and created later with a probe that measures the disk.
"""
import contextlib
import dataclasses
import os
import re
import tempfile
import time
from dataclasses import dataclass

import torch

from modules.data.demo import make_demo_dataset
from modules.data.dogs import KAGGLE_DATA_ROOTS, find_data_dir, load_dogs
from modules.recipe.device import configure_backends, configure_threads, describe_amp, resolve_amp
from modules.recipe.settings import split_batch
from modules.recipe.utils import (Deadline, PhaseTimer, UsageError, check_device, format_duration, log, parse_duration,
                                  process_start, seed_everything, warn)
from modules.run.checkpoint import CHECKPOINT_ARCH_KEYS, Resumed
from modules.run.cli import resolve_out_dir
from modules.run.distributed import quiet_worker_output, rank_device, resolve_world_size
from modules.run.report import RunReport


DISK_PROBE_BYTES = 4 << 20  # written and fsynced in the output folder at start: proves it writable, measures the disk


def check_out_dir(out_dir):
    """A UsageError if a file stands in the folder's place or on its path, or it cannot be written: a probe file is
    made and removed in it, or in its nearest existing parent."""
    zip_path = os.path.join(out_dir, "images.zip")
    if os.path.lexists(zip_path) and not os.path.isfile(zip_path):
        raise UsageError(f"{zip_path} exists and is not a file: move it away")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    what = "write to output folder" if os.path.isdir(out_dir) else "create output folder"
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
    data, t0 = os.urandom(DISK_PROBE_BYTES), time.monotonic()
    try:
        os.makedirs(out_dir, exist_ok=True)
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


MIN_BUDGET_S = 30.0  # below this no run can load data, train and write 10,000 images
KAGGLE_SESSION_S = 9 * 3600.0  # a Kaggle notebook session ends after 9 hours


@dataclass
class RunSetup:
    """What every rank's run starts from; forked ranks inherit it."""
    cfg: object  # the Config
    deadline: Deadline  # the run's clock (from process start) and budget
    timer: PhaseTimer  # wall seconds per phase, for the log and report.json
    out_dir: str  # checked, not created yet (rank 0 creates it once the trainer is built)
    world: int  # ranks of this run (1 = one process)
    resumed: Resumed  # the --resume checkpoint, or None
    data: object  # DogData: the uint8 crops, labels, breeds, reference images
    report: RunReport  # report.json, filled in as the run goes
    device: object = None  # the checked torch.device; None in a run that forks: each rank opens its own after the fork
    demo_dir: object = None  # --demo: the synthetic data's TemporaryDirectory (removed when the run ends)


def prepare(cfg, ctx):
    """The budget, the ranks, the output folder and --resume checked (one line, exit 2, before the data is read and
    the output folder exists), then the data -> RunSetup."""
    deadline = Deadline(parse_duration(cfg.time_budget), start=process_start())  # the log's clock too
    if deadline.budget_s < MIN_BUDGET_S:
        raise UsageError(f"--time-budget {cfg.time_budget} is too small: a run needs at least {MIN_BUDGET_S:.0f}s")
    in_kaggle = os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.path.isdir("/kaggle/working")
    if deadline.budget_s > KAGGLE_SESSION_S and in_kaggle:
        warn(f"--time-budget {cfg.time_budget} is more than a Kaggle session's {format_duration(KAGGLE_SESSION_S)}: "
             "Kaggle stops the session first, and the zip is written only at the budget's end")
    world = ctx.world_size if ctx.launcher == "torchrun" else resolve_world_size(cfg.gpus, cfg.device)
    forks = world > 1 and ctx.launcher != "torchrun"  # ranks 1..N-1 forked after the data
    split_batch(cfg.batch_size, cfg.batch_per_gpu, world)  # fails early when the batch does not split
    if not ctx.is_main:
        quiet_worker_output(ctx.rank)
    out_dir = resolve_out_dir(cfg.out)
    if ctx.is_main:  # only rank 0 writes; it creates the folder after the data and every other check
        if not cfg.demo:
            check_out_not_in_data(out_dir, cfg.data_dir)
        check_out_dir(out_dir)
    # every rank reads --resume, before the data: a wrong file fails in seconds
    resumed = Resumed.read(cfg.resume, arch={k: getattr(cfg, k) for k in CHECKPOINT_ARCH_KEYS}) if cfg.resume else None
    log(f"preset {cfg.preset}, arch {cfg.arch}, loss {cfg.loss}, budget {format_duration(deadline.budget_s)}, "
        f"out {out_dir}" + (f", {world} ranks ({'forked here' if forks else 'torchrun'})" if world > 1 else ""))
    report = RunReport(config=dataclasses.asdict(cfg), device="None", torch=torch.__version__)
    device = None if forks else open_device(cfg, ctx, report=report)  # forked ranks: each opens its own
    seed_everything(cfg.seed)
    timer = PhaseTimer()
    with timer.phase("data"):
        data, demo_dir = load_training_data(cfg)
    report.data = data.stats
    return RunSetup(cfg=cfg, deadline=deadline, timer=timer, out_dir=out_dir, world=world, resumed=resumed, data=data,
                    report=report, device=device, demo_dir=demo_dir)


def load_training_data(cfg):
    """-> (DogData, the --demo temp dir or None: keep it referenced while the data is needed)."""
    data_dir, demo_dir = cfg.data_dir or None, None
    if cfg.demo:
        demo_dir = tempfile.TemporaryDirectory(prefix="dogs-demo-")
        data_dir = make_demo_dataset(os.path.join(demo_dir.name, "data"), seed=cfg.seed)
        log(f"demo: synthetic dataset in {data_dir}")
    images_dir, annotation_dir = find_data_dir(data_dir)
    data = load_dogs(images_dir, annotation_dir, size=cfg.image_size, margin=cfg.crop_margin,
                     crop_styles=tuple(s.strip() for s in cfg.crop_styles.split(",") if s.strip()),
                     include_whole=cfg.include_whole, min_aspect=cfg.min_aspect,
                     max_aspect=cfg.max_aspect or float("inf"), workers=cfg.data_workers, limit=cfg.data_limit or None,
                     resize=cfg.crop_filter)
    return data, demo_dir


def open_device(cfg, ctx, *, report):
    """This rank's device, checked (an unusable GPU, a forced amp this torch lacks: one line, exit 2) -> device."""
    device = check_device(rank_device(ctx, cfg.device))
    log(f"backends: {configure_backends(device)}; {configure_threads(cfg.threads, device)}")
    log(f"precision: {describe_amp(resolve_amp(cfg.amp, device))} (amp={cfg.amp})")  # a forced amp torch lacks: exit 2
    report.device = str(device)
    return device
