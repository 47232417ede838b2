"""Speed switches: cuDNN autotuning and TF32 where they help, and torch.compile only where the device and torch
support it (never on Pascal: the P100, sm_60, has no Triton), with a clean fall-back to eager when compiling fails.
"""
import importlib.util
import os
import time
import types

import torch

from modules.recipe.utils import cpu_count, is_out_of_memory, log, warn

COMPILE_MIN_CAPABILITY = 7  # Triton (torch.compile's GPU code generator) needs sm_70+; Kaggle's P100 is sm_60
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


def compile_support(device):
    """-> (ok, why): can torch.compile (inductor) run on this device with this torch?"""
    try:
        if not torch._dynamo.is_dynamo_supported():  # torch loads _dynamo lazily, on first access
            return False, f"torch {torch.__version__} cannot compile under this Python"
    except Exception as exc:  # ImportError, or a dynamo that fails to initialise
        return False, f"torch._dynamo unavailable ({type(exc).__name__})"
    if device.type == "cpu":
        return True, "cpu (inductor C++ backend)"
    if device.type != "cuda":
        return False, f"device type {device.type!r}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < COMPILE_MIN_CAPABILITY:
        return False, f"sm_{major}{minor} has no Triton support (needs sm_{COMPILE_MIN_CAPABILITY}0+)"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    return True, f"sm_{major}{minor} with Triton"


class CompiledForward:
    """Replaces `module.forward` in place: the compiled forward, or the eager one for good once a compiled call raises.

    Any call may compile anew (the first; G in grad mode after eval mode; the finish's batch shape), so every call is
    guarded: a failure is one warning, then that call and all later ones run eager. An out-of-memory error is not
    compile's: it is raised as it is. In place, so the module keeps its class, attributes (joint_ok, set_growth) and
    state_dict keys. A deep copy of the module (EMA, SWA) gets its own eager forward: the compiled function is bound to
    the original's parameters.
    """

    def __init__(self, module, compiled):
        self.module, self.compiled, self.eager = module, compiled, module.forward
        self.calls = 0  # compiled calls started

    def __call__(self, *args, **kwargs):
        if self.compiled is not None:
            self.calls += 1
            try:
                return self.compiled(*args, **kwargs)  # compile errors (no Triton, backend failures) surface here
            except Exception as exc:
                if is_out_of_memory(exc):
                    raise
                self.fall_back(exc, where="its first call" if self.calls == 1 else f"call {self.calls}")
        return self.eager(*args, **kwargs)

    def fall_back(self, exc, *, where):
        """Eager from now on, said once."""
        first_line = (str(exc).splitlines() or [""])[0][:160]
        warn(f"torch.compile of {type(self.module).__name__} failed at {where} ({type(exc).__name__}: {first_line}): "
             "running eager from now on")
        self.compiled = None

    def __deepcopy__(self, memo):
        twin = memo.get(id(self.module))  # the module's copy under construction (deepcopy sets it before its __dict__)
        return self if twin is None else types.MethodType(type(twin).forward, twin)


def maybe_compile(module, *, mode, device):
    """Config.compile (off | auto | on) -> module, compiled in place where supported (see CompiledForward), else as is.

    auto: CUDA sm_70+ with Triton only, and not progressive models (set_growth: guards on the fade would recompile).
    on: also CPU; an unsupported device gives one warning and the eager module.
    """
    if mode == "off" or isinstance(module.__dict__.get("forward"), CompiledForward):
        return module
    ok, why = compile_support(device)
    if mode == "auto" and (device.type != "cuda" or not ok or hasattr(module, "set_growth")):
        return module
    if not ok:
        warn(f"compile=on but {why}: {type(module).__name__} runs eager")
        return module
    try:
        compiled = torch.compile(module.forward, dynamic=False)  # fixed batch shapes: one static graph per shape
    except Exception as exc:
        warn(f"torch.compile of {type(module).__name__} refused ({type(exc).__name__}: {exc}): running eager")
        return module
    module.forward = CompiledForward(module, compiled)
    log(f"compile: {type(module).__name__} compiled lazily at its first call ({why})")
    return module


def fall_back_to_eager(exc, *modules):
    """After `exc` escaped a step of compiled modules (a backward torch.compile builds lazily, at its first backward):
    the compiled ones run eager from now on -> True when any was compiled (the step may be retried), else False. An
    out-of-memory error is not compile's: False."""
    if is_out_of_memory(exc):
        return False
    compiled = [f for f in (m.__dict__.get("forward") for m in modules)
                if isinstance(f, CompiledForward) and f.compiled is not None]
    for f in compiled:
        f.fall_back(exc, where="a training step")
    return bool(compiled)
