"""Before/after: two builds of ferroloop side by side in one run.

    python bench/ab.py --base /path/to/venv-a/bin/python --new /path/to/venv-b/bin/python
                       [--cycles 10] [--kinds protocol streams http] [--sizes 1024 102400]
                       [--micro call_soon call_later ...] [--markdown PATH]

Each interpreter must have its own ferroloop installed (e.g. one venv built from the
commit before a change, one from after). Micro benchmarks alternate one batch per build
per cycle; echo cells serve both builds at once from one load generator, as
bench/echo.py serves the loops. Every ratio is new/base, the median of per-cycle ratios
with its p25-p75 spread: above 1.00x the new build is faster (for CPU per request,
below 1.00x is better).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import echo
import micro
from _stats import spread, write_outputs

BENCH = Path(__file__).resolve().parent


def micro_ab(pythons: dict[str, str], benches: list[str], cycles: int) -> list[str]:
    workers = {
        name: subprocess.Popen(
            [py, str(BENCH / "micro.py"), "--worker", "ferroloop"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, py in pythons.items()
    }
    raw = {b: {name: [] for name in pythons} for b in benches}
    try:
        for cycle in range(cycles):
            order = list(pythons) if cycle % 2 == 0 else list(reversed(pythons))
            for bench in benches:
                for name in order:
                    workers[name].stdin.write(bench + "\n")
                    workers[name].stdin.flush()
                    raw[bench][name].append(json.loads(workers[name].stdout.readline())["ops_per_s"])
            print(f"micro cycle {cycle + 1}/{cycles}", file=sys.stderr, flush=True)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    lines = ["| benchmark | base ops/s | new ops/s | new / base (p25-p75) |", "|---|---|---|---|"]
    for bench, per in raw.items():
        med, p25, p75 = spread([n / b for n, b in zip(per["new"], per["base"])])
        base, new = sorted(per["base"])[len(per["base"]) // 2], sorted(per["new"])[len(per["new"]) // 2]
        lines.append(f"| {bench} | {base:,.0f} | {new:,.0f} | **{med:.2f}x** ({p25:.2f}-{p75:.2f}) |")
    return lines


def echo_ab(pythons: dict[str, str], kinds: list[str], sizes: list[int], conns_list, cycles: int) -> list[str]:
    echo.build_loadgen()
    server_core, gen_core = echo.cores()
    lines = [
        "| workload | size | conns | requests/s new / base (p25-p75) | CPU µs/req base | CPU µs/req new | CPU new / base |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        script = "framework_servers.py" if kind in echo.FRAMEWORKS else "echo_servers.py"
        # TLS cells: the certificate bench/echo.py makes for its runs (trustme's), so
        # that the figures compare with the suite's.
        tls_files = echo.tls_files() if echo.uses_tls(kind) else contextlib.nullcontext()
        with tls_files as tls:
            env = echo.server_env(False, tls)
            ca = tls.ca if tls is not None else None
            servers = {
                name: echo.Server([py, str(BENCH / script), "ferroloop", kind], server_core, env)
                for name, py in pythons.items()
            }
            lines += echo_ab_cells(servers, kind, sizes, conns_list, cycles, gen_core, ca)
    return lines


def echo_ab_cells(servers, kind, sizes, conns_list, cycles, gen_core, ca) -> list[str]:
    """The rows of one kind; the servers are stopped after them."""
    lines = []
    try:
        for size in sizes if echo.sized(kind) else sizes[:1]:
            for conns in conns_list:
                print(f"{kind} {size} B x {conns}", file=sys.stderr, flush=True)
                cell = echo.run_cell(servers, kind, size, conns, cycles, 100, gen_core, ca)
                base, new = cell["base"]["slices"], cell["new"]["slices"]
                rps = spread([(n[0] / n[1]) / (b[0] / b[1]) for n, b in zip(new, base)])
                cpu_b = sorted(c / r * 1e6 for r, _, c in base if r)
                cpu_n = sorted(c / r * 1e6 for r, _, c in new if r)
                cpu = spread([(n[2] / n[0]) / (b[2] / b[0]) for n, b in zip(new, base) if n[0] and b[0]])
                label = echo.size_label({"size": size if echo.sized(kind) else None})
                lines.append(
                    f"| {kind} | {label} | {conns} | **{rps[0]:.2f}x** ({rps[1]:.2f}-{rps[2]:.2f}) | "
                    f"{cpu_b[len(cpu_b) // 2]:.1f} | {cpu_n[len(cpu_n) // 2]:.1f} | {cpu[0]:.2f}x |"
                )
    finally:
        for server in servers.values():
            server.stop()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True, help="python of the build before the change")
    parser.add_argument("--new", required=True, help="python of the build after it")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--kinds", nargs="*", default=["protocol", "buffered", "streams", "http"])
    parser.add_argument("--sizes", nargs="*", type=int, default=[1024])
    parser.add_argument("--conns", nargs="*", type=int, default=[10, 100])
    parser.add_argument("--micro", nargs="*", default=list(micro.BENCHMARKS))
    parser.add_argument("--markdown")
    args = parser.parse_args()
    pythons = {"base": args.base, "new": args.new}
    parts = []
    if args.micro:
        parts.append("\n".join(micro_ab(pythons, args.micro, args.cycles)))
    if args.kinds:
        parts.append("\n".join(echo_ab(pythons, args.kinds, args.sizes, args.conns, args.cycles)))
    table = "\n\n".join(parts)
    print(table)
    write_outputs(((args.markdown, table),))


if __name__ == "__main__":
    main()
