"""Small shared helpers: logging, durations, the run Deadline, atomic files, device checks."""
import contextlib
import functools
import os
import random
import stat
import sys
import time

import numpy as np
import torch

from modules.recipe.config import UsageError, parse_duration, parse_faults

# helpers

PROCESS_START = time.monotonic()  # the moment the kernel started; the Deadline counts from here


_DROPPED_STREAMS = set()  # id() of the streams a write failed on: nothing more is written to them


def say(text, file=None):
    """Print and flush, never raising: logging must not end a run. A stream that fails (a closed pipe) is dropped; if
    it is fd 1 or 2, it is pointed at /dev/null (as Python's docs on SIGPIPE advise), so the exit flush stays quiet."""
    stream = sys.stdout if file is None else file
    if stream is None or id(stream) in _DROPPED_STREAMS:
        return
    try:
        print(text, file=stream, flush=True)
    except (OSError, ValueError):  # BrokenPipeError, EIO, a closed file
        _DROPPED_STREAMS.add(id(stream))
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fd = stream.fileno()
            if fd in (1, 2):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
                os.close(devnull)


def log(msg):
    """One timestamped line on the Deadline's clock (seconds since process_start()), flushed so Kaggle shows it live."""
    elapsed = time.monotonic() - process_start()
    say(f"[{format_duration(elapsed):>8}] {msg}")


def warn(msg):
    log(f"WARNING: {msg}")


def format_duration(seconds):
    """600 -> '10m00s'; 3725 -> '1h02m05s'; 42.5 -> '42.5s'."""
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=None)
def process_start():
    """time.monotonic() at this process's start (from /proc); in a notebook or without /proc, the first import."""
    if "ipykernel" in sys.modules:
        return PROCESS_START
    try:
        with open("/proc/self/stat") as f:
            start_ticks = float(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.monotonic() - age if 0 <= age < 3600 else PROCESS_START
    except (OSError, ValueError, IndexError):
        return PROCESS_START


class Deadline:
    """The run's one clock: a budget in seconds counted from `start` (default: process start)."""

    def __init__(self, budget_s, start=None):
        self.budget_s = float(budget_s)
        self.start = PROCESS_START if start is None else start

    def elapsed(self):
        return time.monotonic() - self.start

    def remaining(self):
        return self.budget_s - self.elapsed()


class PhaseTimer:
    """Wall time per named phase: `with timer.phase("data"): ...`; timer.summary() -> 'data 3.1s, train 55.0s'."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0

    def summary(self):
        return ", ".join(f"{k} {format_duration(v)}" for k, v in self.seconds.items())


@contextlib.contextmanager
def atomic_file(path, mode="wb", *, tmp=None, verify=None):
    """Written to tmp (default path.tmpPID, one per process), flushed to the disk, checked by verify(tmp), then renamed
    over path; on any failure tmp is removed, so a reader sees the old file or the new one, never half of one."""
    tmp = str(tmp or f"{path}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def require_regular_file(path, flag, *, folder_ok=False):
    """A UsageError unless path is a regular file (or, folder_ok, a folder): a FIFO or a device would block when read.
    Checked by stat, which opens nothing; a missing path is left to the reader."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UsageError(f"{flag} {path}: {exc.strerror or exc}") from None
    if stat.S_ISREG(mode) or (folder_ok and stat.S_ISDIR(mode)):
        return
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a regular file")
    raise UsageError(f"{flag} {path} is {kind}: pass a regular file" + (" or a folder" if folder_ok else ""))


@contextlib.contextmanager
def eval_mode(model):
    """`with eval_mode(G):` the model in eval mode inside, back in the mode it had after (also on an exception)."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


# device

def check_device(want="auto"):
    """Pick the device and prove it works with a tiny CUDA op: a torch without kernels for this GPU (a P100 under a
    torch built for sm_70+) is a UsageError naming the GPU, the archs this torch has, and what to do."""
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        if want == "auto":
            warn("no CUDA GPU found: running on CPU, which is far too slow for a real run (fine for smoke/demo)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device {want!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    dev = torch.device("cuda" if want == "auto" else want)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise UsageError(f"device {want!r} does not exist: torch sees {count} CUDA GPU{'' if count == 1 else 's'} ("
                         + ("cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}")
                         + (f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")
    try:
        name = torch.cuda.get_device_name(dev)
        major, minor = torch.cuda.get_device_capability(dev)
        archs = torch.cuda.get_arch_list()
    except Exception as exc:  # a driver that fails to initialise this GPU
        raise UsageError(f"device {want!r} cannot be opened ({type(exc).__name__}: "
                         f"{(str(exc).strip().splitlines() or [''])[0][:160]})") from None
    try:
        x = torch.arange(8, device=dev, dtype=torch.float32)
        float((x * 2).sum())  # forces a real kernel launch and sync
    except Exception as exc:  # "no kernel image is available for execution on the device"
        raise UsageError(
            f"torch {torch.__version__} cannot run on {name} (sm_{major}{minor}): it has kernels for "
            f"{' '.join(archs) or 'no archs'} ({type(exc).__name__}). Pick another accelerator (Kaggle: GPU T4 x2), or "
            f"install a torch build with sm_{major}{minor} kernels (e.g. pip install torch==2.4.1 torchvision==0.19.1)"
        ) from None
    log(f"device: {name} (sm_{major}{minor}), torch {torch.__version__}")
    return dev


def cpu_count():
    """The cores this process may run on (Linux: its affinity, as on Kaggle; elsewhere, e.g. macOS: all of them)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else max(1, os.cpu_count() or 1)


OUT_OF_MEMORY_TEXTS = (  # what an allocation failure says when it is not raised as torch.cuda.OutOfMemoryError
    "out of memory",  # "CUDA error: out of memory" (RuntimeError; AcceleratorError in torch 2.8+), NCCL's "Cuda failure
    # 'out of memory'" (DistBackendError), HIP's
    "not enough memory",  # the CPU allocator: "DefaultCPUAllocator: not enough memory: you tried to allocate ..."
    "CUBLAS_STATUS_ALLOC_FAILED",  # cuBLAS could not allocate its handle or workspace
    "CUDNN_STATUS_ALLOC_FAILED",  # cuDNN up to 8
    "ALLOCATION_FAILED",  # cuDNN 9: CUDNN_STATUS_INTERNAL_ERROR_HOST_ALLOCATION_FAILED / _DEVICE_ALLOCATION_FAILED
)


def is_out_of_memory(exc):
    """An allocation failure: torch.cuda.OutOfMemoryError, MemoryError, or an error whose text says so."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return any(t.lower() in text for t in OUT_OF_MEMORY_TEXTS)
