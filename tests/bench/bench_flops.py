"""Counted work of a recipe and what it predicts for Kaggle's GPUs; optionally the same harness on BigGAN-PyTorch's own
G and D (run by hand; pytest does not collect this file). Writes table.md / results.json into --out.

    OMP_NUM_THREADS=2 python tests/bench/bench_flops.py                  # default recipe: FLOPs and predictions
    OMP_NUM_THREADS=2 python tests/bench/bench_flops.py --peer /tmp/peer  # + BigGAN-PyTorch, timed on the CPU

FLOPs: torch.utils.flop_counter.FlopCounterMode (convolutions and matmuls, 2 per multiply-add; element-wise work is not
counted), per image for G and D forward and forward + backward (parameter gradients), and for one whole training step of
the kernel's Trainer (D step + G step, at the batch per rank).

Predictions (not measurements): steps in the training window of an 8h45m run = window / (FLOPs per step per rank /
(utilisation x peak) + gradient all-reduce time with two GPUs), at the utilisation range of UTILISATION (see there for
where the range comes from). The 2nd place reported ~50k steps in 9 h on a P100.

--peer DIR: a folder holding BigGAN-PyTorch's BigGAN.py, layers.py and sync_batchnorm/
(github.com/ajbrock/BigGAN-PyTorch; extracted by hand, never committed; see docs/performance.md). Its Generator/Discriminator at the recipe's widths (arch 64, attention
at 32, hierarchical z, shared embedding) run through the very same Trainer.step (the kernel's losses, Adam, EMA, joint D
forward; their D has no auxiliary classifier head, so that term is absent for theirs) on the CPU; it/s is the best of
--rounds round-robin rounds of --steps steps.
"""
import argparse
import contextlib
import dataclasses
import io
import json
import platform
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import ROOT, add_recipe_args, count_params, load_data, md_table, recipe  # noqa: E402

import modules.recipe.train  # noqa: E402  (build_models is patched there for the peer)
from modules.recipe.train import build_trainer  # noqa: E402
from modules.recipe.utils import parse_duration  # noqa: E402
from modules.recipe.utils import check_device  # noqa: E402

# Kaggle's GPUs: (name, precision the kernel uses there, dense peak TFLOP/s, GPUs, utilisation low, high).
# Utilisation = achieved / peak FLOP/s. Published anchors (NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README,
# pytorch-21.03 container; ResNet-50 = 4.1 GMAC = 8.2 GFLOP forward, ~24.6 GFLOP per trained image):
#   V100 16GB training, fp32: 367 img/s = 9.0 TFLOP/s = 57% of 15.7; AMP: 1,200 img/s = 29.5 TFLOP/s = 24% of 125.
#   T4 inference (no T4 training figures there), fp32: 428 img/s = 3.5 TFLOP/s = 43% of 8.1; AMP: 1,198 img/s =
#   9.8 TFLOP/s = 15% of 65.
# A 64x64 GAN at 32-64 images per GPU is a worse fit than a 224x224 ResNet-50 at 256: 4x4 and 8x8 maps, spectral norm's
# sequential power iteration, conditional BN and attention are launch- and bandwidth-bound, so the tuned ResNet figures
# are the ceiling. Assumed: 0.26-0.79 of ResNet-50's fraction (15-45% on the P100 against its 57% in fp32; the P100 has
# no tensor cores, its fp16 is not used), the same factor on the T4's 15% in fp16: 4-12% (a T4 at its 70 W cap also
# clocks down under sustained load). Consistency check, not an anchor: the 2nd place's ~50k steps in 9 h on a P100
# with this architecture at batch 64 is ~22% of its fp32 peak at our counted FLOPs per step.
PEAK = {"P100": 9.3, "T4": 65.0}
UTILISATION = (("1x P100 (fp32)", "P100", 1, 0.15, 0.45), ("2x T4 (fp16 autocast)", "T4", 2, 0.04, 0.12))
ALLREDUCE_BYTES_PER_S = 6e9  # two T4s on PCIe without NVLink: ~6 GB/s effective for NCCL ring all-reduce (assumed)
NON_TRAINING_S = 15 * 60  # start-up, data prep, the finish (10,000 images, zip, self-check) and margin (assumed)
SECOND_PLACE = "~50k steps in 9 h on one P100 (2nd place's write-up)"


