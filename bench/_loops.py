"""The event loops the benchmarks compare: asyncio, uvloop, ferroloop, and the Rust
loops rloop and rsloop when they are installed."""

from __future__ import annotations

import asyncio
import importlib
import sys

ORDER = ["asyncio", "uvloop", "rloop", "rsloop", "ferroloop"]
RUST_PEERS = ["rloop", "rsloop"]


def available_loops() -> list[str]:
    found = []
    for name in ORDER:
        if name == "asyncio":
            found.append(name)
            continue
        try:
            importlib.import_module(name)
        except ImportError:
            if name == "ferroloop":
                raise  # the loop under test: a broken build must not be benchmarked away
            if name == "uvloop":
                print("uvloop is not installed: ratios are against asyncio", file=sys.stderr)
            continue
        found.append(name)
    return found


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "asyncio":
        return asyncio.new_event_loop()
    return importlib.import_module(name).new_event_loop()
