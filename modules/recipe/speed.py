"""Speed switches: cuDNN autotuning and TF32 where they help, and torch's CPU thread count."""
import os
import time

import torch

from modules.recipe.utils import cpu_count

TF32_MIN_CAPABILITY = 8  # TF32 tensor cores: Ampere (sm_80) and later
CPU_THREADS_ONE_UP_TO = 2  # a CPU run on this many cores or fewer uses one torch thread (see choose_threads)


def configure_backends(device):
    """cuDNN autotuning on CUDA (the shapes are fixed, so the search pays once); TF32 matmuls/convs on Ampere+.
    Nothing on CPU. Returns a short description for the log."""
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
    """torch's CPU thread count -> (n, why). want > 0: that many (Config.threads, --set threads=N). Auto (0): on a GPU
    run 1, since the CPU only feeds data and PNG encoding, which have their own threads, and idle OpenMP threads spin
    against those; on a CPU run 1 up to CPU_THREADS_ONE_UP_TO cores (measured: tests/bench/bench_threads.py; two OpenMP
    threads on 2 shared cores ran a generation batch 9x and a step 11x slower than one, under load), else all but one
    core (not measured). env: OMP_NUM_THREADS (env_threads()), which a CPU run keeps instead of choosing (the user, or
    jobs sharing the cores, set it); a GPU run keeps 1, since environments may set it for other reasons."""
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
    """A CPU run with automatic threads: time fn() (one generation batch) at each thread count in `candidates`, in turn,
    reps times after a warm-up, and keep the fastest (best of its reps). On an idle 2-core machine two threads ran a
    smoke generation batch about 2x faster than one; with another process busy, one was 9x faster (bench_threads.py):
    so measure rather than guess. -> (threads kept, {threads: seconds per call})."""
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

