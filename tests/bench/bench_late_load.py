"""Does the budget hold when the machine gets loaded late in a run? (run by hand; not collected by pytest)

    python tests/bench/bench_late_load.py [--budget 120] [--hogs 2] [--at 30 | --before-stop 20] [--repeat 1]
                                          [-- extra kernel args]

Runs `kernel.py --demo --preset smoke --time-budget BUDGET`, starts HOGS busy loops (`python -c "while True: pass"`,
at the bench's own niceness, as another user's job would be) AT seconds into it, or BEFORE_STOP seconds before the
stop its plan line names ("training until ..."; on a shared machine the plan moves with the other load, so this
keeps "late in training" late), stops them when the kernel ends, and prints per run: wall time vs budget, exit code,
the slowdown the kernel logged, and its phase times (report.json). The machine is shared: state its other load with
the numbers. A run that overshoots prints by how much.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
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
        lines, planned = [], threading.Event()
        reader = threading.Thread(target=_read, args=(kernel.stdout, lines, planned), daemon=True)
        reader.start()
        hogs, hogs_at = [], None
        try:
            while kernel.poll() is None and hogs_at is None:
                stop = _planned_stop(lines)
                at = args.at if args.before_stop is None else None if stop is None else stop - args.before_stop
                if at is not None and time.monotonic() - t0 >= at:
                    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
                    hogs_at = time.monotonic() - t0
                time.sleep(0.1)
            kernel.wait()
            wall = time.monotonic() - t0
            reader.join()
            log = "".join(lines)
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
            if kernel.poll() is None:
                kernel.kill()
        slow = re.findall(r"\[\s*([\d.]+)s\] generation ([\d.]+)x slower", log)
        report = out / "report.json"
        phases = json.loads(report.read_text()).get("phases") if report.exists() else None
        stop = _planned_stop(lines)
        return wall, kernel.returncode, slow, phases, log + f"(bench: planned stop {stop}s, hogs from {hogs_at}s)\n"


def _read(stream, lines, planned):
    for line in stream:
        lines.append(line)


def _planned_stop(lines):
    """The plan line's "training until 1m22s" -> 82.0 (None before it is logged), on the kernel's clock (from its
    start, a fraction of a second after the bench's)."""
    for line in lines:
        if m := re.search(r"training until (?:(\d+)m)?([\d.]+)s", line):
            return 60 * float(m.group(1) or 0) + float(m.group(2))
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=120.0)
    ap.add_argument("--hogs", type=int, default=2)
    ap.add_argument("--at", type=float, default=30.0, help="seconds into the run the hogs start")
    ap.add_argument("--before-stop", type=float, default=None, help="... or this many seconds before the planned stop")
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
                            if re.search(r"finish reserve|slower than measured|training stopped|stopping|done:|bench:",
                                         line)))
    when = f"{args.at:.0f}s" if args.before_stop is None else f"{args.before_stop:.0f}s before the planned stop"
    print(f"wall min {min(walls):.1f}s median {statistics.median(walls):.1f}s max {max(walls):.1f}s "
          f"(budget {args.budget:.0f}s, {args.hogs} hogs from {when})")


if __name__ == "__main__":
    main()
