"""Does the budget hold when the machine gets loaded late in a run? (run by hand; not collected by pytest)

    python tests/bench/bench_late_load.py [--budget 120] [--hogs 2] [--at 30] [--repeat 1] [-- extra kernel args]

Runs `kernel.py --demo --preset smoke --time-budget BUDGET`, starts HOGS busy loops (`python -c "while True: pass"`,
nice 0, as another user's job would be) AT seconds into it, stops them when the kernel ends, and prints per run: wall
time vs budget, exit code, the slowdown the kernel logged, and its phase times (report.json). The machine is shared:
state its other load with the numbers. A run that overshoots prints by how much.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def one_run(args, extra):
    """-> (wall seconds, exit code, logged slowdown lines, report.json's phase times or None)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, str(ROOT / "kernel.py"), "--demo", "--preset", "smoke", "--out", str(out),
               "--time-budget", f"{args.budget}s", *extra]
        t0 = time.monotonic()
        kernel = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        hogs = []
        try:
            try:
                kernel.wait(timeout=args.at)
            except subprocess.TimeoutExpired:
                hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
            log = kernel.communicate()[0]
            wall = time.monotonic() - t0
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            if kernel.poll() is None:
                kernel.kill()
        slow = re.findall(r"\[\s*([\d.]+)s\] generation ([\d.]+)x slower", log)
        report = out / "report.json"
        phases = json.loads(report.read_text()).get("phases") if report.exists() else None
        return wall, kernel.returncode, slow, phases, log


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--at", type=float, default=30.0, help="seconds into the run the hogs start")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--show-log", action="store_true")
    args, extra = ap.parse_known_args()
    extra = [a for a in extra if a != "--"]
    walls = []
    for i in range(args.repeat):
        wall, rc, slow, phases, log = one_run(args, extra)
        walls.append(wall)
        over = wall - args.budget
        print(f"run {i + 1}: wall {wall:.1f}s of {args.budget:.0f}s ({'over by %.1fs' % over if over > 0 else 'inside'})"
              f", exit {rc}, slowdowns logged {[(float(t), float(x)) for t, x in slow]}, phases {phases}")
        if args.show_log or rc not in (0,):
            print(log[-3000:])
        else:  # the lines that say where the time went
            print("\n".join(line for line in log.splitlines()
                            if re.search(r"finish reserve|slower than measured|training stopped|stopping|done:", line)))
    print(f"wall min {min(walls):.1f}s median {statistics.median(walls):.1f}s max {max(walls):.1f}s "
          f"(budget {args.budget:.0f}s, {args.hogs} hogs from {args.at:.0f}s)")


if __name__ == "__main__":
    main()
