"""The blocked-loop watchdog: `loop.set_watchdog(threshold, *, callback=None)`.

A native thread (src/watchdog.rs) notices when one callback, protocol method or task
step has run longer than the threshold and, while the loop is still blocked in it,
calls `Reporter.stalled` with the GIL held; `Reporter.recovered` follows once the run
ends. The reporter reads the loop thread's stack (`sys._current_frames()`), the running
task and its await chain, and logs a `WatchdogReport` on the `ferroloop` logger or hands
it to the user's callback. Both run on the watchdog thread.

It is off by default; `ferroloop.run(main(), watchdog=0.1)`, `python -m ferroloop
--watchdog 100ms app.py` and `FERROLOOP_WATCHDOG=100ms` (read when a loop is made)
switch it on.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import inspect
import logging
import math
import os
import re
import sys
import time
import traceback
import warnings
import weakref
from asyncio import format_helpers
from collections.abc import Callable
from typing import NamedTuple

from ._ferroloop import Handle

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "Reporter",
    "WatchdogMethods",
    "WatchdogReport",
    "check_threshold",
    "parse_threshold",
]

ENVIRONMENT_VARIABLE = "FERROLOOP_WATCHDOG"

logger = logging.getLogger("ferroloop")

# The threshold `python -m ferroloop --watchdog` gives every loop of the program (0:
# none); None: the environment variable decides.
runner_threshold: float | None = None

# Loops whose watchdog is on: switched off at exit, before the interpreter finalizes,
# so that no watchdog thread is left to take the GIL then.
_watched: weakref.WeakSet = weakref.WeakSet()

_COROUTINE_FLAGS = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
_THRESHOLD_TEXT = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*"


def check_threshold(threshold) -> float | None:
    """The threshold in seconds, or None (None or 0: the watchdog is off)."""
    if threshold is None:
        return None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(
            f"the watchdog threshold must be a number of seconds or None, "
            f"not {type(threshold).__name__}"
        )
    seconds = float(threshold)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"the watchdog threshold must be a finite number of seconds >= 0, not {threshold!r}"
        )
    return seconds or None


def parse_threshold(text: str) -> float | None:
    """`100ms`, `0.1s` or `0.1` (seconds) as seconds; `0` is off (None)."""
    match = re.fullmatch(_THRESHOLD_TEXT, text)
    if match is None:
        raise ValueError(f"expected a duration such as 100ms, 0.1s or 0.1, not {text!r}")
    number, unit = match.groups()
    return check_threshold(float(number) / (1000 if unit == "ms" else 1))


RECENT = 8  # reports kept for the inspection socket (`python -m ferroloop top`)


class WatchdogReport(NamedTuple):
    """One report of the watchdog: a run of the loop that outlasted the threshold.

    kind: "stalled" (made while the run was still blocked, unless `captured_late`) or
        "recovered" (the run has ended).
    duration_so_far: how long the run had lasted when the report was made, in seconds;
        in a "recovered" report, the stall's total length.
    threshold: the watchdog's threshold, in seconds.
    handle: what the loop was running: a handle's repr, a task's step (with the task's
        repr), a callback, or the transport whose protocol was called.
    task: the name of the task whose step was running, if any.
    stack: the loop thread's stack from the frame the loop called up to the one that
        blocked, most recent call last (None in a "recovered" report, and when the run
        had ended before it could be read).
    coroutine_chain: the running task's await chain, outermost coroutine first, each as
        "name (file:line)".
    thread_id: `threading.get_ident()` of the thread running the loop.
    captured_late: the run held the GIL while it blocked (a call into C that does not
        release it), so the watchdog could read nothing until it let go: the report
        comes that much late, its stack is where the run let go of the GIL (usually just
        after the blocking call), or None if the run had ended by then.
    """

    kind: str
    duration_so_far: float
    threshold: float
    handle: str
    task: str | None
    stack: traceback.StackSummary | None
    coroutine_chain: list[str] | None
    thread_id: int
    captured_late: bool = False

    def format(self) -> str:
        """The report as the `ferroloop` logger writes it."""
        if self.kind == "recovered":
            return (
                f"event loop ran again after being blocked for {self.duration_so_far:.3f} s "
                f"in {self.handle}"
            )
        lines = [
            f"event loop blocked for {self.duration_so_far:.3f} s (threshold "
            + f"{self.threshold:.3f} s) in {self.handle}"
        ]
        if self.captured_late:
            lines.append(
                "Captured late: it held the GIL while it blocked, so nothing could be read "
                + (
                    "until it let go (the stack is where it did)."
                    if self.stack
                    else "before it returned (no stack)."
                )
            )
        if self.coroutine_chain:
            lines.append("Await chain: " + " -> ".join(self.coroutine_chain))
        if self.stack:
            lines.append("Stack of the loop thread (most recent call last):")
            lines.append("".join(self.stack.format()).rstrip("\n"))
        return "\n".join(lines)


class Reporter:
    """What the watchdog thread calls (GIL held) to report on one loop."""

    def __init__(self, loop, callback: Callable[[WatchdogReport], object] | None) -> None:
        self._loop = weakref.ref(loop)
        self._callback = callback
        # The last reports, (wall-clock time, report), for the inspection socket.
        self.recent: collections.deque[tuple[float, WatchdogReport]] = collections.deque(
            maxlen=RECENT
        )
        # What the stall report named, for the recovery's: (running object, task name).
        self._stalled: tuple[object, str | None] | None = None

    def stalled(
        self, running, duration, threshold, thread_id, captured_late, still_running
    ) -> None:
        stack = chain = None
        task = None
        if still_running:
            frames = _loop_thread_frames(thread_id)
            stack = traceback.StackSummary.extract(
                ((f, f.f_lineno) for f in frames), lookup_lines=False
            )
            running_task = self._current_task()
            if running_task is not None:
                task = running_task.get_name()
                chain = _await_chain(running_task, frames)
        if task is None:
            task = _task_name(running)
        self._stalled = (running, task)
        report = WatchdogReport(
            "stalled",
            duration,
            threshold,
            _describe(running),
            task,
            stack,
            chain,
            thread_id,
            captured_late,
        )
        self._emit(report)

    def recovered(self, running, duration, threshold, thread_id) -> None:
        task = _task_name(running)
        if self._stalled is not None and self._stalled[0] is running:
            task = self._stalled[1]
        self._stalled = None
        report = WatchdogReport(
            "recovered", duration, threshold, _describe(running), task, None, None, thread_id
        )
        self._emit(report)

    def _current_task(self):
        loop = self._loop()
        if loop is None:
            return None
        try:
            return asyncio.current_task(loop)
        except RuntimeError:
            return None

    def _emit(self, report: WatchdogReport) -> None:
        self.recent.append((time.time(), report))
        if self._callback is None:
            logger.warning("%s", report.format(), extra={"watchdog_report": report})
            return
        try:
            self._callback(report)
        except Exception:
            logger.exception("the watchdog callback %r failed", self._callback)


def _loop_thread_frames(thread_id: int) -> list:
    """The loop thread's frames, outermost first, from the one the loop called (the
    frames of whatever runs the loop are left out)."""
    from ._loop import Loop

    frame = sys._current_frames().get(thread_id)
    run_forever = Loop.run_forever.__code__
    frames = []
    while frame is not None and frame.f_code is not run_forever:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    return frames


def _where(name: str, frame) -> str:
    return f"{name} ({frame.f_code.co_filename}:{frame.f_lineno})"


def _await_chain(task, frames: list) -> list[str]:
    """The task's await chain: while a coroutine is suspended, what it awaits
    (`cr_await`); from the running one on, the coroutine frames of the stack."""
    chain: list[str] = []
    position = {id(f): i for i, f in enumerate(frames)}
    awaited = task.get_coro()
    while awaited is not None and len(chain) < 100:
        frame = next(
            (
                getattr(awaited, attr)
                for attr in ("cr_frame", "gi_frame", "ag_frame")
                if hasattr(awaited, attr)
            ),
            None,
        )
        if frame is None:
            chain.append(repr(awaited))
            break
        if id(frame) in position:
            running = frames[position[id(frame)] :]
            chain.extend(
                _where(getattr(f.f_code, "co_qualname", f.f_code.co_name), f)
                for f in running
                if f.f_code.co_flags & _COROUTINE_FLAGS
            )
            break
        chain.append(_where(awaited.__qualname__, frame))
        awaited = next(
            (
                getattr(awaited, attr)
                for attr in ("cr_await", "gi_yieldfrom", "ag_await")
                if hasattr(awaited, attr)
            ),
            None,
        )
    return chain


def _task_of(running):
    """The task whose step `running` is (a task's own callback), or None."""
    callback = running._callback if isinstance(running, Handle) else running
    owner = getattr(callback, "__self__", None)
    return owner if isinstance(owner, asyncio.Task) else None


def _task_name(running) -> str | None:
    task = _task_of(running)
    return task.get_name() if task is not None else None


def _describe(running) -> str:
    if running is None:
        return "a socket operation"
    task = _task_of(running)
    if task is not None:
        return f"a step of {task!r}"
    if isinstance(running, Handle):
        return repr(running)
    if isinstance(running, asyncio.BaseTransport):
        return f"the protocol {running.get_protocol()!r} of {running!r}"
    return format_helpers._format_callback_source(running, ())


def _stop_all() -> None:
    for loop in list(_watched):
        loop._watchdog_stop()


atexit.register(_stop_all)


class WatchdogMethods:
    """The watchdog's switch (a base of `Loop`)."""

    def set_watchdog(
        self,
        threshold: float | None,
        *,
        callback: Callable[[WatchdogReport], object] | None = None,
    ) -> None:
        """Report a callback, protocol method or task step that runs longer than
        `threshold` seconds, while it still runs (None or 0: off).

        Reports go to the `ferroloop` logger at WARNING, or to `callback` as a
        `WatchdogReport` (called on the watchdog's thread; its exceptions are logged).
        Takes effect from the loop's next turn (at once on a loop not running).
        """
        seconds = check_threshold(threshold)
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable or None, not {callback!r}")
        if seconds is None:
            self._watchdog_stop()
            _watched.discard(self)
            self._watchdog_reporter = None
            return
        reporter = Reporter(self, callback)
        self._watchdog_start(seconds, reporter)
        self._watchdog_reporter = reporter
        _watched.add(self)

    def _watchdog_recent(self) -> list[dict] | None:
        """The watchdog's last reports as plain dicts (None when it is off), for the
        inspection socket: read from its thread, not the loop's."""
        reporter = getattr(self, "_watchdog_reporter", None)
        if reporter is None:
            return None
        return [
            {
                "time": when,
                "kind": r.kind,
                "duration": r.duration_so_far,
                "threshold": r.threshold,
                "handle": r.handle,
                "task": r.task,
                "stack": "".join(r.stack.format()) if r.stack else None,
                "coroutine_chain": r.coroutine_chain,
                "captured_late": r.captured_late,
            }
            for when, r in list(reporter.recent)
        ]

    def _watchdog_from_environment(self) -> None:
        """Switches the watchdog on as `python -m ferroloop --watchdog` or
        FERROLOOP_WATCHDOG ask, for a loop being made."""
        seconds = runner_threshold
        if seconds is None:
            text = os.environ.get(ENVIRONMENT_VARIABLE)
            if not text:
                return
            try:
                seconds = parse_threshold(text)
            except ValueError as exc:
                warnings.warn(f"{ENVIRONMENT_VARIABLE} ignored: {exc}", RuntimeWarning, 3)
                return
        if seconds:
            self.set_watchdog(seconds)
