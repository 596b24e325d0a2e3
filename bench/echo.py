"""Network benchmark: ferroloop beside asyncio, uvloop, the Rust loops and a pure-Rust
epoll server, on echo workloads and on the frameworks users deploy (uvicorn, Starlette,
aiohttp, websockets: bench/framework_servers.py).

One Rust load generator (bench/loadgen, pinned to the second core) keeps connections
open to every server at once and gives each server a short slice of closed-loop
traffic in turn (order rotated every cycle) while the others are stopped with SIGSTOP,
verifying every echoed byte (every framework response: status, and the body framed by
its Content-Length; every WebSocket frame). Servers run with glibc's default allocator
settings, as users run them. Per cell it reports requests/s, server CPU µs per request
(server CPU time / requests: the steadiest figure on a shared machine), p50/p99
latency, and ferroloop's ratio to uvloop as the median of per-cycle ratios with the
p25-p75 spread. `tls-handshake` (not in the default kinds) makes each request a new
TLS connection (one at a time with `--conns 1`, as the suite runs it; N connectors
at once with N) to the TLS streams echo: its requests/s are connections/s
and its CPU µs per request the server's CPU per connection. `churn` (not in the default
kinds either) is the same without TLS: a new plain TCP connection per 1 KiB echo, to the
streams echo (`asyncio.start_server`, what users write a TCP service with), with as many
connectors at once as the cell's connections. The other TLS workloads (`tls`, the streams echo over TLS; `uvicorn-tls` and
`aiohttp-tls`, the framework servers over HTTPS) use a certificate made for the run
(bench/_tls.py) and keep-alive connections, opened with their handshakes before the
first measured slice: they measure records, not handshakes.

    python bench/echo.py [--kinds streams protocol buffered sock uvicorn aiohttp ...]
                         [--sizes 1024] [--conns 10 100] [--cycles 20] [--slice-ms 100]
                         [--fixed-malloc] [--json PATH] [--markdown PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

from _loops import available_loops
from _stats import spread, write_outputs
from _tls import TlsFiles, test_suite_files, tls_files
from framework_servers import FRAMEWORKS

BENCH = Path(__file__).resolve().parent
LOADGEN_DIR = BENCH / "loadgen"
LOADGEN = LOADGEN_DIR / "target" / "release" / "ferroloop-loadgen"
KINDS = ["streams", "readline", "protocol", "buffered", "sock", "http", "tls"]
# The TLS streams echo server, each request a new connection (bench/loadgen
# `handshakes`: connect, full handshake, one echo, close_notify, close), from as many
# connectors at once as the cell's connections.
HANDSHAKES = "tls-handshake"
# The same without TLS (connect, one echo, the client's half-close, the server's close),
# `--conns` connectors at a time.
CHURN = "churn"
# The kinds whose every request is a new connection (bench/loadgen `handshakes`).
PER_CONNECTION = {HANDSHAKES, CHURN}


def uses_tls(kind: str) -> bool:
    return kind in ("tls", HANDSHAKES) or kind.endswith("-tls")


FRAMEWORK_KINDS = [k for k in FRAMEWORKS if not uses_tls(k)]
# The framework servers over HTTPS (keep-alive: the load generator's connections make
# their handshakes in the warm-up and live through every slice, so the cells measure
# records, not handshakes).
TLS_FRAMEWORK_KINDS = [k for k in FRAMEWORKS if uses_tls(k)]
# What the load generator sends to each kind of server (echo unless listed), and the
# kinds the pure-Rust echo server is no ceiling for.
MODES = {"readline": "line", "http": "http"}
NO_CEILING = {"readline", "http", "tls", HANDSHAKES, *FRAMEWORKS}
# Servers run with the allocator settings users have: glibc's defaults. glibc moves its
# trim and mmap thresholds as a process frees large blocks, so allocation order can
# decide whether freed heap goes back to the kernel and is faulted in again by the next
# request (measured here: TLS echo at 100 KiB x 100 made 1.3 page faults per request in
# one run of a server and 23 in the next, for uvloop and ferroloop alike). That is part
# of what users get; `--fixed-malloc` pins both thresholds, as a diagnostic that tells
# the allocator's share from the loop's.
FIXED_MALLOC = "glibc.malloc.trim_threshold=8388608:glibc.malloc.mmap_threshold=1048576"


def server_env(fixed_malloc: bool, tls: TlsFiles | None = None) -> dict | None:
    extra = {"GLIBC_TUNABLES": FIXED_MALLOC} if fixed_malloc else {}
    if tls is not None:
        extra.update(tls.server_env())
    return {**os.environ, **extra} if extra else None


def build_loadgen() -> None:
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--manifest-path", str(LOADGEN_DIR / "Cargo.toml")],
        check=True,
    )


def cores() -> tuple[int | None, int | None]:
    """(server core, load generator core), when the machine has two to give."""
    if not hasattr(os, "sched_getaffinity"):
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin(pid: int, core: int | None) -> None:
    """Pins a process we just started (threads it starts later inherit this)."""
    if core is not None:
        os.sched_setaffinity(pid, {core})


class Server:
    def __init__(self, argv: list[str], core: int | None, env: dict | None = None):
        # The server's stderr goes to a file: a server that cannot start is reported
        # in one line (its last), not as a traceback in the middle of the run.
        self.errors = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self.errors, text=True, env=env)
        pin(self.proc.pid, core)
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.proc.wait()
            self.proc.stdout.close()
            self.errors.seek(0)
            lines = [ln.strip() for ln in self.errors.read().splitlines() if ln.strip()]
            self.errors.close()
            raise RuntimeError(lines[-1] if lines else f"exit status {self.proc.returncode}")
        self.port = int(line)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        self.errors.close()


def run_cell(targets: dict[str, Server], kind, size, conns, cycles, slice_ms, gen_core, ca=None) -> dict:
    command = "handshakes" if kind in PER_CONNECTION else "run"
    argv = [str(LOADGEN), command, "--size", str(size), "--conns", str(conns)]
    if kind in FRAMEWORKS:
        mode, path, body = FRAMEWORKS[kind]
        argv += ["--mode", mode]
        if path is not None:
            argv += ["--path", path, "--body", body.decode()]
    elif kind not in PER_CONNECTION:
        argv += ["--mode", MODES.get(kind, "echo")]
    if uses_tls(kind):
        # Servers started without the harness's certificate (bench/ab.py starts its own)
        # use the test suite's.
        argv += ["--tls-ca", ca or test_suite_files().ca]
    argv += ["--slice-ms", str(slice_ms), "--cycles", str(cycles)]
    for name, server in targets.items():
        argv += ["--target", f"{name},{server.pid},{server.port}"]

    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    pin(proc.pid, gen_core)
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    return {t["name"]: t for t in json.loads(out)["targets"]}


def summarise(cell: dict, loops: list[str]) -> dict:
    rows = {}
    for name, t in cell.items():
        slices = t["slices"]
        rows[name] = {
            "rps": statistics.median(r / w for r, w, _ in slices),
            "cpu_us": statistics.median(c / r * 1e6 for r, _, c in slices if r),
            "p50_us": t["p50_us"],
            "p99_us": t["p99_us"],
            "per_cycle": slices,
        }
    base = "uvloop" if "uvloop" in cell else "asyncio"
    for name in cell:
        ours, theirs = cell[name]["slices"], cell[base]["slices"]
        rows[name]["rps_ratio"] = spread([(a[0] / a[1]) / (b[0] / b[1]) for a, b in zip(ours, theirs)])
        rows[name]["cpu_ratio"] = spread(
            [(a[2] / a[0]) / (b[2] / b[0]) for a, b in zip(ours, theirs) if a[0] and b[0]]
        )
    rows["_base"] = base
    return rows


def sized(kind: str) -> bool:
    """Whether the workload's message size is the cell's (a framework's HTTP response is
    fixed by the app)."""
    return kind not in FRAMEWORKS or FRAMEWORKS[kind][0] == "ws"


def size_label(res: dict, sep: str = " ") -> str:
    size = res["size"]
    if size is None:
        return "app"
    return f"{size // 1024}{sep}KiB" if size >= 1024 else f"{size}{sep}B"


def markdown(results: list[dict]) -> str:
    head = [
        "workload", "size", "conns", "server", "requests/s", "vs uvloop (p25-p75)",
        "CPU µs/req", "CPU vs uvloop", "p50 µs", "p99 µs",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        for name, row in res["rows"].items():
            if name.startswith("_"):
                continue
            med, p25, p75 = row["rps_ratio"]
            cmed, _, _ = row["cpu_ratio"]
            bold = "**" if name == "ferroloop" else ""
            lines.append(
                "| "
                + " | ".join(
                    [
                        res["kind"], size_label(res),
                        str(res["conns"]), f"{bold}{name}{bold}", f"{row['rps']:,.0f}",
                        f"{bold}{med:.2f}x{bold} ({p25:.2f}-{p75:.2f})", f"{row['cpu_us']:.1f}",
                        f"{cmed:.2f}x", str(row["p50_us"]), str(row["p99_us"]),
                    ]
                )
                + " |"
            )
        for name, reason in res.get("left_out", {}).items():
            # The server's last error line; a table cell cannot hold a bar.
            cells = [res["kind"], size_label(res), str(res["conns"]), name, "—"]
            cells.append(f"cannot serve it: {reason.replace('|', '/')}")
            lines.append("| " + " | ".join(cells + ["—"] * (len(head) - len(cells))) + " |")
    return "\n".join(lines)


def server_argv(name: str, kind: str) -> list[str]:
    script = "framework_servers.py" if kind in FRAMEWORKS else "echo_servers.py"
    return [sys.executable, str(BENCH / script), name, kind]


def start_servers(kind, loops, core, env, stack: ExitStack) -> tuple[dict, dict]:
    """Every loop's server of `kind` ({name: Server}, stopped when `stack` closes), and
    the loops that could not serve it ({name: the server's last error line})."""
    servers, left_out = {}, {}
    for name in loops:
        try:
            servers[name] = Server(server_argv(name, kind), core, env)
        except RuntimeError as exc:
            # rloop, for one, has no TLS: the loop is left out of that workload, and its
            # cells say why.
            left_out[name] = str(exc)
            print(f"{name} cannot serve {kind} ({exc}): left out", file=sys.stderr)
            continue
        stack.callback(servers[name].stop)
    return servers, left_out


def run_matrix(kinds, sizes, conns_list, cycles, slice_ms, fixed_malloc=False) -> list[dict]:
    """Every (kind, size, conns) cell: all loops' servers of a kind run at once and share
    the load generator's cycles. A framework cell has one size (its fixed response)."""
    build_loadgen()
    loops = available_loops()
    server_core, gen_core = cores()
    results = []
    with ExitStack() as stack:
        # Certificates made for this run only if a workload speaks TLS, removed after it.
        tls = stack.enter_context(tls_files()) if any(uses_tls(k) for k in kinds) else None
        env = server_env(fixed_malloc, tls)
        ceiling = Server([str(LOADGEN), "serve"], server_core, env)
        stack.callback(ceiling.stop)
        for kind in kinds:
            with ExitStack() as running:
                servers, left_out = start_servers(kind, loops, server_core, env, running)
                if "ferroloop" not in servers:
                    print(f"no {kind} workload: ferroloop's server did not start", file=sys.stderr)
                    continue
                for size in sizes if sized(kind) else sizes[:1]:
                    for conns in conns_list:
                        print(f"{kind} {size} B x {conns} connections", file=sys.stderr, flush=True)
                        # The pure-Rust server only echoes: it is the ceiling of echo cells.
                        targets = {**({"rust-epoll": ceiling} if kind not in NO_CEILING else {}), **servers}
                        ca = tls.ca if tls is not None else None
                        cell = run_cell(targets, kind, size, conns, cycles, slice_ms, gen_core, ca)
                        results.append(
                            {
                                "kind": kind,
                                "size": size if sized(kind) else None,
                                "conns": conns,
                                "rows": summarise(cell, loops),
                                "left_out": left_out,
                            }
                        )
    return results


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def run_c10k(kind="streams", conns=10_000, rounds=3) -> dict:
    """10,000 idle connections per loop, one fresh server each time: server memory per
    connection (RSS growth) and the rate at which they were accepted and echoed once."""
    build_loadgen()
    loops = available_loops()
    server_core, gen_core = cores()
    raw = {name: [] for name in loops}
    for r in range(rounds):
        for name in loops[r % len(loops):] + loops[: r % len(loops)]:
            print(f"c10k {name} round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            server = Server([sys.executable, str(BENCH / "echo_servers.py"), name, kind], server_core)
            try:
                before = _rss_kib(server.pid)
                gen = subprocess.Popen(
                    [str(LOADGEN), "c10k", "--conns", str(conns), "--target", f"{name},{server.pid},{server.port}"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                )
                pin(gen.pid, gen_core)
                report = json.loads(gen.stdout.readline())
                after = _rss_kib(server.pid)
                gen.stdin.close()
                gen.wait(timeout=60)
                gen.stdout.close()
                raw[name].append(((after - before) / conns, conns / report["seconds"]))
            finally:
                server.stop()
    return {
        name: {
            "kib_per_conn": statistics.median(v[0] for v in values),
            "accepts_per_s": statistics.median(v[1] for v in values),
        }
        for name, values in raw.items()
    }


def c10k_markdown(rows: dict, kind="streams") -> str:
    lines = [
        f"| C10K ({kind} server) | server memory per connection | connections accepted and echoed per second |",
        "|---|---|---|",
    ]
    for name, row in rows.items():
        bold = "**" if name == "ferroloop" else ""
        lines.append(
            f"| {bold}{name}{bold} | {row['kib_per_conn']:.2f} KiB | {row['accepts_per_s']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kinds", nargs="*", default=KINDS, choices=KINDS + sorted(PER_CONNECTION) + list(FRAMEWORKS))
    parser.add_argument("--sizes", nargs="*", type=int, default=[1024])
    parser.add_argument("--conns", nargs="*", type=int, default=[10, 100])
    parser.add_argument("--cycles", type=int, default=20)
    parser.add_argument("--slice-ms", type=int, default=100)
    parser.add_argument("--c10k", action="store_true", help="also run the 10,000 idle connections test")
    parser.add_argument(
        "--fixed-malloc", action="store_true", help="diagnostic: pin glibc's trim and mmap thresholds in every server"
    )
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    results = run_matrix(args.kinds, args.sizes, args.conns, args.cycles, args.slice_ms, args.fixed_malloc)
    table = markdown(results)
    c10k = run_c10k() if args.c10k else None
    if c10k:
        table += "\n\n" + c10k_markdown(c10k)
    print(table)
    payload = {"cells": results, "c10k": c10k}
    write_outputs(((args.json, json.dumps(payload, indent=1)), (args.markdown, table)))


if __name__ == "__main__":
    main()
