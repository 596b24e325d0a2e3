"""sendfile over TLS: the baseline for kernel TLS.

    python bench/tls_sendfile.py [--size-mib 100] [--cycles 10] [--json PATH] [--markdown PATH]
    python bench/tls_sendfile.py --serve LOOP FILE     # one server: prints its port

A file of random bytes (100 MiB) is sent over a TLS connection to one client, on each
loop, two ways: `loop.sendfile(transport, file)` on the TLS transport, and the same file
read in 256 KiB chunks written with `transport.write`, each followed by `drain()`. The
client (this process, pinned to the second core; each server to the first) holds one
connection per (loop, way), asks for the file with one byte and counts what comes back
until the whole file is in. The first transfer on each connection is a warm-up whose
bytes are hashed and compared with the file's SHA-256; each later one gives MB/s (file
bytes over the wall time from request to last byte) and the server's CPU seconds (all
its threads: asyncio's sendfile fallback reads the file in the default executor), and
the client's own CPU seconds (it decrypts with the same libssl: near the wall time, the
client is what limits MB/s, and the server's CPU is the figure to compare). The
order of the loops is rotated every cycle; ratios are medians of per-cycle ratios with
their p25-p75 spread. Each server also says what its `sendfile` does on a TLS transport
(the transport's sendfile mode, as `BaseEventLoop.sendfile` consults it, and whether
the loop has its own fallback, or that the loop has no `sendfile`); one whose `sendfile` fails answers with the error and its row
says so.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from _loops import available_loops, new_loop
from _stats import spread, write_outputs
from _tls import server_context, tls_files

BENCH = Path(__file__).resolve().parent
CHUNK = 256 * 1024
# What the client asks for: the file by sendfile, the file by write, what sendfile does.
SENDFILE, WRITE, DESCRIBE = b"s", b"w", b"?"
WAYS = {SENDFILE: "sendfile", WRITE: "write+drain"}
ERROR = b"error: "


def sendfile_path(loop, transport) -> str:
    if getattr(type(loop), "sendfile", None) is asyncio.AbstractEventLoop.sendfile:
        return "no loop.sendfile (AbstractEventLoop's NotImplementedError)"
    mode = getattr(transport, "_sendfile_compatible", None)
    if mode is None:
        return f"{type(transport).__name__}, no sendfile mode"
    own = getattr(type(loop), "_sendfile_fallback", None) is not asyncio.BaseEventLoop._sendfile_fallback
    if mode.name == "FALLBACK" and own:
        return f"{type(transport).__name__}: FALLBACK, {type(loop).__name__}'s own"
    return f"{type(transport).__name__}: {mode.name}"


async def send(loop, writer, file, way: bytes) -> None:
    file.seek(0)
    if way == SENDFILE:
        await loop.sendfile(writer.transport, file)
        return
    while chunk := file.read(CHUNK):
        writer.write(chunk)
        await writer.drain()


async def serve(file) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)

    # One file for every connection: the client asks for one transfer at a time.
    async def handler(reader, writer):
        while way := await reader.read(1):
            if way == DESCRIBE:
                writer.write(sendfile_path(loop, writer.transport).encode() + b"\n")
                continue
            try:
                await send(loop, writer, file, way)
            except Exception as exc:  # noqa: BLE001 - the client reports what failed
                text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                writer.write(ERROR + text.encode())
                break
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context())
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop
    server.close()


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of `pid` (the executor's threads too)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total * 1e-9


def make_file(folder: str, size: int) -> tuple[str, str]:
    """A file of `size` random bytes, and its SHA-256."""
    path = os.path.join(folder, "payload.bin")
    digest = hashlib.sha256()
    block = 1 << 20
    with open(path, "wb") as fh:
        for start in range(0, size, block):
            data = os.urandom(min(block, size - start))
            digest.update(data)
            fh.write(data)
    return path, digest.hexdigest()


class Client:
    """One TLS connection to a server, asking for the file one way."""

    def __init__(self, ctx: ssl.SSLContext, port: int, size: int):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.size = size
        self.buf = bytearray(1 << 20)

    def describe(self) -> str:
        self.sock.sendall(DESCRIBE)
        line = b""
        while not line.endswith(b"\n"):
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("the server closed instead of describing its sendfile")
            line += chunk
        return line.decode().strip()

    def transfer(self, way: bytes, digest=None) -> str | None:
        """Asks for the file and reads all of it; None, or why it did not come whole."""
        self.sock.sendall(way)
        view = memoryview(self.buf)
        got, head = 0, b""
        while got < self.size:
            try:
                n = self.sock.recv_into(view)
            except (ssl.SSLError, ConnectionError) as exc:
                return self.cut_short(head, got, f" ({exc})")
            if n == 0:
                return self.cut_short(head, got, "")
            if len(head) < 512:
                head += bytes(view[: min(n, 512)])
            if digest is not None:
                digest.update(view[:n])
            got += n
        return None

    def cut_short(self, head: bytes, got: int, how: str) -> str:
        if head.startswith(ERROR):
            return head[len(ERROR):].decode(errors="replace")
        return f"closed after {got} of {self.size} bytes{how}"

    def close(self) -> None:
        self.sock.close()


def start(name, payload, size, ctx, cores_, env, stack: ExitStack) -> tuple[dict, dict]:
    """The loop's server (stopped when `stack` closes) and one client per way, each past
    its warm-up transfer: ({way: client} of the ways that work, the loop's result row)."""
    from echo import Server

    path, sha256 = payload
    try:
        server = Server([sys.executable, str(BENCH / "tls_sendfile.py"), "--serve", name, path], cores_[0], env)
    except RuntimeError as exc:
        print(f"{name} cannot serve TLS ({exc}): left out", file=sys.stderr)
        return {}, {"left_out": str(exc)}
    stack.callback(server.stop)
    row = {"pid": server.pid, "ways": {}}
    clients = {}
    for way, label in WAYS.items():
        client = Client(ctx, server.port, size)
        stack.callback(client.close)
        if way == SENDFILE:
            row["sendfile_path"] = client.describe()
        digest = hashlib.sha256()
        failed = client.transfer(way, digest)
        if failed is None and digest.hexdigest() != sha256:
            raise RuntimeError(f"{name}: the file came back different by {label}")
        row["ways"][label] = {"failed": failed, "transfers": []}
        if failed is None:
            clients[way] = client
    return clients, row


def run(size: int, cycles: int) -> dict:
    # Imported here: echo imports the framework servers' module, which a server needs not.
    from echo import cores

    server_core, client_core = cores()
    results = {"size": size, "cycles": cycles, "loops": {}}
    with ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="ferroloop-bench-sendfile-"))
        payload = make_file(folder, size)
        tls = stack.enter_context(tls_files())
        env = {**os.environ, **tls.server_env()}
        ctx = ssl.create_default_context(cafile=tls.ca)
        if client_core is not None:
            stack.callback(os.sched_setaffinity, 0, os.sched_getaffinity(0))
            os.sched_setaffinity(0, {client_core})
        order = []
        for name in available_loops():
            clients, results["loops"][name] = start(name, payload, size, ctx, (server_core, client_core), env, stack)
            order += [(name, way, client) for way, client in clients.items()]
        for cycle in range(cycles):
            print(f"\r  sendfile over TLS: cycle {cycle + 1}/{cycles}", end="", file=sys.stderr, flush=True)
            for name, way, client in order:
                row = results["loops"][name]
                cpu0, mine0, t0 = cpu_seconds(row["pid"]), time.process_time(), time.perf_counter()
                failed = client.transfer(way)
                wall = time.perf_counter() - t0
                cpu, mine = cpu_seconds(row["pid"]) - cpu0, time.process_time() - mine0
                if failed is not None:
                    raise RuntimeError(f"{name} {WAYS[way]}: {failed}")
                row["ways"][WAYS[way]]["transfers"].append((wall, cpu, mine))
            order = order[1:] + order[:1]
        print(file=sys.stderr)
    return summarise(results)


