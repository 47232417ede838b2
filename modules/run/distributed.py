"""Several ranks through torch.distributed: DistContext, the process groups, rank 0's handling of a failed rank.
Two groups: the default one (long timeout) for the setup, the training group (short timeout, inside the finish reserve)
for DDP and the stop decisions, so a dead or hung rank costs at most that timeout. Ranks start by torchrun, or are
forked here after the data is read and before CUDA is initialised (`spawn` could not import a notebook's __main__).
"""
import contextlib
import ctypes
import datetime
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.torch_version import TorchVersion

from modules.recipe.utils import UsageError, warn


DIST_SETUP_TIMEOUT_S = 300.0  # default group: the start, and the others waiting while rank 0 plans
DIST_SETUP_BUDGET_FRACTION = 0.5  # ... at most this fraction of the budget left when the group starts
WATCH_POLL_S = 0.2  # rank 0 of a forked run looks at its workers' processes this often (start and training)
DIST_TIMEOUT_MIN_S = 10.0  # training group's collective timeout: never shorter (a checkpoint on rank 0 must fit)
DIST_TIMEOUT_MAX_S = 120.0
WORKER_JOIN_S = 10.0  # rank 0 waits this long for its workers to exit before it kills them
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
    watch: object = None  # fork, rank 0 while training: the Event that stops watch_workers' thread

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

    def agree(self, *, stop, progress, interval, device, interrupted):
        """One all-reduce: rank 0's stop reason, progress and steps to the next sync, plus the other ranks' interrupt
        votes. -> (stop reason or "", progress, interval)."""
        if not self.distributed:
            return stop, progress, interval
        if self.is_main:
            vals = [float(STOP_CODES.index(stop)), float(progress), float(interval)]
        else:
            vals = [INTERRUPT_VOTE if interrupted else 0.0, 0.0, 0.0]
        t = torch.tensor(vals, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.group)
        code, progress, interval = t.tolist()
        own = int(code) % INTERRUPT_VOTE
        reason = STOP_CODES[own] if own else ("interrupted" if code >= INTERRUPT_VOTE else "")
        return reason, progress, max(int(interval), 1)

    def sync_buffers(self, modules):
        """Rank 0's buffers (BatchNorm statistics, spectral-norm u/v) to all ranks: one broadcast per dtype."""
        if not self.distributed:
            return
        by_dtype = {}
        for m in modules:
            for b in m.buffers():
                by_dtype.setdefault((b.dtype, b.device), []).append(b)
        for bufs in by_dtype.values():
            flat = _flatten_dense_tensors(bufs)
            dist.broadcast(flat, src=0, group=self.group)
            for b, synced in zip(bufs, _unflatten_dense_tensors(flat, bufs)):
                b.copy_(synced)

    def broadcast(self, obj):
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def dead_workers(self):
        return [i for i, p in enumerate(self.workers, start=1) if p.exitcode is not None]

    def mark_broken(self, error):
        """No collective is made after a possible failure. -> the reason kept ("" with one rank: no group to break)."""
        if self.distributed:
            self.broken = self.broken or error
        return self.broken


def nccl_error_env(torch_version):
    """-> the environment that makes a dead rank raise on rank 0 instead of hanging it: the watchdog aborts the failed
    communicators and keeps the process (2; 1 would kill it, and the zip with it); blocking wait off, or DDP's
    all-reduces would never see the error. torch 2.2 renamed NCCL_* to TORCH_NCCL_*."""
    prefix = "TORCH_NCCL_" if TorchVersion(torch_version) >= (2, 2) else "NCCL_"
    return {prefix + "ASYNC_ERROR_HANDLING": "2", prefix + "BLOCKING_WAIT": "0"}


def init_group(ctx, *, backend, remaining_s):
    """init_process_group and a barrier, within a timeout that leaves half the budget to run alone. -> True; False
    (rank 0, warned) when the group cannot form: the run goes on as one process; another rank: UsageError."""
    setup_s = max(DIST_TIMEOUT_MIN_S, min(DIST_SETUP_TIMEOUT_S, DIST_SETUP_BUDGET_FRACTION * remaining_s))
    timeout = datetime.timedelta(seconds=setup_s)
    if backend == "nccl":
        os.environ.update(nccl_error_env(torch.__version__))  # read when the NCCL group is made
    try:
        store = None
        if ctx.launcher == "fork":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size,
                                  ctx.is_main, timeout=timeout, wait_for_workers=False)
            if ctx.is_main:
                wait_for_workers(ctx, store, setup_s)
            else:
                store.set(f"dogs-gan/up/{ctx.rank}", "1")
        elif not ctx.is_main:  # torchrun's ranks 1..N-1: a rank 0 that never listens ends the wait in one line
            wait_for_master(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), setup_s)
        dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
        dist.barrier()
        return True
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if ctx.rank != 0:
            raise UsageError(f"rank {ctx.rank} could not join the {ctx.world_size} ranks ({why})") from None
        warn(f"the {ctx.world_size} ranks could not start ({why}): running one process on one device")
        stop_workers(ctx)
        end_group(ctx)
        return False


