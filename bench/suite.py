"""ferroloop's benchmark suite: every loop side by side in one run.

    python bench/suite.py            # quick mode (the README's main job), under 3 minutes
    python bench/suite.py --full     # the full matrix, under 15 minutes
    python bench/suite.py --only tls # the TLS cells alone, under 3 minutes

Quick: the framework workloads (uvicorn with a raw ASGI app, uvicorn with Starlette,
aiohttp.web, websockets echo, and uvicorn and aiohttp.web over HTTPS), the echo
workloads (streams, readline, Protocol, BufferedProtocol, sock_*, HTTP/1.1 with
httptools, TLS) at 1 KiB, each with 10 and 100 connections, connection churn (a new
plain TCP connection per 1 KiB echo, 1 and 10 connectors at a time: about 10 s), and
the micro benchmarks.
Full: the same with echo at 1, 10 and 100 KiB and WebSocket messages at 1 and 100 KiB,
20 cycles each, 10,000 idle connections, TLS handshakes (a new connection per 1 KiB
echo, one at a time: connections/s and server CPU per connection) and sendfile over TLS
(bench/tls_sendfile.py).
`--only tls`: the framework cells over HTTPS, the TLS echo at 1 and 10 KiB (and 100 KiB
with `--full`), 20 cycles each, TLS handshakes and sendfile over TLS; it writes tls.md, tls.json and
tls.png instead. Every server runs with glibc's default allocator settings
(`--fixed-malloc` pins the thresholds, as a diagnostic). Writes bench/results/summary.md,
suite.json, frameworks.png and suite.png, and names them on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import echo
import micro
import tls_sendfile
from _loops import available_loops

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = []
    for name in available_loops():
        if name in ("asyncio", "ferroloop"):
            continue
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - the version is informative only
            versions.append(name)
    return (
        f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}, "
        f"CPython {platform.python_version()}, " + ", ".join(versions)
    )


def chart(cells: list[dict], path: Path, title: str) -> None:
    """Requests/s relative to uvloop and server CPU per request, by workload and loop."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loops = [n for n in next(iter(cells))["rows"] if not n.startswith("_")]
    labels = [f"{c['kind']}\n{echo.size_label(c, '')} x{c['conns']}" for c in cells]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(10, len(cells) * 0.9), 8), sharex=True)
    width = 0.8 / max(1, len(loops))
    for i, name in enumerate(loops):
        xs = [k + i * width for k in range(len(cells))]
        ratios = [c["rows"].get(name, {}).get("rps_ratio", (math.nan,))[0] for c in cells]
        cpu = [c["rows"].get(name, {}).get("cpu_us", math.nan) for c in cells]
        top.bar(xs, ratios, width, label=name)
        bottom.bar(xs, cpu, width, label=name)
    top.axhline(1.0, color="black", linewidth=0.8)
    top.set_ylabel("requests/s vs uvloop")
    bottom.set_ylabel("server CPU µs / request")
    bottom.set_xticks([k + 0.4 - width / 2 for k in range(len(cells))], labels, fontsize=7)
    top.legend(ncol=len(loops), fontsize=8)
    top.set_title(f"{title} (median of per-cycle ratios)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def micro_section(cycles: int) -> tuple[str, dict]:
    loops, raw = micro.orchestrate(cycles, list(micro.BENCHMARKS))
    return micro.markdown(loops, micro.summarise(loops, raw)), {"loops": loops, "raw": raw}


def written_names(written: list[Path]) -> str:
    return ", ".join(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p) for p in written)


CHURN_HEAD = (
    "## Connection churn\n\nA new plain TCP connection per request, from 1 and from 10 connectors at "
    "a time: connect, one 1 KiB echo, the client's half-close, the server's close (the streams echo). "
    "Requests/s are connections/s, CPU µs/req the server's CPU per connection.\n\n"
)

HANDSHAKES_HEAD = (
    "## TLS handshakes\n\nA new connection per request, one at a time: connect, full handshake "
    "(no resumption), one 1 KiB echo, close_notify, close. Requests/s are connections/s, CPU µs/req "
    "the server's CPU per connection.\n\n"
)


