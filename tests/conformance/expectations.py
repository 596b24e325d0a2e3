"""What CPython's test_asyncio is not expected to pass on ferroloop, and why.

Two kinds:
- "xfail": behaviour ferroloop does not have yet; the reason names what it waits for.
  A listed test that starts passing fails the run, so the list stays true.
- "skip": the test checks asyncio's private internals rather than behaviour.
Keys are "Class.test_method" or a bare "test_method" (any class).
"""

from __future__ import annotations

INTERNALS = "checks asyncio's private internals, not behaviour"

COMMON: dict[str, tuple[str, str]] = {
    "test_timeout_rounding": ("skip", INTERNALS),
    "test_internal_fds": ("skip", INTERNALS),
    "test_prompt_cancellation": ("skip", INTERNALS),
    "test_log_destroyed_pending_task": ("skip", INTERNALS),
    "test_issue46672": ("skip", INTERNALS),
}

MODULES: dict[str, dict[str, tuple[str, str]]] = {
}


def for_module(module: str) -> dict[str, tuple[str, str]]:
    marks = dict(COMMON)
    marks.update(MODULES.get(module, {}))
    return marks
