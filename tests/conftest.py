"""Every behaviour test runs twice from one body: on stock asyncio and on ferroloop."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import ferroloop
import pytest

# A test run started in the background (CI, nohup) may inherit SIGINT as ignored, and
# children inherit that: the example servers, stopped with Ctrl-C, would never stop.
# A Python-level handler is reset to the default on exec, so children get Ctrl-C back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

LOOPS = {
    "asyncio": asyncio.new_event_loop,
    "ferroloop": ferroloop.new_event_loop,
}


@pytest.fixture(params=sorted(LOOPS))
def loop_name(request):
    return request.param


@pytest.fixture
def new_loop(loop_name):
    """A factory of loops of the parametrised kind, closed after the test."""
    made = []

    def make():
        loop = LOOPS[loop_name]()
        made.append(loop)
        return loop

    yield make
    for loop in made:
        if not loop.is_closed():
            loop.close()
    asyncio.set_event_loop(None)


@pytest.fixture
def loop(new_loop):
    return new_loop()


def wait_until(predicate, what: str, timeout: float = 30):
    """`predicate()`'s first true value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))
