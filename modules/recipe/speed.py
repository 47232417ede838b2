"""Speed switches: cuDNN autotuning and TF32 where they help, and torch's CPU thread count."""
import os
import time

import torch

from modules.recipe.utils import cpu_count

TF32_MIN_CAPABILITY = 8  # TF32 tensor cores: Ampere (sm_80) and later
CPU_THREADS_ONE_UP_TO = 2  # a CPU run on this many cores or fewer uses one torch thread (see choose_threads)


def configure_backends(device):
    """cuDNN autotuning on CUDA (the shapes are fixed, so the search pays once); TF32 on Ampere+. -> a log line."""
    if device.type != "cuda":
        return "cpu: no backend flags"
    torch.backends.cudnn.benchmark = True
    major, minor = torch.cuda.get_device_capability(device)
    if major < TF32_MIN_CAPABILITY:
        return f"sm_{major}{minor}: cudnn.benchmark on, no TF32"
    torch.set_float32_matmul_precision("high")  # fp32 matmuls may use TF32
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9 API
        conv.fp32_precision = "tf32"
    else:
        torch.backends.cudnn.allow_tf32 = True
    return f"sm_{major}{minor}: cudnn.benchmark on, TF32 on"


def env_threads():
    """OMP_NUM_THREADS as a positive int, or 0 when unset or not one: a thread count the user set for this process."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() else 0


def choose_threads(want, device, *, cpus, env=0):
    """torch's CPU thread count -> (n, why). want > 0: that many. Auto: a GPU run 1 (idle OpenMP threads spin against
    the data and PNG threads); a CPU run OMP_NUM_THREADS (env) if set, else 1 up to CPU_THREADS_ONE_UP_TO cores (two
    threads on 2 shared cores ran 9-11x slower under load: bench_threads.py), else all but one core (not measured)."""
    if want > 0:
        return want, "set by threads"
    if device.type == "cuda":
        return 1, "GPU run: the CPU only feeds data and PNG encoding"
    if env > 0:
        return env, "set by OMP_NUM_THREADS"
    if cpus <= CPU_THREADS_ONE_UP_TO:
        return 1, f"CPU run on {cpus} cores: one thread to start, 1 vs {cpus} measured once the model is built"
    return cpus - 1, f"CPU run on {cpus} cores: all but one"


def pick_cpu_threads(fn, *, candidates, reps=2):
    """Time fn() (one generation batch) at each thread count in `candidates`, best of reps after a warm-up, and keep
    the fastest: on 2 cores two threads were 2x faster idle, one 9x faster under load (bench_threads.py).
    -> (threads kept, {threads: seconds per call})."""
    fn()  # warm-up: first-call allocations
    times = {n: float("inf") for n in candidates}
    for _ in range(reps):
        for n in candidates:
            torch.set_num_threads(n)
            t0 = time.perf_counter()
            fn()
            times[n] = min(times[n], time.perf_counter() - t0)
    best = min(candidates, key=times.get)
    torch.set_num_threads(best)
    return best, times


def configure_threads(want, device):
    """Set torch's CPU threads (see choose_threads) -> a short description for the log."""
    n, why = choose_threads(want, device, cpus=cpu_count(), env=env_threads())
    torch.set_num_threads(n)
    return f"torch CPU threads {n} ({why})"

