"""Several GPUs in one run, through torch.distributed: who a process is in the run (DistContext) and the few
collectives the training loop agrees through, the process groups, and what rank 0 does when another rank fails. How
many ranks there are and how they start is launch.py's.

Ways in (launch.py): torchrun, every rank a process of its own; `python kernel.py` or a notebook cell with --gpus N > 1,
where this process is rank 0 and *forks* ranks 1..N-1 after the data is loaded (they share the uint8 crops
copy-on-write) and before CUDA is initialised anywhere (`spawn` would have to import the notebook's `__main__`, which
it cannot); one rank: no process group at all, and the DistContext's collectives return their local values, so the
training loop has a single path.

Two process groups: the default one (setup_timeout: long, but bounded by the budget) for the setup, where rank 0 alone
measures the finish reserve while the others wait; and the training group (short timeout, well inside the finish
reserve) that carries DDP's all-reduces and the stop decisions, so a dead or hung rank costs at most that timeout. On
NCCL a dead rank must make rank 0's collectives raise, not hang: async error handling (nccl_error_env) and, in a forked
run, rank 0's watcher of its workers (watch_workers), which aborts the groups when one dies.
"""
import contextlib
import datetime
import os
import re
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from modules.recipe.utils import UsageError, warn

DIST_SETUP_TIMEOUT_S = 300.0  # default group: the start, and the others waiting while rank 0 measures the finish reserve
DIST_SETUP_BUDGET_FRACTION = 0.5  # ... at most this fraction of the budget left when the group starts
WATCH_POLL_S = 0.2  # rank 0 of a forked run looks at its workers' processes this often (start and training)
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
    watch: object = None  # fork, rank 0 while training: the Event that stops watch_workers' thread

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def distributed(self):
        return self.world_size > 1

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


def setup_timeout(remaining_s):
    """The default group's timeout (rendezvous, and the other ranks waiting while rank 0 plans): DIST_SETUP_TIMEOUT_S,
    but at most DIST_SETUP_BUDGET_FRACTION of the budget left, so peers that never come leave time to run alone."""
    return max(DIST_TIMEOUT_MIN_S, min(DIST_SETUP_TIMEOUT_S, DIST_SETUP_BUDGET_FRACTION * remaining_s))


def nccl_error_env(torch_version):
    """The environment that makes a dead rank raise on rank 0 instead of hanging it -> {name: value}. ProcessGroupNCCL's
    watchdog aborts the communicators of a collective that failed or timed out (2 = abort them and keep the process,
    which still ships the zip; 1 would kill it) and the next collective raises. Blocking wait stays off: with it on,
    the async handling is not used and the host notices only in an explicit wait(), which DDP's all-reduces never
    get. torch 2.2 renamed the variables: before it they are NCCL_*, from it TORCH_NCCL_*."""
    major, minor = (int(x) for x in re.match(r"(\d+)\.(\d+)", torch_version).groups())
    prefix = "TORCH_NCCL_" if (major, minor) >= (2, 2) else "NCCL_"
    return {prefix + "ASYNC_ERROR_HANDLING": "2", prefix + "BLOCKING_WAIT": "0"}


