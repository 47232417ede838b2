"""Several GPUs in one run, through torch.distributed: who a process is in the run (DistContext) and the few
collectives the training loop agrees through, the process groups, and what rank 0 does when another rank fails. How
many ranks there are and how they start is launch.py's.

Ways in (launch.py):
- torchrun (or any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT): every rank is a process of
  its own, we start nothing;
- `python kernel.py` or a notebook cell with --gpus N > 1: this process is rank 0 and *forks* ranks 1..N-1 after the data
  is loaded (they share the uint8 crops copy-on-write) and before CUDA is initialised anywhere: `spawn` would have to
  import the notebook's `__main__`, which it cannot. The devices are counted through NVML
  (PYTORCH_NVML_BASED_CUDA_CHECK=1), which does not initialise CUDA, as Accelerate's notebook_launcher does;
- --gpus 1 (or one visible device): one process and no process group at all; the DistContext's collectives then
  return their local values, so the training loop has a single path.

Two process groups: the default one (long timeout) for the setup, where rank 0 alone measures the finish reserve while
the others wait; and the training group (short timeout, well inside the finish reserve) that carries DDP's all-reduces
and the stop decisions, so a dead or hung rank costs at most that timeout.
"""
import contextlib
import datetime
import os
import signal
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from modules.utils import warn

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

    # the few collectives of a run: with one rank each returns the local value (no group exists), so the training
    # loop has one path for any number of ranks

    def agree(self, *, stop, progress, interval, device, interrupted):
        """One all-reduce at a host sync: rank 0's stop reason (index into STOP_CODES), progress and steps to the next
        sync, plus a vote from any other rank that was asked to stop. -> (stop reason or "", progress, interval)."""
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
        """Every buffer (BatchNorm running statistics, spectral-norm u/v) from rank 0 to all ranks: one broadcast per
        dtype of the buffers flattened together (one by one, ~130 small broadcasts each cost a round trip)."""
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
        """Rank 0's obj to every rank (default group) -> obj."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def dead_workers(self):
        """Rank 0 of a forked run: the ranks whose process has already ended (checked before each decision)."""
        return [i for i, p in enumerate(self.workers, start=1) if p.exitcode is not None]

    def mark_broken(self, error):
        """A collective may have failed (a dead rank, an interrupt mid-collective): none is made after this. -> the
        reason kept ("" with one rank: there is no group to break)."""
        if self.distributed:
            self.broken = self.broken or error
        return self.broken


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
