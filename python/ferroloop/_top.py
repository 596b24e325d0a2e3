"""`python -m ferroloop top PATH [--interval S] [--json]`: a running program's loop,
live, from its inspection socket (`python -m ferroloop --inspect PATH app.py`).

The screen refreshes every interval: rates from the last two snapshots (turns,
callbacks, I/O events, bytes), the time split when the program has stats timing on,
what is queued and registered, then the connection table. `--json` prints one
snapshot and exits. In worker mode each worker serves `PATH.N`: give `top` that path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any

from ._inspect import request

USAGE = "python -m ferroloop top PATH [--interval SECONDS] [--json]"
CLEAR = "\x1b[H\x1b[2J"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m ferroloop top", usage=USAGE)
    parser.add_argument("path")
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--json", action="store_true", help="print one snapshot and exit")
    args = parser.parse_args(argv)
    try:
        if args.json:
            print(json.dumps(request(args.path), indent=1))
            return
        previous = None
        while True:
            snapshot = request(args.path)
            width = shutil.get_terminal_size((120, 40)).columns
            sys.stdout.write(CLEAR + "\n".join(render(snapshot, previous, width)) + "\n")
            sys.stdout.flush()
            if not snapshot.get("stalled"):
                previous = snapshot
            time.sleep(args.interval)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"python -m ferroloop top: {args.path}: {exc}", file=sys.stderr)
        sys.exit(1)


def render(snapshot: dict[str, Any], previous: dict[str, Any] | None, width: int = 120) -> list[str]:
    """The screen for `snapshot`, with rates against `previous` (None: no rates yet)."""
    who = f"pid {snapshot['pid']}"
    if snapshot.get("worker") is not None:
        who += f" (worker {snapshot['worker']})"
    clock = time.strftime("%H:%M:%S", time.localtime(snapshot["time"]))
    lines = [f"ferroloop top - {who} - {clock}"]
    if snapshot.get("closed"):
        return [*lines, "the loop is closed"]
    watchdog = snapshot.get("watchdog")
    if snapshot.get("stalled"):
        lines.append("LOOP NOT ANSWERING: a callback has been running for over 0.5 s")
        lines.extend(_stalls(watchdog, width))
        last = snapshot.get("last")
        if not last:
            return lines
        lines.append("last answer:")
        snapshot, previous = last, None
    stats = snapshot["stats"]
    lines.append(_rates(stats, previous, snapshot["time"]))
    lines.append(_time_split(stats, previous))
    lines.append(
        f"ready {stats['ready']}  timers pending {stats['timers_pending']}  "
        f"transports {stats['transports_registered']}  fds watched {stats['fds_watched']}  "
        f"pipes {stats['pipes_open']}  subprocesses {stats['subprocesses']}  "
        f"accepted {stats['connections_accepted']}  exceptions {stats['exceptions_reported']}"
    )
    if not snapshot.get("stalled"):
        lines.extend(_stalls(watchdog, width))
    connections = snapshot["connections"]
    lines.append("")
    lines.append(f"CONNECTIONS ({len(connections)})")
    header = f"{'KIND':<13} {'FD':>5} {'LOCAL':<22} {'PEER':<22} {'AGE':>8} {'IN':>10} {'OUT':>10} {'WBUF':>7} {'R':>1} TLS"
    lines.append(header[:width])
    for row in connections:
        lines.append(_connection(row)[:width])
    return lines


STACK_LINES = 12


def _stalls(reports: list[dict[str, Any]] | None, width: int) -> list[str]:
    """The watchdog's last stall: what blocked, for how long, and the stack it took."""
    if reports is None:
        return ["watchdog off: --watchdog 100ms (or FERROLOOP_WATCHDOG) shows stalls with their stacks"]
    stalls = [r for r in reports if r["kind"] == "stalled"]
    if not stalls:
        return ["watchdog on: no stall"]
    stall = stalls[-1]
    recovered = [r for r in reports if r["kind"] == "recovered" and r["time"] >= stall["time"]]
    when = time.strftime("%H:%M:%S", time.localtime(stall["time"]))
    task = f" (task {stall['task']})" if stall.get("task") else ""
    state = (f"blocked {recovered[0]['duration']:.3f} s in all" if recovered
             else "STILL BLOCKED")
    lines = [f"last stall {when}: {state}, reported after {stall['duration']:.3f} s: "
             f"{stall['handle']}{task}"[:width]]
    if stall.get("coroutine_chain"):
        lines.append(("await chain: " + " -> ".join(stall["coroutine_chain"]))[:width])
    if stall.get("stack"):
        stack = stall["stack"].rstrip("\n").splitlines()
        lines.extend(line[:width] for line in stack[-STACK_LINES:])
    return lines


def _rates(stats: dict[str, Any], previous: dict[str, Any] | None, now: float) -> str:
    names = [("turns", "turns/s"), ("callbacks", "callbacks/s"), ("io_events", "io/s"),
             ("bytes_read", "in B/s"), ("bytes_written", "out B/s")]
    if previous is None:
        return "  ".join(f"{label} -" for _, label in names) + "  (rates from the next refresh)"
    seconds = max(now - previous["time"], 1e-9)
    before = previous["stats"]
    return "  ".join(
        f"{label} {(stats[key] - before[key]) / seconds:,.0f}" for key, label in names
    )


def _time_split(stats: dict[str, Any], previous: dict[str, Any] | None) -> str:
    if not stats.get("timing"):
        return "time split: stats timing is off (FERROLOOP_STATS_TIMING=1 or loop.set_stats_timing(True))"
    before = previous["stats"] if previous and previous["stats"].get("timing") else {}
    polling = stats["time_polling"] - before.get("time_polling", 0.0)
    running = stats["time_running"] - before.get("time_running", 0.0)
    total = polling + running
    if total <= 0:
        return "time split: -"
    return f"time split: polling {100 * polling / total:.1f}%  running {100 * running / total:.1f}%"


def _connection(row: dict[str, Any]) -> str:
    tls = ""
    if row.get("tls"):
        tls = f"{row['tls'].get('version') or '-'} {row['tls'].get('cipher') or ''}"
    reading = {True: "y", False: "n", None: "-"}[row.get("reading")]
    return (
        f"{row['kind']:<13} {_cell(row.get('fd')):>5} {_address(row.get('local')):<22} "
        f"{_address(row.get('peer')):<22} {_age(row.get('age')):>8} "
        f"{_cell(row.get('bytes_read')):>10} {_cell(row.get('bytes_written')):>10} "
        f"{_cell(row.get('write_buffer_size')):>7} {reading} {tls}"
    )


def _address(address) -> str:
    if address is None:
        return "-"
    if isinstance(address, list) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return os.fspath(address) if isinstance(address, str) else str(address)


def _age(age) -> str:
    if age is None:
        return "-"
    if age < 60:
        return f"{age:.1f}s"
    if age < 3600:
        return f"{age / 60:.1f}m"
    return f"{age / 3600:.1f}h"


def _cell(value) -> str:
    return "-" if value is None else str(value)