def wait_for_master(addr, port, timeout_s):
    """A torchrun rank other than 0: until rank 0 listens (torch's store client would retry for twice the timeout and
    log C++ stack frames). RuntimeError after timeout_s."""
    t_end = time.monotonic() + timeout_s
    while time.monotonic() < t_end:
        with contextlib.suppress(OSError), socket.create_connection((addr, port), timeout=1.0):
            return
        time.sleep(WATCH_POLL_S)
    raise RuntimeError(f"nothing answered at {addr}:{port} within {timeout_s:.0f}s")


def wait_for_workers(ctx, store, timeout_s):
    """Rank 0 of a forked run: until every worker signed in (init_process_group would wait for a dead one until the
    timeout). RuntimeError when one has ended or timeout_s passed."""
    keys, t_end = [f"dogs-gan/up/{r}" for r in range(1, ctx.world_size)], time.monotonic() + timeout_s
    while not store.check(keys):
        if dead := ctx.dead_workers():
            raise RuntimeError(f"rank(s) {dead} ended before the group formed")
        if time.monotonic() > t_end:
            raise RuntimeError(f"the workers did not sign in within {timeout_s:.0f}s")
        time.sleep(WATCH_POLL_S / 4)


def make_training_group(ctx, timeout_s):
    """The group of DDP and the stop decisions (called on every rank)."""
    ctx.group = dist.new_group(list(range(ctx.world_size)), timeout=datetime.timedelta(seconds=timeout_s))
    return ctx.group


def watch_workers(ctx):
    """Rank 0 of a forked run, while it trains: a thread that aborts the process groups when a worker ends with an
    error, so that rank 0's collective raises (on NCCL it would stall behind an all-reduce that never completes);
    stop_workers stops it."""
    stop = threading.Event()

    def watch():
        while not stop.wait(WATCH_POLL_S):
            failed = [i for i, p in enumerate(ctx.workers, start=1) if p.exitcode not in (None, 0)]
            if failed:
                warn(f"rank(s) {failed} ended during training: aborting the process groups")
                ctx.mark_broken(f"rank(s) {failed} ended")
                abort_groups(ctx)
                return

    if ctx.workers:
        threading.Thread(target=watch, name="dogs-gan-watch", daemon=True).start()
    ctx.watch = stop


def abort_groups(ctx):
    """Abort the NCCL communicators of both groups (abort(), or _shutdown() where the binding lacks it), failing the
    collectives that wait on them. Gloo needs none: a dead peer's closed connection fails them."""
    for group in (ctx.group, dist.group.WORLD if dist.is_initialized() else None):
        with contextlib.suppress(Exception):
            if group is not None and dist.get_backend(group) == "nccl":
                backend = group._get_backend(torch.device("cuda"))
                (getattr(backend, "abort", None) or backend._shutdown)()


def training_timeout(finish_s, checkpoint_s):
    """Longer than rank 0's longest pause between collectives (a checkpoint), within half the finish reserve."""
    return max(DIST_TIMEOUT_MIN_S, min(3 * checkpoint_s + 5.0, DIST_TIMEOUT_MAX_S, 0.5 * finish_s))


# faults and the end

def record_failure(error):
    """A failing rank other than 0 says why in rank 0's store (readable after the group broke)."""
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        store.set(f"dogs-gan/error/{dist.get_rank()}", str(error)[:500])


def failed_ranks(ctx):
    """Rank 0, after the group broke: -> {rank: why} for the ranks that died or reported an error."""
    why = {}
    for i, p in enumerate(ctx.workers, start=1):
        p.join(2.0 if i == 1 else 0.2)  # the first join gives them all time to end
        if p.exitcode is not None and p.exitcode < 0:
            why[i] = f"killed by {signal.Signals(-p.exitcode).name}"
        elif p.exitcode not in (None, 0):
            why[i] = f"exited with code {p.exitcode}"
    with contextlib.suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(datetime.timedelta(seconds=1))
        for r in range(1, ctx.world_size):
            if store.check([key := f"dogs-gan/error/{r}"]):
                why[r] = store.get(key).decode(errors="replace") + (f" ({why[r]})" if r in why else "")
    return why


def stop_workers(ctx, wait_s=WORKER_JOIN_S):
    """Rank 0: the watcher stopped, the forked ranks waited for (they stop at the same decision), any left killed."""
    if ctx.watch is not None:
        ctx.watch.set()
    for p in ctx.workers:
        p.join(wait_s)
    for p in ctx.workers:
        if p.is_alive():
            p.kill()
            p.join(2.0)


def end_group(ctx):
    """Leave the process group (a notebook may run the kernel again in this process)."""
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    ctx.group = None


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
    if missing := [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not os.environ.get(k)]:
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
        for piece in text.splitlines(keepends=True):
            self.stream.write((self.prefix if self.at_line_start else "") + piece)
            self.at_line_start = piece.endswith("\n")
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

    def child(rank):
        _die_with_parent()
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the group: rank 0 decides
        quiet_worker_output(rank)
        target(DistContext(rank=rank, world_size=world_size, local_rank=rank, launcher="fork"))

    workers = [ctx_fork.Process(target=child, args=(r,), name=f"dogs-gan-rank{r}", daemon=True)
               for r in range(1, world_size)]
    for p in workers:
        p.start()
    return DistContext(rank=0, world_size=world_size, local_rank=0, launcher="fork", workers=workers)
