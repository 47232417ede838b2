"""Precision: the autocast dtype a run trains and samples in (Config.amp), the GradScalers fp16 needs, and their
descriptions for the log and report.json.

Speed switches: cuDNN autotuning and TF32 where they help, and torch's CPU thread count.
"""
import os
import time
import warnings

import torch
import torch.nn.functional as F

from modules.recipe.utils import UsageError, cpu_count


AMP_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # Config.amp's forced choices
BF16_MIN_CAPABILITY = 8  # bf16 tensor cores and cuDNN's bf16 convolutions: Ampere (sm_80) and later


def resolve_amp(amp, device):
    """Config.amp -> autocast dtype or None (fp32). auto: on CUDA fp16 (+ GradScalers), bf16 from sm_80; on the CPU
    fp32. fp16 / bf16: that dtype on any device (so the GPU's path can be tested on the CPU), or a UsageError where
    this torch or device cannot run it."""
    if amp == "off":
        return None
    if amp == "auto":
        if device.type != "cuda":
            return None
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 and torch.cuda.is_bf16_supported() else torch.float16
    dtype = AMP_DTYPES[amp]
    problem = _amp_problem(dtype, device)
    if problem:
        raise UsageError(f"setting amp={amp} cannot be used on {device.type} with torch {torch.__version__}: {problem}; "
                         "use amp=auto or amp=off")
    return dtype


def _amp_problem(dtype, device):
    """-> why autocast to `dtype` (with a GradScaler for fp16) does not work on `device`, or "": a tiny linear layer
    must come out in `dtype`. bf16 below sm_80 is refused first: it would pass, emulated slowly."""
    if dtype == torch.bfloat16 and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < BF16_MIN_CAPABILITY:
            return (f"sm_{major}{minor} has no bf16 tensor cores (sm_{BF16_MIN_CAPABILITY}0+), so torch would emulate "
                    "bf16 slowly there")
    if dtype == torch.float16 and device.type != "cuda" and not hasattr(torch.amp, "GradScaler"):
        return f"it has no torch.amp.GradScaler({device.type!r}) (torch 2.3+)"
    try:
        with warnings.catch_warnings():  # old torch: "In CPU autocast, but the target dtype is not supported"
            warnings.simplefilter("ignore")
            with torch.autocast(device.type, dtype=dtype):
                out = F.linear(torch.ones(2, 4, device=device), torch.ones(3, 4, device=device))
            if dtype == torch.float16:
                grad_scaler(device.type, enabled=True)
    except Exception as exc:  # RuntimeError of an old torch; AssertionError of a GradScaler without this device
        return f"autocast to {dtype} failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    if out.dtype != dtype:
        return f"its {device.type} autocast does not compute in {dtype} (got {out.dtype})"
    return ""


def grad_scaler(device_type, *, enabled):
    """torch.amp.GradScaler(device) from torch 2.3; torch 2.1/2.2 (the P100's route) have only the CUDA one, all
    they need (resolve_amp refuses fp16 on their CPU)."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled)


def describe_skips(precision):
    """precision_summary() -> the log's line about skipped steps; "" without GradScalers."""
    p = precision
    if not p.get("grad_scalers"):
        return ""
    if p.get("skipped_g") is None:
        return "GradScalers: skipped steps not counted (this torch's GradScaler does not show them)"
    return (f"GradScalers skipped {p['skipped_g']} of {p['g_steps']} G steps and {p['skipped_d']} of {p['d_steps']} "
            f"D steps (inf/NaN gradients in fp16); scales now G {p['scale_g']:g}, D {p['scale_d']:g}")


def describe_amp(amp_dtype):
    """The precision a Trainer runs in, for the log and report.json."""
    return {None: "fp32", torch.float16: "fp16 autocast + GradScalers", torch.bfloat16: "bf16 autocast"}[amp_dtype]


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
