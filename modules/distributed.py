"""Several GPUs in one run, through torch.distributed: how many ranks (`--gpus auto|N`), three ways in (one process;
`torchrun`; workers this process starts itself, also from a notebook cell), the process groups, and the few collectives
the training loop agrees through.

Ways in:
- torchrun (or any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT): every rank is a process of
  its own, we start nothing;
- `python kernel.py` or a notebook cell with --gpus N > 1: this process is rank 0 and *forks* ranks 1..N-1 after the data
  is loaded (they share the uint8 crops copy-on-write) and before CUDA is initialised anywhere: `spawn` would have to
  import the notebook's `__main__`, which it cannot. The devices are counted through NVML
  (PYTORCH_NVML_BASED_CUDA_CHECK=1), which does not initialise CUDA, as Accelerate's notebook_launcher does;
- --gpus 1 (or one visible device): today's single-process path, no process group at all.

Two process groups: the default one (long timeout) for the setup, where rank 0 alone measures the finish reserve while
the others wait; and the training group (short timeout, well inside the finish reserve) that carries DDP's all-reduces
and the stop decisions, so a dead or hung rank costs at most that timeout.
"""
import contextlib
import ctypes
import datetime
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from modules.utils import UsageError, warn

DIST_SETUP_TIMEOUT_S = 300.0  # default group: the start, and the others waiting while rank 0 measures the finish reserve
DIST_TIMEOUT_MIN_S = 10.0  # training group's collective timeout: never shorter (a checkpoint on rank 0 must fit)
DIST_TIMEOUT_MAX_S = 120.0
WORKER_JOIN_S = 10.0  # rank 0 waits this long for its workers to exit before it terminates them
STOP_CODES = ("", "budget", "steps", "interrupted", "crashed")  # the stop decision, as broadcast (index)
INTERRUPT_VOTE = 100  # a rank other than 0 that got SIGINT/SIGTERM adds this to the decision sum


@dataclass
class DistContext:
    """Who this process is in the run. world_size 1 = the single-process path (no group, nothing started)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | fork
    workers: list = field(default_factory=list)  # fork, rank 0 only: multiprocessing.Process of ranks 1..N-1
    group: object = None  # the training group (DDP, decisions); None until make_training_group()
    broken: str = ""  # why collectives can no longer be used ("" while they can)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1


# how many ranks


def torchrun_env():
    """-> DistContext from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or None when not launched so."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise UsageError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UsageError(f"RANK={rank} WORLD_SIZE={world}: not a valid rank")
    return DistContext(rank=rank, world_size=world, local_rank=local, launcher="torchrun")  # its world, even of 1


def visible_cuda_devices():
    """How many CUDA devices this process may use, counted without initialising CUDA (NVML), so that a fork is safe
    afterwards. 0 without CUDA."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # is_available() through NVML, not the CUDA runtime
    if not torch.cuda.is_available():  # (read by torch at each call)
        return 0
    return torch.cuda.device_count()  # NVML first; honours CUDA_VISIBLE_DEVICES


def resolve_world_size(gpus, device):
    """--gpus auto|N and --device -> number of ranks. auto: every visible CUDA device (1 on CPU or with --device
    cuda:N); N > 1 with --device cpu: N gloo processes (how the tests exercise this path)."""
    text = str(gpus).strip().lower()
    if text != "auto":
        try:
            n = int(text)
        except ValueError:
            raise UsageError(f"--gpus {gpus}: expected auto or a whole number >= 1") from None
        if n < 1:
            raise UsageError(f"--gpus {gpus}: expected auto or a whole number >= 1")
    if device == "cpu":
        return 1 if text == "auto" else n
    if device.startswith("cuda:"):
        if text not in ("auto", "1"):
            raise UsageError(f"--device {device} picks one GPU; with --gpus {gpus} use --device cuda (or auto)")
        return 1
    count = visible_cuda_devices()
    if count == 0:
        if text not in ("auto", "1"):
            warn(f"--gpus {gpus} asked for, but no CUDA GPU is visible: running one process")
        return 1
    if text == "auto":
        return count
    if n > count:
        warn(f"--gpus {n} asked for, but {count} CUDA device(s) are visible: using {count}")
    return min(n, count)


def rank_device(ctx, device):
    """The device string a rank runs on: cuda:LOCAL_RANK for CUDA runs of several ranks, else --device as given."""
    if ctx.distributed and device != "cpu":
        return f"cuda:{ctx.local_rank}"
    return device


def split_batch(batch_size, batch_per_gpu, world_size):
    """-> per-rank batch. The global batch_size is split over the ranks (same recipe, same step count), unless
    batch_per_gpu > 0 keeps that many per rank (global batch = batch_per_gpu x ranks)."""
    if batch_per_gpu > 0:
        return batch_per_gpu
    if batch_size % world_size:
        raise UsageError(f"batch_size {batch_size} does not split over {world_size} ranks: pick a multiple of "
                         f"{world_size}, or --set batch_per_gpu=N")
    return batch_size // world_size


# starting the ranks


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankStderr:
    """stderr of a rank other than 0: every line prefixed with its rank (it prints nothing else)."""

    def __init__(self, stream, rank):
        self.stream, self.prefix, self.at_line_start = stream, f"[rank {rank}] ", True

    def write(self, text):
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def flush(self):
        self.stream.flush()


def quiet_worker_output(rank):
    """Ranks other than 0 log nothing: stdout goes nowhere, stderr (errors) is prefixed with the rank. The OS-level
    stream is used: in a notebook, a forked child's fd 2 is still forwarded to the cell by ipykernel."""
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _RankStderr(sys.__stderr__ or open(os.devnull, "w"), rank)