# counting


def count(fn):
    with FlopCounterMode(display=False) as c:
        fn()
    return c.get_total_flops()


def model_flops(G, D, *, z_dim, n_classes, batch, device):
    """FLOPs per image: G forward, G forward+backward, D forward, D forward+backward (parameter gradients)."""
    z = torch.randn(batch, z_dim, device=device)
    y = torch.randint(n_classes, (batch,), device=device)
    x = torch.rand(batch, 3, 64, 64, device=device) * 2 - 1

    def g_fwd():
        with torch.no_grad():
            G(z, y)

    def g_fwd_bwd():
        G(z, y).float().sum().backward()

    def d_fwd():
        with torch.no_grad():
            D(x, y)

    def d_fwd_bwd():
        D(x, y)[0].float().sum().backward()

    out = {name: count(fn) / batch for name, fn in
           (("g_fwd", g_fwd), ("g_fwd_bwd", g_fwd_bwd), ("d_fwd", d_fwd), ("d_fwd_bwd", d_fwd_bwd))}
    for m in (G, D):
        m.zero_grad(set_to_none=True)
    return out


def step_flops(trainer):
    trainer.step()
    return count(trainer.step)


# the peer


class PeerG(nn.Module):
    """BigGAN-PyTorch's Generator behind our G interface: (z, y) -> images."""

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, z, y):
        return self.G(z, self.G.shared(y))


class PeerD(nn.Module):
    """BigGAN-PyTorch's Discriminator behind our D interface: (x, y) -> (logits [N], None)."""

    joint_ok = True  # BigGAN-PyTorch's G_D concatenates reals and fakes too

    def __init__(self, D):
        super().__init__()
        self.D = D

    def forward(self, x, y):
        return self.D(x, y).squeeze(1), None


def build_peer(peer_dir, cfg, n_classes):
    sys.path.insert(0, str(peer_dir))
    import BigGAN  # their file, imported from peer_dir only
    G = BigGAN.Generator(G_ch=cfg.g_ch, dim_z=cfg.z_dim, bottom_width=4, resolution=64, G_attn="32" if cfg.attention
                         else "0", n_classes=n_classes, G_shared=True, shared_dim=cfg.shared_dim, hier=True,
                         no_optim=True)
    D = BigGAN.Discriminator(D_ch=cfg.d_ch, resolution=64, D_attn="32" if cfg.attention else "0", n_classes=n_classes)
    D.optim = None  # their D builds its own Adam; the Trainer's is the one used
    return PeerG(G), PeerD(D)


def build_peer_trainer(peer_dir, cfg, data, device):
    """The kernel's build_trainer with their G and D in place of ours (same data, losses, Adam, EMA, step)."""
    with mock.patch.object(modules.recipe.train, "build_models", lambda c, n: build_peer(peer_dir, c, n)), \
            contextlib.redirect_stdout(io.StringIO()):  # their constructors print parameter counts
        return build_trainer(cfg, data, device)


def time_round_robin(trainers, *, steps, rounds):
    rates = {k: [] for k in trainers}
    for _ in range(rounds):
        for k, t in trainers.items():
            t.read_stats()
            t0 = time.perf_counter()
            for _ in range(steps):
                t.step()
            t.read_stats()
            rates[k].append(steps / (time.perf_counter() - t0))
    return rates


# predicting


