"""`python -m ferroloop top PATH [--interval S] [--json]`: a running program's loop,
live, from its inspection socket (`python -m ferroloop --inspect PATH app.py`).

The screen refreshes every interval: rates from the last two snapshots (turns,
callbacks, I/O events, bytes), the time split and the slowest callbacks since the last
refresh when the program has stats timing on, what is queued and registered, then the
connection table. `--json` prints one snapshot and exits.

In worker mode (`--workers N --inspect PATH`) each worker serves `PATH.N` and the
supervisor nothing: `top PATH` then finds the workers' sockets (afresh at each refresh,
so restarted workers are followed) and shows a total row and a row per worker; a
worker that does not answer is shown as such. `top PATH.N` shows that one worker
in full.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
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
            workers = worker_paths(args.path)
            reply = gather(args.path, workers) if workers else request(args.path)
            print(json.dumps(reply, indent=1))
            return
        previous: Any = None
        while True:
            width = shutil.get_terminal_size((120, 40)).columns
            workers = worker_paths(args.path)
            if workers:
                snapshot = gather(args.path, workers)
                # (the previous screen may have been of one loop: PATH came or went)
                lines = render_workers(snapshot, previous if previous and "workers" in previous
                                       else None, width)
                previous = snapshot
            else:
                snapshot = request(args.path)
                lines = render(snapshot, previous if previous and "workers" not in previous
                               else None, width)
                if not snapshot.get("stalled"):
                    previous = snapshot
            sys.stdout.write(CLEAR + "\n".join(lines) + "\n")
            sys.stdout.flush()
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
    lines.extend(_slowest([(None, run) for run in stats.get("slowest_callbacks") or ()], width))
    connections = snapshot["connections"]
    lines.append("")
    lines.append(f"CONNECTIONS ({len(connections)})")
    header = f"{'KIND':<13} {'FD':>5} {'LOCAL':<22} {'PEER':<22} {'AGE':>8} {'IN':>10} {'OUT':>10} {'WBUF':>7} {'R':>1} TLS"
    lines.append(header[:width])
    for row in connections:
        lines.append(_connection(row)[:width])
    return lines


STACK_LINES = 12
SLOWEST_LINES = 10


def _slowest(runs: list[tuple[int | None, dict[str, Any]]], width: int) -> list[str]:
    """The slowest callbacks since the last refresh (stats timing on), longest first;
    `runs` pairs each with its worker's index (None for one loop)."""
    if not runs:
        return []
    runs = sorted(runs, key=lambda pair: -pair[1]["seconds"])[:SLOWEST_LINES]
    lines = ["", "SLOWEST CALLBACKS (since the last refresh)"]
    for index, run in runs:
        worker = "" if index is None else f"[{index}] "
        lines.append(f"{1e3 * run['seconds']:>10.3f} ms  {worker}{run['callback']}"[:width])
    return lines


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


# Worker mode: PATH.N for each worker N.
WORKER_TIMEOUT = 2.0  # seconds a worker's socket has to answer (it answers in 0.5 s
# even when its loop is stalled, so only a frozen or overloaded process takes longer)
# Counters summed over the workers into the total (the `connections` count included).
TOTALED = ("turns", "callbacks", "io_events", "bytes_read", "bytes_written",
           "timers_scheduled", "timers_fired", "timers_cancelled", "connections_accepted",
           "exceptions_reported", "transports_registered", "fds_watched", "ready",
           "timers_pending", "pipes_open", "subprocesses")
RATES = (("turns", "TURNS/S"), ("callbacks", "CALLBACKS/S"), ("bytes_read", "IN B/S"),
         ("bytes_written", "OUT B/S"))


def worker_paths(path: str) -> list[str]:
    """The workers' sockets, `PATH.0`, `PATH.1`, ..., in index order; none when `PATH`
    itself exists (one loop serves it)."""
    if os.path.exists(path):
        return []
    pattern = re.compile(re.escape(path) + r"\.(\d+)$")
    found = [(int(m.group(1)), p) for p in glob.glob(glob.escape(path) + ".*")
             if (m := pattern.match(p))]
    return [p for _, p in sorted(found)]


def gather(path: str, workers: list[str]) -> dict[str, Any]:
    """One snapshot of each worker, asked all at once: `{"path", "time", "total",
    "workers": [...]}`, a worker's entry its snapshot or `{"error": why}`, with its
    `path` and `index`; the total sums the counters of the workers that answered."""
    with concurrent.futures.ThreadPoolExecutor(min(len(workers), 32)) as pool:
        entries = list(pool.map(_ask_worker, workers))
    total: dict[str, Any] = dict.fromkeys((*TOTALED, "connections"), 0)
    answering = 0
    for entry in entries:
        if "stats" in entry and not entry.get("stalled"):
            answering += 1
            for key in TOTALED:
                total[key] += entry["stats"].get(key, 0)
            total["connections"] += len(entry["connections"])
    total["workers"] = len(entries)
    total["workers_answering"] = answering
    return {"path": path, "time": time.time(), "total": total, "workers": entries}