def _die_with_parent():
    """Linux: this worker gets SIGKILL when the process that forked it dies (no orphan keeps a GPU)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def fork_workers(world_size, target):
    """Fork ranks 1..world_size-1, each running target(DistContext) in the child (with fork no pickling: a notebook's
    functions work). -> rank 0's DistContext; a one-rank DistContext (after a warning) when CUDA is already initialised
    in this process (a notebook that ran CUDA code before this cell): a forked child could not use it."""
    if torch.cuda.is_initialized():
        warn("CUDA is already initialised in this process (an earlier cell used the GPU), so no worker can be forked: "
             "running one process on one GPU; restart the notebook's kernel to use every GPU")
        return DistContext()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_free_port())
    ctx_fork = multiprocessing.get_context("fork")
    workers = []

    def child(rank):
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group: rank 0 decides
        quiet_worker_output(rank)
        target(DistContext(rank=rank, world_size=world_size, local_rank=rank, launcher="fork"))

    for rank in range(1, world_size):
        p = ctx_fork.Process(target=child, args=(rank,), name=f"dogs-gan-rank{rank}", daemon=True)
        p.start()
        workers.append(p)
    return DistContext(rank=0, world_size=world_size, local_rank=0, launcher="fork", workers=workers)


def init_group(ctx, *, backend):
    """init_process_group (env:// : torchrun's or fork_workers' MASTER_ADDR/PORT) and a barrier proving every rank is
    there. -> True; False (rank 0, after a warning) when the group cannot be formed: the run goes on as one process."""
    if backend == "nccl":  # a collective that times out raises on the host (BLOCKING_WAIT) instead of killing rank 0
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # 2 = abort the communicators, keep the process
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    try:
        if backend == "nccl":
            torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size,
                                timeout=datetime.timedelta(seconds=DIST_SETUP_TIMEOUT_S))
        dist.barrier()
        return True
    except Exception as exc:
        if ctx.rank != 0 or ctx.launcher == "torchrun":
            raise
        warn(f"the {ctx.world_size} ranks could not start ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}): "
             "running one process on one device")
        stop_workers(ctx)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return False


def make_training_group(ctx, timeout_s):
    """The group DDP and the stop decisions use: same ranks, a collective timeout of timeout_s (a collective call on
    every rank)."""
    ctx.group = dist.new_group(list(range(ctx.world_size)), timeout=datetime.timedelta(seconds=timeout_s))
    return ctx.group


def training_timeout(finish_s, checkpoint_s):
    """The training group's timeout: longer than rank 0's longest pause between collectives (a checkpoint), shorter
    than half the finish reserve, so a dead rank is noticed with most of the reserve left."""
    return min(max(DIST_TIMEOUT_MIN_S, 3 * checkpoint_s + 5.0), max(DIST_TIMEOUT_MIN_S, min(DIST_TIMEOUT_MAX_S,
                                                                                         0.5 * finish_s)))


def broadcast_object(ctx, obj):
    """Rank 0's obj to every rank (default group) -> obj."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# the decisions of the training loop


def agree(ctx, *, stop, progress, interval, device, interrupted=False):
    """One all-reduce at a host sync: rank 0's stop reason (index into STOP_CODES), progress and steps to the next sync,
    plus a vote from any other rank that was asked to stop. -> (stop reason or "", progress, interval)."""
    if ctx.is_main:
        vals = [float(STOP_CODES.index(stop)), float(progress), float(interval)]
    else:
        vals = [INTERRUPT_VOTE if interrupted else 0.0, 0.0, 0.0]
    t = torch.tensor(vals, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=ctx.group)
    code, progress, interval = t.tolist()
    own = int(code) % INTERRUPT_VOTE
    reason = STOP_CODES[own] if own else ("interrupted" if code >= INTERRUPT_VOTE else "")
    return reason, progress, max(int(interval), 1)


def sync_buffers(ctx, modules):
    """Every buffer (BatchNorm running statistics, spectral-norm u/v) from rank 0 to all ranks."""
    for m in modules:
        for b in m.buffers():
            dist.broadcast(b, src=0, group=ctx.group)


# faults and the end


def record_failure(error):
    """A rank other than 0 that fails says why in the store rank 0 hosts (readable after the group broke)."""
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        store.set(f"dogs-gan/error/{dist.get_rank()}", str(error)[:500])


def failed_ranks(ctx, wait_s=2.0):
    """Rank 0, after the group broke: -> {rank: why} for the ranks that died or reported an error."""
    why = {}
    for i, p in enumerate(ctx.workers, start=1):
        p.join(wait_s if i == 1 else 0.2)
        if p.exitcode is not None and p.exitcode < 0:
            why[i] = f"killed by {signal.Signals(-p.exitcode).name}"
        elif p.exitcode not in (None, 0):
            why[i] = f"exited with code {p.exitcode}"
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=1))
        for r in range(1, ctx.world_size):
            key = f"dogs-gan/error/{r}"
            with contextlib.suppress(Exception):
                if store.check([key]):
                    why[r] = store.get(key).decode(errors="replace") + (f" ({why[r]})" if r in why else "")
    return why


def dead_workers(ctx):
    """Rank 0 of a forked run: the ranks whose process has already ended (checked before each decision)."""
    return [i for i, p in enumerate(ctx.workers, start=1) if p.exitcode is not None]


def stop_workers(ctx, wait_s=WORKER_JOIN_S):
    """Rank 0: wait for the forked ranks to exit (they stop at the same decision), then terminate any left."""
    for p in ctx.workers:
        p.join(wait_s)
    for p in ctx.workers:
        if p.is_alive():
            p.terminate()
            p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def end_group(ctx):
    """Leave the process group (a notebook may run the kernel again in the same process)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    ctx.group = None
