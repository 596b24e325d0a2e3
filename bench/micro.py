"""Micro benchmarks of the loop core: ferroloop beside asyncio and uvloop in one run.

One worker process per loop; the orchestrator asks each worker in turn (order rotated
every cycle) to run one short batch, so all loops see the same machine conditions.
Each cell's ratio is the median of per-cycle ratios, with its p25-p75 spread.

    python bench/micro.py [--cycles 15] [--json results/micro.json] [--markdown results/micro.md]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from _loops import RUST_PEERS, available_loops
from _loops import new_loop as make_loop
from _stats import spread, write_outputs

# -- the workloads: each returns (operations, seconds) -----------------------------


# Callbacks and timers are scheduled in batches of BATCH per turn, the shape of a real
# program. With hundreds of thousands queued at once every loop mostly measures
# CPython's cyclic GC walking the queue.
BATCH = 100


def _batched(loop, n, schedule):
    start = time.perf_counter()
    for _ in range(n // BATCH):
        for _ in range(BATCH):
            schedule()
        loop.call_soon(loop.stop)
        loop.run_forever()
    return n, time.perf_counter() - start


def _tick():
    pass


def b_call_soon(loop, n):
    return _batched(loop, n, lambda: loop.call_soon(_tick))


def b_call_later(loop, n):
    def schedule():
        loop.call_later(0, _tick)

    return _batched(loop, n, schedule)


def b_timers_cancelled(loop, n):
    return _batched(loop, n, lambda: loop.call_later(60.0, _tick).cancel())


def b_future_round_trip(loop, n):
    async def main():
        for _ in range(n):
            fut = loop.create_future()
            loop.call_soon(fut.set_result, None)
            await fut

    start = time.perf_counter()
    loop.run_until_complete(main())
    return n, time.perf_counter() - start


def b_sleep0_ping_pong(loop, n):
    async def player():
        for _ in range(n // 2):
            await asyncio.sleep(0)

    async def main():
        await asyncio.gather(player(), player())

    start = time.perf_counter()
    loop.run_until_complete(main())
    return n, time.perf_counter() - start


def b_task_gather(loop, n):
    async def child():
        return 1

    async def main():
        for _ in range(n // 100):
            await asyncio.gather(*[loop.create_task(child()) for _ in range(100)])

    start = time.perf_counter()
    loop.run_until_complete(main())
    return n, time.perf_counter() - start


def _stop_after(loop, n):
    """A callback that stops `loop` the n-th time it runs."""
    count = [0]

    def tick():
        count[0] += 1
        if count[0] == n:
            loop.stop()

    return tick


def b_call_soon_threadsafe(loop, n):
    done = threading.Event()
    tick = _stop_after(loop, n)

    def producer():
        for _ in range(n):
            loop.call_soon_threadsafe(tick)
        done.set()

    start = time.perf_counter()
    t = threading.Thread(target=producer)
    t.start()
    loop.run_forever()
    t.join()
    return n, time.perf_counter() - start


def b_run_in_executor(loop, n):
    executor = concurrent.futures.ThreadPoolExecutor(4)

    async def main():
        for _ in range(n // 50):
            await asyncio.gather(*[loop.run_in_executor(executor, int) for _ in range(50)])

    start = time.perf_counter()
    loop.run_until_complete(main())
    executor.shutdown()
    return n, time.perf_counter() - start


# -- under load: many pending at once, as a busy server has them -------------------


def b_timers_pending(loop, n):
    """n timers pending at once, delays spread over 0-1 ms, every one fires."""
    fire = _stop_after(loop, n)
    start = time.perf_counter()
    for i in range(n):
        loop.call_later((i % 1000) * 1e-6, fire)
    loop.run_forever()
    return n, time.perf_counter() - start


def b_call_at_half_cancelled(loop, n):
    """n call_at pending at once, every other one cancelled before it is due."""
    fire = _stop_after(loop, n // 2)
    start = time.perf_counter()
    base = loop.time()
    for i in range(n):
        handle = loop.call_at(base + (i % 1000) * 1e-6, fire)
        if i % 2:
            handle.cancel()
    loop.run_forever()
    return n, time.perf_counter() - start


def b_bulk_call_soon(loop, n):
    """n callbacks queued in one go, then run in one turn."""
    start = time.perf_counter()
    for _ in range(n):
        loop.call_soon(_tick)
    loop.call_soon(loop.stop)
    loop.run_forever()
    return n, time.perf_counter() - start


def b_threadsafe_round_trip(loop, n):
    """Wake-up latency: a thread posts one callback and waits until it has run before
    posting the next, so every post has to wake a sleeping loop."""
    ran = threading.Semaphore(0)

    def producer():
        for _ in range(n):
            loop.call_soon_threadsafe(ran.release)
            ran.acquire()
        loop.call_soon_threadsafe(loop.stop)

    start = time.perf_counter()
    t = threading.Thread(target=producer)
    t.start()
    loop.run_forever()
    t.join()
    return n, time.perf_counter() - start


BENCHMARKS = {
    "call_soon": (b_call_soon, 200_000),
    "call_later": (b_call_later, 100_000),
    "timers scheduled+cancelled": (b_timers_cancelled, 200_000),
    "future round trip": (b_future_round_trip, 100_000),
    "sleep(0) ping-pong": (b_sleep0_ping_pong, 100_000),
    "create_task + gather": (b_task_gather, 50_000),
    "call_soon_threadsafe": (b_call_soon_threadsafe, 100_000),
    "run_in_executor": (b_run_in_executor, 5_000),
    "100k timers pending": (b_timers_pending, 100_000),
    "100k call_at, half cancelled": (b_call_at_half_cancelled, 100_000),
    "bulk call_soon (100k)": (b_bulk_call_soon, 100_000),
    "call_soon_threadsafe wake-up round trip": (b_threadsafe_round_trip, 20_000),
}


def worker(name):
    """Reads a benchmark name per line, answers with ops/s."""
    for line in sys.stdin:
        bench = line.strip()
        fn, n = BENCHMARKS[bench]
        loop = make_loop(name)
        try:
            ops, seconds = fn(loop, n)
        finally:
            loop.close()
        print(json.dumps({"ops_per_s": ops / seconds}), flush=True)


def orchestrate(cycles, benches):
    loops = available_loops()
    workers = {
        name: subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in loops
    }
    raw = {b: {name: [] for name in loops} for b in benches}
    try:
        for cycle in range(cycles):
            for bench in benches:
                order = loops[cycle % len(loops):] + loops[: cycle % len(loops)]
                for name in order:
                    proc = workers[name]
                    proc.stdin.write(bench + "\n")
                    proc.stdin.flush()
                    raw[bench][name].append(json.loads(proc.stdout.readline())["ops_per_s"])
            print(f"cycle {cycle + 1}/{cycles} done", file=sys.stderr, flush=True)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()
    return loops, raw


def summarise(loops, raw):
    rows = []
    for bench, per_loop in raw.items():
        row = {"benchmark": bench}
        for name in loops:
            row[f"{name} ops/s"] = statistics.median(per_loop[name])
        for base in [b for b in ("uvloop", "asyncio") if b in loops]:
            ratios = [f / b for f, b in zip(per_loop["ferroloop"], per_loop[base])]
            row[f"vs {base}"] = spread(ratios)
        peers = [p for p in RUST_PEERS if p in loops]
        if peers:
            # Against the faster Rust peer of each cycle.
            best = [max(per_loop[p][i] for p in peers) for i in range(len(per_loop["ferroloop"]))]
            row["vs best Rust peer"] = spread([f / b for f, b in zip(per_loop["ferroloop"], best)])
        rows.append(row)
    return rows


def markdown(loops, rows):
    bases = [b for b in ("uvloop", "asyncio", "best Rust peer") if b in loops or (
        b == "best Rust peer" and any(p in loops for p in RUST_PEERS))]
    head = ["benchmark"] + [f"{n} (ops/s)" for n in loops] + [f"ferroloop / {b} (p25-p75)" for b in bases]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["benchmark"]] + [f"{row[f'{n} ops/s']:,.0f}" for n in loops]
        for b in bases:
            med, p25, p75 = row[f"vs {b}"]
            cells.append(f"**{med:.2f}x** ({p25:.2f}-{p75:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--cycles", type=int, default=15)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    benches = args.only or list(BENCHMARKS)
    loops, raw = orchestrate(args.cycles, benches)
    rows = summarise(loops, raw)
    table = markdown(loops, rows)
    print(table)
    raw_json = json.dumps({"loops": loops, "raw": raw}, indent=1)
    write_outputs(((args.json, raw_json), (args.markdown, table)))


if __name__ == "__main__":
    main()