def predict(flops_per_step_rank, *, grad_bytes, window_s):
    """-> rows: (setup, utilisation low/high, steps low/high, it/s low/high)."""
    rows = []
    for name, gpu, n_gpus, lo, hi in UTILISATION:
        comm = grad_bytes / ALLREDUCE_BYTES_PER_S if n_gpus > 1 else 0.0
        its = [1 / (flops_per_step_rank[n_gpus] / (u * PEAK[gpu] * 1e12) + comm) for u in (lo, hi)]
        rows.append({"setup": name, "gpu": gpu, "gpus": n_gpus, "util": (lo, hi), "peak_tflops": PEAK[gpu],
                     "it_s": its, "steps": [i * window_s for i in its], "allreduce_s": comm})
    return rows


def fmt_g(x):
    return f"{x / 1e9:,.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(p)
    p.add_argument("--batch", type=int, default=64, help="images per step over all ranks (default 64: 32 per T4)")
    p.add_argument("--peer", default="", help="folder with BigGAN-PyTorch's BigGAN.py, layers.py, sync_batchnorm/")
    p.add_argument("--peer-batch", type=int, default=16, help="batch of the timed peer comparison (default 16)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per round and model (peer comparison)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--budget", default="8h45m", help="Kaggle run the predictions are for (default 8h45m)")
    p.add_argument("--out", default=str(ROOT / "tests" / "bench" / "results" / "flops"))
    args = p.parse_args(argv)
    cfg = recipe(args)
    device = check_device(args.device)
    data, desc, _ = load_data(cfg, synthetic=512)  # FLOPs do not depend on the pixels
    n_classes = len(data.classes)
    window = parse_duration(args.budget) - NON_TRAINING_S
    print(f"device {device} | torch {torch.__version__} | threads {torch.get_num_threads()} | --preset {args.preset} "
          f"{' '.join('--set ' + s for s in args.set)} (g_ch {cfg.g_ch}, d_ch {cfg.d_ch})", flush=True)
    result = {"command": "python tests/bench/bench_flops.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "torch": torch.__version__, "python": platform.python_version(), "config": dataclasses.asdict(cfg)}

    def work(make):
        """FLOPs are affine in the batch (a + b*B: spectral norm's power iteration does not depend on B), so they are
        counted at batches 4 and 8 and extrapolated exactly: seconds on the CPU at full width, not minutes."""
        torch.manual_seed(0)
        at = {}
        for b in (4, 8):
            t = make(dataclasses.replace(cfg, batch_size=b, amp="off"))
            at[b] = step_flops(t)
        slope = (at[8] - at[4]) / 4
        per_step = {n: at[4] + slope * (args.batch // n - 4) for n in (1, 2)}
        G, D = t.G, t.D
        per_image = model_flops(G, D, z_dim=cfg.z_dim, n_classes=n_classes, batch=8, device=device)
        grads = 4 * (count_params(G) + count_params(D))  # fp32 gradients all-reduced per step (D step + G step)
        return {"per_image": per_image, "per_step": per_step, "g_params": count_params(G),
                "d_params": count_params(D), "grad_bytes": grads}

    ours = work(lambda c: build_trainer(c, data, device))
    result["ours"] = ours
    preds = predict(ours["per_step"], grad_bytes=ours["grad_bytes"], window_s=window)
    result["predictions"] = preds
    lines = [f"`{result['command']}` (torch {torch.__version__}; FlopCounterMode: convs and matmuls, 2 FLOPs per "
             f"multiply-add)", ""]
    models = [("ours", ours)]
    if args.peer:
        peer_dir = Path(args.peer)
        if not (peer_dir / "BigGAN.py").is_file() or not (peer_dir / "layers.py").is_file():
            print(f"--peer {peer_dir}: no BigGAN.py/layers.py there; the peer comparison is skipped", file=sys.stderr)
        else:
            theirs = work(lambda c: build_peer_trainer(peer_dir, c, data, device))
            result["peer"] = theirs
            models.append(("BigGAN-PyTorch", theirs))
            pc = dataclasses.replace(cfg, batch_size=args.peer_batch)
            torch.manual_seed(0)
            trainers = {"ours": build_trainer(pc, data, device), "peer": build_peer_trainer(peer_dir, pc, data, device)}
            for t in trainers.values():
                t.step()  # warm-up
            rates = time_round_robin(trainers, steps=args.steps, rounds=args.rounds)
            best = {k: max(v) for k, v in rates.items()}
            result["peer_timing"] = {"batch": args.peer_batch, "steps": args.steps, "rounds": args.rounds,
                                     "rates": rates, "best": best, "threads": torch.get_num_threads(),
                                     "it_s_ratio": best["ours"] / best["peer"],
                                     "flops_ratio": ours["per_step"][1] / theirs["per_step"][1]}
            print(f"  peer: ours {best['ours']:.3f} it/s, BigGAN-PyTorch {best['peer']:.3f} it/s at batch "
                  f"{args.peer_batch}", flush=True)
    head = ["model", "G / D params", "G fwd", "G fwd+bwd", "D fwd", "D fwd+bwd", f"step at {args.batch} (1 GPU)",
            f"step at {args.batch // 2} per rank (2 GPUs)"]
    rows = [[name, f"{m['g_params'] / 1e6:.2f}M / {m['d_params'] / 1e6:.2f}M",
             *(fmt_g(m["per_image"][k]) for k in ("g_fwd", "g_fwd_bwd", "d_fwd", "d_fwd_bwd")),
             fmt_g(m["per_step"][1]), fmt_g(m["per_step"][2])] for name, m in models]
    lines += ["GFLOP per image (G, D) and per training step (D step + G step):", "", md_table(head, rows), ""]
    if "peer_timing" in result:
        pt = result["peer_timing"]
        lines += [f"Same harness (Trainer.step), CPU, {pt['threads']} threads, batch {pt['batch']}, best of "
                  f"{pt['rounds']} rounds of {pt['steps']} steps: ours {pt['best']['ours']:.3f} it/s, BigGAN-PyTorch "
                  f"{pt['best']['peer']:.3f} it/s: **ours / theirs = {pt['it_s_ratio']:.2f}x it/s, "
                  f"{pt['flops_ratio']:.2f}x FLOPs per step**.", ""]
    head = ["setup", "peak TFLOP/s", "utilisation assumed", "it/s", f"steps in {args.budget} (PREDICTED)",
            "reported"]
    rows = [[r["setup"], f"{r['peak_tflops']:g}", f"{100 * r['util'][0]:.0f}-{100 * r['util'][1]:.0f}%",
             f"{r['it_s'][0]:.2f}-{r['it_s'][1]:.2f}", f"{r['steps'][0] / 1e3:,.0f}k-{r['steps'][1] / 1e3:,.0f}k",
             SECOND_PLACE if r["gpu"] == "P100" else ""] for r in preds]
    lines += [f"Predictions, not measurements: training window {window / 3600:.2f} h ({args.budget} less "
              f"{NON_TRAINING_S // 60} min for start-up, data and the finish); two T4s: {args.batch // 2} images per "
              f"rank plus {ours['grad_bytes'] / 2**20:.0f} MiB of gradients all-reduced per step at "
              f"{ALLREDUCE_BYTES_PER_S / 1e9:g} GB/s:", "", md_table(head, rows)]
    p100 = next(r for r in preds if r["gpu"] == "P100")
    implied = 50000 / (9 * 3600) * ours["per_step"][1] / (PEAK["P100"] * 1e12)
    lines += ["", f"For scale: our step at {args.batch} run 50k times in 9 h would need {100 * implied:.1f}% of a "
              f"P100's fp32 peak (the 2nd place's own step and batch differ)."]
    result["implied_p100_util_for_50k"] = implied
    del p100
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "table.md").write_text(table + "\n")
    print(f"written: {out}")
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
