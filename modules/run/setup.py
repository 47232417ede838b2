"""Before any rank starts: the checks that need no device, then the data, read once (forked ranks share it) ->
RunSetup; and each rank's device."""
import dataclasses
import os
import tempfile
from dataclasses import dataclass

import torch

from modules.data.demo import make_demo_dataset
from modules.data.dogs import find_data_dir, load_dogs
from modules.recipe.precision import describe_amp, resolve_amp
from modules.recipe.settings import split_batch
from modules.recipe.speed import configure_backends, configure_threads
from modules.recipe.utils import (
    Deadline,
    PhaseTimer,
    UsageError,
    check_device,
    format_duration,
    log,
    parse_duration,
    process_start,
    seed_everything,
    warn,
)
from modules.run.checkpoint import CHECKPOINT_ARCH_KEYS, Resumed
from modules.run.cli import resolve_out_dir
from modules.run.launch import quiet_worker_output, rank_device, resolve_world_size
from modules.run.outdir import check_out_dir, check_out_not_in_data
from modules.run.report import RunReport

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
    if world > 1:
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
