"""ferroloop: Python's asyncio event loop, implemented in Rust.

    import ferroloop
    ferroloop.run(main())                     # like asyncio.run
    asyncio.run(main(), loop_factory=ferroloop.new_event_loop)   # Python 3.12+
    ferroloop.install()                       # every new loop is a ferroloop
    python -m ferroloop app.py [args]         # run a script unchanged
    ferroloop.run(main(), watchdog=0.1)       # report a callback blocking the loop > 0.1 s
"""

from __future__ import annotations

import asyncio
import functools
import sys
from asyncio import events
from collections.abc import Coroutine
from typing import Any, TypeVar

from ._ferroloop import Handle, TimerHandle
from ._loop import Loop
from ._watchdog import WatchdogReport, check_threshold

__all__ = [
    "EventLoopPolicy",
    "Handle",
    "Loop",
    "TimerHandle",
    "WatchdogReport",
    "install",
    "new_event_loop",
    "run",
]
__version__ = "0.1.0"

_T = TypeVar("_T")


def new_event_loop() -> Loop:
    """A new ferroloop event loop."""
    return Loop()


_policy_class: type | None = None


def _event_loop_policy_class() -> type:
    """ferroloop's event loop policy class, made on first use.

    It derives from asyncio's default policy so that the child-watcher API of Python
    3.11 (`set_child_watcher`/`get_child_watcher`) stays available. It is made lazily
    because policies are deprecated from Python 3.14 (reading
    `asyncio.DefaultEventLoopPolicy` warns there): importing ferroloop must not warn,
    while a program that asks for the policy gets asyncio's own warning.
    """
    global _policy_class
    if _policy_class is None:
        base = getattr(asyncio, "DefaultEventLoopPolicy", None)
        if base is None:
            raise RuntimeError(
                "this Python has no event loop policies: use ferroloop.run(main()) or "
                "asyncio.run(main(), loop_factory=ferroloop.new_event_loop)"
            )

        class EventLoopPolicy(base):
            """An asyncio event loop policy whose loops are ferroloop loops."""

            def _loop_factory(self) -> Loop:
                return Loop()

        EventLoopPolicy.__module__ = __name__
        EventLoopPolicy.__qualname__ = "EventLoopPolicy"
        _policy_class = EventLoopPolicy
    return _policy_class


def __getattr__(name: str) -> Any:
    if name == "EventLoopPolicy":
        return _event_loop_policy_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install() -> None:
    """Make ferroloop the loop of `asyncio.run`, `asyncio.new_event_loop` and friends.

    This sets asyncio's event loop policy, an API deprecated from Python 3.14 (asyncio
    warns there) and planned for removal in 3.16: prefer `ferroloop.run(main())` or
    `asyncio.run(main(), loop_factory=ferroloop.new_event_loop)`.
    """
    asyncio.set_event_loop_policy(_event_loop_policy_class()())


def run(
    main: Coroutine[Any, Any, _T],
    *,
    debug: bool | None = None,
    watchdog: float | None = None,
) -> _T:
    """Run a coroutine on a new ferroloop loop: the contract of `asyncio.run`.

    `watchdog`: report any callback, protocol method or task step that blocks the loop
    longer than this many seconds, while it blocks (`Loop.set_watchdog`; 0 switches off
    one that FERROLOOP_WATCHDOG would switch on).
    """
    factory = new_event_loop
    if watchdog is not None:
        factory = functools.partial(_new_watched_loop, check_threshold(watchdog))
    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
            return runner.run(main)
    return _run_310(main, debug, factory)


def _new_watched_loop(threshold: float | None) -> Loop:
    loop = Loop()
    loop.set_watchdog(threshold)
    return loop


def _run_310(main, debug, factory):
    """`asyncio.run` for Python 3.10, which has no `asyncio.Runner`."""
    if events._get_running_loop() is not None:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    if not asyncio.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = factory()
    try:
        events.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            for task in tasks:
                if not task.cancelled() and task.exception() is not None:
                    loop.call_exception_handler(
                        {
                            "message": "unhandled exception during asyncio.run() shutdown",
                            "exception": task.exception(),
                            "task": task,
                        }
                    )
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            events.set_event_loop(None)
            loop.close()