def run_tls(full: bool, fixed_malloc: bool, started: float) -> None:
    """`--only tls`: every TLS cell, and sendfile over TLS."""
    sizes = [1024, 10 * 1024, 100 * 1024] if full else [1024, 10 * 1024]
    cycles = 20
    frameworks = echo.run_matrix(echo.TLS_FRAMEWORK_KINDS, [1024], [10, 100], cycles, 100, fixed_malloc)
    cells = echo.run_matrix(["tls"], sizes, [10, 100], cycles, 100, fixed_malloc)
    handshakes = echo.run_matrix([echo.HANDSHAKES], [1024], [1], cycles, 100, fixed_malloc)
    sendfile = tls_sendfile.run(100 << 20, 10)
    malloc = "glibc.malloc thresholds pinned (diagnostic)" if fixed_malloc else "glibc's default allocator settings"
    summary = "\n\n".join(
        [
            (
                f"Machine: {machine()}. TLS cells only, {cycles} cycles of 100 ms slices per cell, {malloc}; "
                "keep-alive connections (handshakes before the first measured slice)."
            ),
            "## Frameworks over HTTPS\n\n" + echo.markdown(frameworks),
            "## TLS echo\n\n" + echo.markdown(cells),
            HANDSHAKES_HEAD + echo.markdown(handshakes),
            "## sendfile over TLS\n\n" + tls_sendfile.markdown(sendfile),
        ]
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tls.md").write_text(summary + "\n")
    payload = {
        "machine": machine(), "frameworks": frameworks, "cells": cells, "handshakes": handshakes,
        "sendfile": sendfile,
    }
    (RESULTS / "tls.json").write_text(json.dumps(payload, indent=1))
    written = [RESULTS / "tls.md", RESULTS / "tls.json"]
    try:
        chart(frameworks + cells, RESULTS / "tls.png", "ferroloop over TLS")
        written.append(RESULTS / "tls.png")
    except ImportError:
        print("matplotlib is not installed: no chart", file=sys.stderr)
    print(summary)
    print(f"\n(took {time.monotonic() - started:.0f} s; wrote {written_names(written)})", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", choices=["tls"], help="tls: only the TLS cells and sendfile over TLS")
    parser.add_argument(
        "--fixed-malloc", action="store_true", help="diagnostic: pin glibc's trim and mmap thresholds in every server"
    )
    args = parser.parse_args()
    started = time.monotonic()
    if args.only == "tls":
        run_tls(args.full, args.fixed_malloc, started)
        return
    if args.full:
        sizes, ws_sizes, cycles, micro_cycles = [1024, 10 * 1024, 100 * 1024], [1024, 100 * 1024], 20, 15
    else:
        sizes, ws_sizes, cycles, micro_cycles = [1024], [1024], 6, 6
    # The framework cells over HTTPS run in quick mode too: they add about 10 s.
    framework_kinds = echo.FRAMEWORK_KINDS + echo.TLS_FRAMEWORK_KINDS
    frameworks = echo.run_matrix(framework_kinds, ws_sizes, [10, 100], cycles, 100, args.fixed_malloc)
    cells = echo.run_matrix(echo.KINDS, sizes, [10, 100], cycles, 100, args.fixed_malloc)
    churn = echo.run_matrix([echo.CHURN], [1024], [1, 10], cycles, 100, args.fixed_malloc)
    c10k = echo.run_c10k() if args.full else None
    handshakes = echo.run_matrix([echo.HANDSHAKES], [1024], [1], cycles, 100, args.fixed_malloc) if args.full else None
    sendfile = tls_sendfile.run(100 << 20, 10) if args.full else None
    micro_table, micro_raw = micro_section(micro_cycles)

    RESULTS.mkdir(exist_ok=True)
    mode = "full" if args.full else "quick"
    malloc = "glibc.malloc thresholds pinned (diagnostic)" if args.fixed_malloc else "glibc's default allocator settings"
    parts = [
        f"Machine: {machine()}. Mode: {mode}, {cycles} cycles of 100 ms slices per cell, {malloc}.",
        "## Frameworks\n\n" + echo.markdown(frameworks),
        "## Echo\n\n" + echo.markdown(cells),
    ]
    parts.append(CHURN_HEAD + echo.markdown(churn))
    if c10k:
        parts.append(echo.c10k_markdown(c10k))
    if handshakes:
        parts.append(HANDSHAKES_HEAD + echo.markdown(handshakes))
    if sendfile:
        parts.append("## sendfile over TLS\n\n" + tls_sendfile.markdown(sendfile))
    parts.append("## Micro\n\n" + micro_table)
    summary = "\n\n".join(parts)
    (RESULTS / "summary.md").write_text(summary + "\n")
    (RESULTS / "suite.json").write_text(
        json.dumps(
            {
                "machine": machine(), "frameworks": frameworks, "cells": cells, "churn": churn, "c10k": c10k,
                "handshakes": handshakes, "sendfile": sendfile, "micro": micro_raw,
            },
            indent=1,
        )
    )
    written = [RESULTS / "summary.md", RESULTS / "suite.json"]
    try:
        chart(frameworks, RESULTS / "frameworks.png", "ferroloop on the frameworks users deploy")
        chart(cells, RESULTS / "suite.png", "ferroloop echo workloads")
        written += [RESULTS / "frameworks.png", RESULTS / "suite.png"]
    except ImportError:
        print("matplotlib is not installed: no charts", file=sys.stderr)
    print(summary)
    print(f"\n(took {time.monotonic() - started:.0f} s; wrote {written_names(written)})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
