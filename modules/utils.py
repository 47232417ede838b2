"""Small shared helpers: logging, seeding, durations, the run Deadline, device and precision checks.

Nothing here reads the Config; every function takes explicit arguments.
"""
import contextlib
import functools
import os
import random
import re
import sys
import time

import numpy as np
import torch

# helpers

PROCESS_START = time.monotonic()  # the moment the kernel started; the Deadline counts from here


class UsageError(Exception):
    """A problem the user can fix (bad flag, no data, unusable GPU). main() prints it as one line and exits 2."""


def log(msg):
    """One timestamped line, flushed at once so Kaggle's log viewer shows it live. Its clock is the Deadline's: seconds
    since process_start(), so the log and the messages that quote the Deadline agree."""
    elapsed = time.monotonic() - process_start()
    print(f"[{format_duration(elapsed):>8}] {msg}", flush=True)


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


_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text):
    """'9h', '90m', '600s', '8h30m', '1h2m3s' or plain seconds ('3600', '12.5') -> seconds (float > 0)."""
    s = str(text).strip().lower().replace(" ", "")
    try:
        value = float(s)
    except ValueError:
        m = _DURATION_RE.match(s)
        if not s or m is None or not any(m.groups()):
            raise UsageError(f"cannot read duration {text!r}: use e.g. 9h, 90m, 600s, 8h30m or plain seconds") from None
        h, mi, se = (float(g) if g else 0.0 for g in m.groups())
        value = h * 3600 + mi * 60 + se
    if value <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    return value


FAULT_RE = re.compile(r"(nan|raise|kill)@\d+|slow@\d+(\.\d*)?|slowgen@\d+(\.\d*)?|zipfail")  # Config.fault items (tests)


def parse_faults(text):
    """Config.fault ('nan@12,slow@0.5', comma-separated; tests only) -> {kind: number} (-1.0 for a kind without one).
    nan@STEP, raise@STEP: at that step; kill@STEP: rank 1 of several dies by SIGKILL then; slow@SECONDS: sleep per training step; slowgen@SECONDS: sleep per generation
    batch once training has started (a finish slower than at start); zipfail: a corrupt zip. Else a UsageError."""
    faults = {}
    for item in filter(None, (f.strip() for f in str(text).split(","))):
        if not FAULT_RE.fullmatch(item):
            raise UsageError(f"--set fault={text}: {item!r} is not nan@STEP, raise@STEP, kill@STEP, slow@SECONDS, "
                             "slowgen@SECONDS or zipfail")
        kind, _, at = item.partition("@")
        faults[kind] = float(at) if at else -1.0
    return faults


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@functools.lru_cache(maxsize=None)
def process_start():
    """time.monotonic() of the moment this process started (interpreter and imports included), read from /proc on Linux;
    in a notebook, or where /proc is missing, the moment the kernel's code began (its first import)."""
    if in_notebook():
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

    def __repr__(self):
        return f"Deadline({format_duration(self.budget_s)}, {format_duration(self.remaining())} left)"


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
    """`with atomic_file(path) as f: f.write(...)`: written to tmp (default path.tmp), flushed to the disk, checked by
    verify(tmp) if given, then renamed over path; on any failure (an interrupt too) tmp is removed and whatever was at
    path stays as it was, so a reader sees the old file or the new one, never half of one."""
    tmp = str(tmp or f"{path}.tmp")
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
    """Pick the device and prove it works: a tiny CUDA op in the first seconds.

    A torch built without kernels for this GPU (e.g. a P100, sm_60, under a torch built for sm_70+) fails here with a
    UsageError that names the GPU, the archs this torch has, and what to do.
    """
    if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
        if want == "auto":
            warn("no CUDA GPU found: running on CPU, which is far too slow for a real run (fine for smoke/demo)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"device {want!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    dev = torch.device("cuda" if want == "auto" else want)
    name = torch.cuda.get_device_name(dev)
    major, minor = torch.cuda.get_device_capability(dev)
    archs = torch.cuda.get_arch_list()
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
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def in_notebook():
    return "ipykernel" in sys.modules