def init_group(ctx, *, backend, remaining_s):
    """init_process_group and a barrier proving every rank is there, within setup_timeout(remaining_s). A forked run:
    rank 0 hosts the store and waits for its workers to sign in, watching their processes (a worker that dies at once
    ends the wait in WATCH_POLL_S); torchrun: env:// (its MASTER_ADDR/PORT). -> True; False (rank 0, after a warning)
    when the group cannot be formed: the run goes on as one process. A rank other than 0 that cannot join:
    UsageError."""
    timeout = datetime.timedelta(seconds=setup_timeout(remaining_s))
    if backend == "nccl":
        os.environ.update(nccl_error_env(torch.__version__))  # read when the NCCL group is made
    try:
        store = None
        if ctx.launcher == "fork":
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), ctx.world_size,
                                  ctx.is_main, timeout=timeout, wait_for_workers=False)
            if ctx.is_main:
                wait_for_workers(ctx, store, timeout.total_seconds())
            else:
                store.set(f"dogs-gan/up/{ctx.rank}", "1")
        elif not ctx.is_main:  # torchrun's ranks 1..N-1: a rank 0 that never listens ends the wait in one line
            wait_for_master(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), timeout.total_seconds())
        dist.init_process_group(backend, store=store, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
        dist.barrier()
        return True
    except Exception as exc:
        why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if ctx.rank != 0:
            raise UsageError(f"rank {ctx.rank} could not join the {ctx.world_size} ranks ({why})") from None
        warn(f"the {ctx.world_size} ranks could not start ({why}): running one process on one device")
        stop_workers(ctx)
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
        return False


def wait_for_master(addr, port, timeout_s):
    """A torchrun rank other than 0, before init_process_group: until something listens at MASTER_ADDR:MASTER_PORT.
    torch's store client would retry for up to twice the timeout and log C++ stack frames; here the wait is bounded
    and ends in one line. Raises RuntimeError when nothing answered within timeout_s."""
    t_end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((addr, port), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > t_end:
                raise RuntimeError(f"nothing answered at {addr}:{port} within {timeout_s:.0f}s") from None
            time.sleep(WATCH_POLL_S)


def wait_for_workers(ctx, store, timeout_s):
    """Rank 0 of a forked run: until every worker has signed in to the store (before init_process_group, which would
    wait for a dead one until the timeout); raises RuntimeError when one has ended or timeout_s passed."""
    keys, t_end = [f"dogs-gan/up/{r}" for r in range(1, ctx.world_size)], time.monotonic() + timeout_s
    while not store.check(keys):
        if dead := ctx.dead_workers():
            raise RuntimeError(f"rank(s) {dead} ended before the group formed")
        if time.monotonic() > t_end:
            raise RuntimeError(f"the workers did not sign in within {timeout_s:.0f}s")
        time.sleep(WATCH_POLL_S / 4)


def make_training_group(ctx, timeout_s):
    """The group DDP and the stop decisions use: same ranks, collective timeout timeout_s (called on every rank)."""
    ctx.group = dist.new_group(list(range(ctx.world_size)), timeout=datetime.timedelta(seconds=timeout_s))
    return ctx.group


def watch_workers(ctx, *, abort=None):
    """Rank 0 of a forked run, while it trains: a thread that notices a worker whose process ended with an error (a
    kill, a crash; 0 is a normal end) within WATCH_POLL_S, says so and aborts the process groups (abort_groups), so that
    the collective rank 0 is in, or its next one, raises at once: on NCCL a dead peer would otherwise stall rank 0's
    stream behind an all-reduce that never completes. -> the threading.Event that stops the thread (stop_watch)."""
    abort = abort or abort_groups
    stop = threading.Event()

    def watch():
        while not stop.wait(WATCH_POLL_S):
            failed = [i for i, p in enumerate(ctx.workers, start=1) if p.exitcode not in (None, 0)]
            if failed:
                warn(f"rank(s) {failed} ended during training: aborting the process groups")
                ctx.mark_broken(f"rank(s) {failed} ended")
                abort(ctx)
                return

    if ctx.workers:
        threading.Thread(target=watch, name="dogs-gan-watch", daemon=True).start()
    ctx.watch = stop
    return stop


def stop_watch(ctx):
    """Stop watch_workers' thread (before rank 0 ends the workers itself)."""
    if ctx.watch is not None:
        ctx.watch.set()


def abort_groups(ctx):
    """Abort the NCCL communicators of the training and default groups (ProcessGroupNCCL's abort() where the binding
    has it, else its _shutdown()): the collectives waiting on them fail. Gloo needs none: a dead peer's closed
    connection already fails its collectives. -> how many backends were aborted."""
    done = 0
    for group in (ctx.group, dist.group.WORLD if dist.is_initialized() else None):
        with contextlib.suppress(Exception):
            if group is None or dist.get_backend(group) != "nccl":
                continue
            backend = group._get_backend(torch.device("cuda"))
            fn = getattr(backend, "abort", None) or getattr(backend, "_shutdown", None)
            if fn is not None:
                fn()
                done += 1
    return done


def training_timeout(finish_s, checkpoint_s):
    """The training group's timeout: longer than rank 0's longest pause between collectives (a checkpoint), shorter
    than half the finish reserve, so a dead rank is noticed with most of the reserve left."""
    return max(DIST_TIMEOUT_MIN_S, min(3 * checkpoint_s + 5.0, DIST_TIMEOUT_MAX_S, 0.5 * finish_s))


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
