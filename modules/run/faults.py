"""Fault injection for tests (Config.fault) by a hook the loop calls before each step, so that the GAN step holds no
test code. zipfail is the finish's."""
import os
import signal
import time

import torch

from modules.recipe.utils import parse_faults

STEP_FAULTS = ("raise", "oom", "slow", "kill", "slowgen", "nan")  # Config.fault kinds injected before a step


class FaultInjector:
    """Config.fault's step faults, each one shot at its step (trainer.step_count before the step) unless said:
    raise@STEP   a RuntimeError, as any failure inside training
    oom@STEP     torch.cuda.OutOfMemoryError, what a GPU too small for the batch raises
    slow@S       every step sleeps S seconds first
    kill@STEP    rank 1 dies without a word (SIGKILL), as a crashed worker
    slowgen@S    from the first step on, every forward of G or its averages in eval mode (generation) sleeps S seconds
    nan@STEP     D's weights become NaN: that step's losses are non-finite, and the loop rolls back as for a divergence
    """

    def __init__(self, fault_text, *, rank):
        self.faults = {k: v for k, v in parse_faults(fault_text).items() if k in STEP_FAULTS}  # kind -> step or seconds
        self.rank = rank

    def before_step(self, trainer):
        f, step = self.faults, trainer.step_count
        if f.get("raise") == step:
            del f["raise"]
            raise RuntimeError(f"injected fault at step {step} (--set fault=...)")
        if f.get("oom") == step:
            del f["oom"]
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (injected at step "
                                              f"{step}, --set fault=oom@STEP)")
        if "slow" in f:
            time.sleep(f["slow"])
        if f.get("kill") == step and self.rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if "slowgen" in f:
            delay = f.pop("slowgen")
            for m in {id(m): m for m in (trainer.G, *trainer.shipped_models()[2:])}.values():
                m.register_forward_pre_hook(lambda module, args, d=delay: None if module.training else time.sleep(d))
        if f.get("nan") == step:
            del f["nan"]  # one shot: the steps after the roll-back pass
            with torch.no_grad():
                for p in trainer.D.parameters():
                    p.fill_(float("nan"))


def fault_hook(fault_text, *, rank):
    """-> train_loop's before_step, or None without step faults."""
    injector = FaultInjector(fault_text, rank=rank)
    return injector.before_step if injector.faults else None
