"""How many ranks a run has (`--gpus auto|N`) and how they start: torchrun's environment, or ranks 1..N-1 forked by
this process after the data is read and before CUDA is initialised (`spawn` could not import a notebook's __main__)."""
import contextlib
import ctypes
import multiprocessing
import os
import signal
import socket
import sys

import torch

from modules.recipe.utils import UsageError, warn
from modules.run.distributed import DistContext


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
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(k)]
    if missing:
        raise UsageError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: start the ranks with torchrun, "
                         "or unset RANK and WORLD_SIZE to let the kernel start them")
    return DistContext(rank=rank, world_size=world, local_rank=local, launcher="torchrun")  # its world, even of 1


def visible_cuda_devices():
    """CUDA devices this process may use, counted through NVML without initialising CUDA (a fork stays safe)."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # read by torch at each call
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_world_size(gpus, device):
    """--gpus auto|N and --device -> number of ranks. auto: every visible CUDA device (1 on CPU or with --device
    cuda:N); N with --device cpu: N gloo processes (how the tests exercise this path)."""
    n = None if gpus == "auto" else int(gpus)
    if device == "cpu":
        return n or 1
    if device.startswith("cuda:"):
        if n not in (None, 1):
            raise UsageError(f"--device {device} picks one GPU; with --gpus {gpus} use --device cuda (or auto)")
        return 1
    count = visible_cuda_devices()
    usable = max(count, 1)  # no GPU: one process (on the CPU)
    if n is not None and n > usable:
        warn(f"--gpus {n} asked for, but {count} CUDA device(s) are visible: running {usable} process(es)")
    return usable if n is None else min(n, usable)


def rank_device(ctx, device):
    """cuda:LOCAL_RANK for CUDA runs of several ranks, made current before anything touches CUDA (no rank creates a
    context on GPU 0), else --device as given."""
    if ctx.distributed and device != "cpu":
        try:
            torch.cuda.set_device(ctx.local_rank)
        except Exception as exc:
            raise UsageError(f"rank {ctx.rank} cannot use cuda:{ctx.local_rank} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
        return f"cuda:{ctx.local_rank}"
    return device


# starting the ranks

def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _RankStderr:
    """stderr of a rank other than 0: every line prefixed with its rank."""

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
    """Ranks other than 0 log nothing; their errors go to fd 2 (a notebook's forked child: still shown in the cell)."""
    sys.stdout = open(os.devnull, "w")
    sys.stderr = _RankStderr(sys.__stderr__ or open(os.devnull, "w"), rank)


def _die_with_parent():
    """Linux: SIGKILL when the parent dies (no orphan keeps a GPU)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def cuda_driver_initialised():
    """Whether the CUDA driver is initialised here (a forked child could not use it), which torch.cuda.is_initialized()
    misses after an earlier cell's is_available(). cuCtxGetCurrent answers 3 (NOT_INITIALIZED) before cuInit."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    current = ctypes.c_void_p()
    return libcuda.cuCtxGetCurrent(ctypes.byref(current)) != 3


def fork_workers(world_size, target, *, cuda):
    """Fork ranks 1..world_size-1, each running target(DistContext) (no pickling: a notebook's functions work). -> rank
    0's DistContext; one rank (warned) when CUDA is already initialised here: a forked child could not use it."""
    if torch.cuda.is_initialized() or (cuda and cuda_driver_initialised()):
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
