"""Where the finish's time goes (issue 19, defect 9): 10,000 images generated and zipped at the smoke preset's widths on
the real sample, the way main.py did it before issue 19 (generate, then encode, then write and verify) and the way
finish() does it now (channels-last + cached spectral norm, the PNGs encoded by encode_png on another thread while
generating). CPU seconds are the process's (all threads); on an idle machine the overlapped phase takes about the
generation's share of them.

    OMP_NUM_THREADS=1 nice -n 10 python tests/bench/bench_finish.py --data-dir ../shared/data/dogs-1953 [--set attention=false]

Prints a table (wall and CPU seconds per phase) and writes tests/bench/results/finish/results.json. Optional:
--profile prints the 15 costliest calls of the old generation path (cProfile).
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import torch  # noqa: E402

from modules.recipe.sample import build_sampler  # noqa: E402
from modules.recipe.train import build_trainer  # noqa: E402
from modules.run.cli import parse_config  # noqa: E402
from modules.run.finish import _finish_generate  # noqa: E402
from modules.run.report import RunReport  # noqa: E402
from modules.run.setup import load_training_data  # noqa: E402
from modules.run.submission import write_submission  # noqa: E402


def pil_encode_pngs(images, workers):
    """The encoder before issue 19: PIL's, compress_level 1, on a thread pool."""
    from concurrent.futures import ThreadPoolExecutor
    from PIL import Image

    def one(im):
        buf = io.BytesIO()
        Image.fromarray(im, "RGB").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, images, chunksize=64))


def timed(fn):
    w, c = time.monotonic(), time.process_time()
    out = fn()
    return out, time.monotonic() - w, time.process_time() - c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    cfg, _ = parse_config(["--preset", "smoke", "--data-dir", args.data_dir] + [a for s in args.set for a in ("--set", s)])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    data, _ = load_training_data(cfg)
    cpu = torch.device("cpu")
    trainer = build_trainer(cfg, data, cpu)
    sampler = build_sampler(cfg, trainer, data)  # the kernel's: batch cfg.sample_batch
    sampler(200)  # warm-up
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.profile:
            pr = cProfile.Profile()
            pr.enable()
            sampler(2000)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(15)
        images, w, c = timed(lambda: sampler(args.n))
        rows["before: generate"] = (w, c)
        pngs, w, c = timed(lambda: pil_encode_pngs(images, cfg.data_workers))
        rows["before: encode PNGs (PIL)"] = (w, c)
        _, w, c = timed(lambda: write_submission(images, os.path.join(tmp, "a.zip"), workers=cfg.data_workers,
                                                 pngs=pngs))
        rows["before: write + verify"] = (w, c)
        report = RunReport(config={}, device="cpu", torch=torch.__version__)
        (images2, pngs2), w, c = timed(lambda: _finish_generate(sampler.ready(), n=args.n, seed=0, report=report,
                                                                workers=cfg.data_workers))
        rows["after: generate + encode (overlapped)"] = (w, c)
        assert pngs2 is not None and len(pngs2) == args.n, "the overlapped encoding gave no PNGs"
        _, w, c = timed(lambda: write_submission(images2, os.path.join(tmp, "b.zip"), workers=cfg.data_workers,
                                                 pngs=pngs2))
        rows["after: write + verify"] = (w, c)
    same = float((images == images2).mean())
    before = sum(v[0] for k, v in rows.items() if k.startswith("before"))
    after = sum(v[0] for k, v in rows.items() if k.startswith("after"))
    print(f"{args.n} images, smoke preset {' '.join(args.set)}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
          f"sample_batch {cfg.sample_batch}, {cfg.data_workers} encoding threads; equal uint8 values: {same:.6f}")
    print("| phase | wall s | CPU s |\n|---|---|---|")
    for k, (w, c) in rows.items():
        print(f"| {k} | {w:.2f} | {c:.2f} |")
    print(f"| **before total** | {before:.2f} | |\n| **after total** | {after:.2f} | |")
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "finish")
    os.makedirs(out, exist_ok=True)
    name = "results" + ("-" + "-".join(args.set).replace("=", "") if args.set else "") + ".json"
    with open(os.path.join(out, name), "w") as f:
        json.dump({"n": args.n, "set": args.set, "omp": os.environ.get("OMP_NUM_THREADS"), "same_values": same,
                   "rows": rows, "before_s": before, "after_s": after}, f, indent=1)


if __name__ == "__main__":
    main()
