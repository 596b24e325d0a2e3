"""What `loop.stats()` timing costs: bench/micro.py's benchmarks on ferroloop with
timing off (the default: counters only) and on (`FERROLOOP_STATS_TIMING=1`: the clock
read around the poll, each turn and each callback), interleaved in one run.

    python bench/stats_overhead.py [--cycles 10] [--only call_soon ...]

The counters themselves cannot be switched off; their cost is measured against the
build before them with bench/ab.py (README, "Seeing inside a loop").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from micro import BENCHMARKS

MICRO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro.py")
MODES = {"counters": {}, "timing": {"FERROLOOP_STATS_TIMING": "1"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--only", nargs="*")
    args = parser.parse_args()
    benches = args.only or list(BENCHMARKS)
    workers = {
        mode: subprocess.Popen(
            [sys.executable, MICRO, "--worker", "ferroloop"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, **extra},
        )
        for mode, extra in MODES.items()
    }
    raw = {bench: {mode: [] for mode in MODES} for bench in benches}
    try:
        for cycle in range(args.cycles):
            for bench in benches:
                order = list(MODES) if cycle % 2 == 0 else list(reversed(MODES))
                for mode in order:
                    proc = workers[mode]
                    proc.stdin.write(bench + "\n")
                    proc.stdin.flush()
                    raw[bench][mode].append(json.loads(proc.stdout.readline())["ops_per_s"])
            print(f"cycle {cycle + 1}/{args.cycles} done", file=sys.stderr, flush=True)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    print("| benchmark | counters only (ops/s) | timing on (ops/s) | timing / counters (p25-p75) |")
    print("|---|---|---|---|")
    for bench, modes in raw.items():
        ratios = sorted(t / c for t, c in zip(modes["timing"], modes["counters"]))
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        print(
            f"| {bench} | {statistics.median(modes['counters']):,.0f} | "
            f"{statistics.median(modes['timing']):,.0f} | "
            f"**{statistics.median(ratios):.2f}x** ({q[0]:.2f}-{q[2]:.2f}) |"
        )


if __name__ == "__main__":
    main()
