"""What CPython's test_asyncio is not expected to pass on ferroloop, and why.

Two kinds:
- "xfail": behaviour ferroloop does not have yet; the reason names what it waits for.
  A test listed here that starts passing is reported, so the list stays true.
- "skip": the test checks asyncio's private internals rather than behaviour.
Keys are "Class.test_method" or a bare "test_method" (any class).
"""

from __future__ import annotations

WAITS_FOR_TRANSPORTS = "waits for the Rust stream transports (issue: network transports)"
WAITS_FOR_UDP_PIPES_SUBPROCESS_TLS = "waits for UDP, pipes, subprocesses and TLS"
INTERNALS = "checks asyncio's private internals, not behaviour"

COMMON: dict[str, tuple[str, str]] = {
    "test_timeout_rounding": ("skip", INTERNALS),
    "test_internal_fds": ("skip", INTERNALS),
}

MODULES: dict[str, dict[str, tuple[str, str]]] = {}


def for_module(module: str) -> dict[str, tuple[str, str]]:
    marks = dict(COMMON)
    marks.update(MODULES.get(module, {}))
    return marks