def summarise(results: dict) -> dict:
    size = results["size"]
    base = results["loops"].get("uvloop", {}).get("ways", {}).get("write+drain")
    if not base or base["failed"]:
        base = results["loops"]["asyncio"]["ways"]["write+drain"]
    for row in results["loops"].values():
        ways = row.get("ways", {})
        own_write = ways.get("write+drain", {}).get("transfers")
        for way in ways.values():
            runs = way["transfers"]
            if not runs:
                continue
            way["mb_s"] = statistics.median(size / 1e6 / run[0] for run in runs)
            way["cpu_s"] = statistics.median(run[1] for run in runs)
            way["client_cpu_s"] = statistics.median(run[2] for run in runs)
            # Per cycle: this transfer's speed over uvloop's write, and over the loop's own.
            way["vs_base_write"] = spread([b[0] / a[0] for a, b in zip(runs, base["transfers"])])
            if own_write:
                way["vs_own_write"] = spread([b[0] / a[0] for a, b in zip(runs, own_write)])
    results["base"] = "uvloop" if results["loops"].get("uvloop", {}).get("ways") else "asyncio"
    return results


def markdown(results: dict) -> str:
    base = results["base"]
    head = [
        "server", "way", "what sendfile does on a TLS transport", "MB/s", f"vs {base} write (p25-p75)",
        "vs own write (p25-p75)", f"server CPU s per {results['size'] >> 20} MiB", "client CPU s",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in results["loops"].items():
        bold = "**" if name == "ferroloop" else ""
        if "left_out" in row:
            lines.append(f"| {name} | — | cannot serve TLS: {row['left_out'].replace('|', '/')} |" + " — |" * 5)
            continue
        for label, way in row["ways"].items():
            path = row.get("sendfile_path", "—") if label == "sendfile" else "—"
            if way["failed"]:
                cells = [f"{bold}{name}{bold}", label, path, f"failed: {way['failed']}", "—", "—", "—", "—"]
            else:
                m, p25, p75 = way["vs_base_write"]
                own = "—"
                if label == "sendfile" and "vs_own_write" in way:
                    o, o25, o75 = way["vs_own_write"]
                    own = f"{bold}{o:.2f}x{bold} ({o25:.2f}-{o75:.2f})"
                cells = [
                    f"{bold}{name}{bold}", label, path, f"{way['mb_s']:,.0f}", f"{m:.2f}x ({p25:.2f}-{p75:.2f})",
                    own, f"{way['cpu_s']:.3f}", f"{way['client_cpu_s']:.3f}",
                ]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", nargs=2, metavar=("LOOP", "FILE"))
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.serve:
        name, path = args.serve
        loop = new_loop(name)
        try:
            with open(path, "rb") as file:
                loop.run_until_complete(serve(file))
        finally:
            loop.close()
        return
    results = run(args.size_mib << 20, args.cycles)
    table = markdown(results)
    print(table)
    write_outputs(((args.json, json.dumps(results, indent=1)), (args.markdown, table)))


if __name__ == "__main__":
    main()