def _ask_worker(path: str) -> dict[str, Any]:
    head = {"path": path, "index": int(path.rsplit(".", 1)[1])}
    try:
        return {**head, **request(path, timeout=WORKER_TIMEOUT)}
    except ConnectionRefusedError:
        return {**head, "error": "refused: not serving"}
    except TimeoutError:
        return {**head, "error": f"no answer in {WORKER_TIMEOUT:g} s"}
    except FileNotFoundError:
        return {**head, "error": "gone"}
    except (OSError, ValueError) as exc:
        return {**head, "error": str(exc)}


def render_workers(gathered: dict[str, Any], previous: dict[str, Any] | None,
                   width: int = 120) -> list[str]:
    """The screen for every worker: a total row, then a row per worker, with rates
    against the same worker's row in `previous` (a restarted worker, a new pid, has
    none yet)."""
    clock = time.strftime("%H:%M:%S", time.localtime(gathered["time"]))
    workers = gathered["workers"]
    total = gathered["total"]
    lines = [(f"ferroloop top - {gathered['path']} - {len(workers)} workers, "
              f"{total['workers_answering']} answering - {clock}")]
    before = {(e["index"], e.get("pid")): e for e in (previous or {}).get("workers", ())}
    header = (f"{'WORKER':<7} {'PID':>8} " + " ".join(f"{label:>12}" for _, label in RATES)
              + f" {'CONNS':>6}  LAST STALL")
    rows = []
    sums = dict.fromkeys((key for key, _ in RATES), 0.0)
    rated = False
    for entry in workers:
        prefix = f"{entry['index']:<7} {_cell(entry.get('pid')):>8} "
        if "error" in entry:
            rows.append(prefix + entry["error"])
            continue
        if entry.get("closed"):
            rows.append(prefix + "the loop is closed")
            continue
        stall = _last_stall(entry.get("watchdog"))
        if entry.get("stalled"):
            rows.append(prefix + f"{'NOT ANSWERING':>51} {'':>6}  {stall}")
            continue
        rates = _worker_rates(entry, before.get((entry["index"], entry["pid"])))
        if rates is not None:
            rated = True
            for key in sums:
                sums[key] += rates[key]
        cells = " ".join(f"{'-' if rates is None else f'{rates[key]:,.0f}':>12}"
                         for key, _ in RATES)
        rows.append(prefix + f"{cells} {len(entry['connections']):>6}  {stall}")
    cells = " ".join(f"{f'{sums[key]:,.0f}' if rated else '-':>12}" for key, _ in RATES)
    lines.append(f"accepted {total['connections_accepted']}  exceptions "
                 f"{total['exceptions_reported']}  turns {total['turns']:,}  "
                 f"callbacks {total['callbacks']:,}  in {total['bytes_read']:,} B  "
                 f"out {total['bytes_written']:,} B")
    lines.append("")
    lines.append(header)
    lines.append(f"{'total':<7} {'':>8} {cells} {total['connections']:>6}")
    lines.extend(rows)
    lines.extend(_slowest([(entry["index"], run) for entry in workers if "stats" in entry
                           for run in entry["stats"].get("slowest_callbacks") or ()], width))
    return [line[:width] for line in lines]


def _worker_rates(entry: dict[str, Any], previous: dict[str, Any] | None):
    if previous is None or "stats" not in previous or previous.get("stalled"):
        return None
    seconds = max(entry["time"] - previous["time"], 1e-9)
    return {key: (entry["stats"][key] - previous["stats"][key]) / seconds for key, _ in RATES}


def _last_stall(reports: list[dict[str, Any]] | None) -> str:
    """The watchdog's last stall in a cell: when, and how long (or that it lasts)."""
    if reports is None:
        return "watchdog off"
    stalls = [r for r in reports if r["kind"] == "stalled"]
    if not stalls:
        return "none"
    stall = stalls[-1]
    when = time.strftime("%H:%M:%S", time.localtime(stall["time"]))
    recovered = [r for r in reports if r["kind"] == "recovered" and r["time"] >= stall["time"]]
    if recovered:
        return f"{when} {recovered[0]['duration']:.3f} s"
    return f"{when} STILL BLOCKED ({stall['handle']})"
