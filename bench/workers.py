"""Worker mode, 1 worker against 2: the same server on a fixed port under
`python -m ferroloop --workers 1` and `--workers 2`, driven by the project's load
generator (bench/loadgen). Two servers: `http`, echo_servers.py's httptools keep-alive
server (a few µs per request: the load generator, not the server, is the bottleneck),
and `starlette`, framework_servers.py's Starlette JSON route under uvicorn (tens of µs
per request, where a second core has work to do).

The load generator holds --conns connections to each configuration and gives them
slices of closed-loop traffic in turn (order rotated every cycle), so the two are
measured alternately over the same minutes. Nothing is pinned: on a 2-core machine the
two workers and the load generator share the cores, so the 2-worker figure is bounded
by what the load generator leaves. Per configuration: requests/s (median of slices),
the workers' CPU per request (all workers' CPU time from /proc, summed over the run,
divided by their requests), and the ratio of 2 workers to 1 as the median of per-cycle
ratios with the p25-p75 spread.

    python bench/workers.py [--kinds http starlette] [--conns 100] [--cycles 20]
                            [--slice-ms 200] [--json PATH] [--markdown PATH]
    python -m ferroloop --workers N bench/workers.py --serve KIND PORT   # a server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _stats import spread, write_outputs

BENCH = Path(__file__).resolve().parent
LOADGEN_DIR = BENCH / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "ferroloop-loadgen"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


SIZE = 1024  # the http server's response body
# kind -> the load generator's arguments for it
LOAD = {
    "http": ["--mode", "http", "--size", str(SIZE)],
    "starlette": ["--mode", "http-any", "--path", "/json", "--body", '{"hello":"world"}'],
}


async def serve(kind: str, port: int) -> None:
    if kind == "http":
        from echo_servers import HttpProtocol

        loop = asyncio.get_running_loop()
        server = await loop.create_server(HttpProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()
    else:
        import uvicorn
        from framework_servers import starlette_app

        config = uvicorn.Config(
            starlette_app(), host="127.0.0.1", port=port, http="httptools", lifespan="off",
            access_log=False, log_level="warning", backlog=1024,
        )
        await uvicorn.Server(config).serve()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_pids(supervisor: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == supervisor:
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


class Workers:
    """`python -m ferroloop --workers N` serving this file's HTTP server."""

    def __init__(self, count: int, kind: str):
        self.count = count
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ferroloop", "--workers", str(count), __file__,
             "--serve", kind, str(self.port)],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while len(self.pids()) < count or not self.listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"--workers {count} did not start")
            time.sleep(0.1)

    def pids(self) -> list[int]:
        return worker_pids(self.proc.pid)

    def listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def cpu(self) -> float:
        return sum(cpu_seconds(pid) for pid in self.pids())

    def stop(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)  # the load generator leaves it stopped
        self.proc.terminate()
        self.proc.wait(timeout=60)


def measure(kind: str, args) -> dict:
    configs = {f"{n} worker{'s' if n > 1 else ''}": Workers(n, kind) for n in (1, 2)}
    try:
        before = {name: w.cpu() for name, w in configs.items()}
        argv = [str(LOADGEN), "run", *LOAD[kind], "--conns", str(args.conns),
                "--slice-ms", str(args.slice_ms), "--cycles", str(args.cycles)]
        for name, w in configs.items():
            argv += ["--target", f"{name},{w.proc.pid},{w.port}"]
        out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
        cpu = {name: w.cpu() - before[name] for name, w in configs.items()}
    finally:
        for w in configs.values():
            w.stop()
    targets = {t["name"]: t for t in json.loads(out)["targets"]}
    rows = {}
    for name, t in targets.items():
        requests = sum(r for r, _, _ in t["slices"])
        rows[name] = {
            "rps": statistics.median(r / w for r, w, _ in t["slices"]),
            "cpu_us": cpu[name] / requests * 1e6 if requests else None,
            "p50_us": t["p50_us"],
            "p99_us": t["p99_us"],
            "per_cycle": t["slices"],
        }
    one, two = (targets[name]["slices"] for name in configs)
    ratio = spread([(b[0] / b[1]) / (a[0] / a[1]) for a, b in zip(one, two)])
    return {"kind": kind, "rows": rows, "ratio": ratio}


WHAT = {
    "http": f"httptools keep-alive server, {SIZE} B responses",
    "starlette": "uvicorn + Starlette JSON route",
}


def markdown(results: list[dict], conns: int) -> str:
    lines = [
        (
            f"{conns} keep-alive connections per configuration; {len(os.sched_getaffinity(0))} "
            "cores shared by the workers and the load generator (nothing pinned)"
        ),
        "",
        (
            "| server | workers | requests/s | workers' CPU µs/request | p50 µs | p99 µs "
            "| 2 workers / 1 (p25-p75) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        median, p25, p75 = result["ratio"]
        for name, row in result["rows"].items():
            cpu = f"{row['cpu_us']:.1f}" if row["cpu_us"] is not None else "-"
            ratio = f"{median:.2f}x ({p25:.2f}-{p75:.2f})" if name.startswith("2") else ""
            lines.append(
                f"| {WHAT[result['kind']]} | {name} | {row['rps']:,.0f} | {cpu} "
                f"| {row['p50_us']} | {row['p99_us']} | {ratio} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", nargs=2, metavar=("KIND", "PORT"), help=argparse.SUPPRESS)
    parser.add_argument("--kinds", nargs="*", default=list(LOAD), choices=list(LOAD))
    parser.add_argument("--conns", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--slice-ms", type=int, default=200)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(serve(args.serve[0], int(args.serve[1])))
        return
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", str(LOADGEN_DIR / "Cargo.toml")],
        check=True,
    )
    results = [measure(kind, args) for kind in args.kinds]
    text = markdown(results, args.conns)
    print(text)
    write_outputs([(args.json, json.dumps(results, indent=2)), (args.markdown, text)])


if __name__ == "__main__":
    main()
