"""ferroloop's event loop, `Loop`, and what runs it.

`Loop` runs on `LoopCore` (Rust), which owns the turn, the ready queue, timers, the
poller, `add_reader`/`add_writer`, the stream and datagram transports and the hot
`sock_*` calls. `asyncio.BaseEventLoop` supplies the documented helpers that subclasses
are meant to reuse (tasks, executors, exception handling, address resolution and happy
eyeballs for connections, `create_server`'s options, sendfile's fallback). What a Unix
loop needs on top is Python, one module per concern, each holding one base class of
`Loop`: `_signals` (signal handlers), `_dns` (non-blocking name resolution),
`_sockets` (the remaining `sock_*` calls and native sendfile), `_transports`
(transport creation), `_connect` (`create_connection`), `_serve` (`create_server` and
accepting), `_unix` (Unix sockets), `_subprocess` (pipes and subprocesses, child exit
through pidfds) and `_watchdog` (`set_watchdog`, the blocked-loop watchdog's switch). This module keeps the running-loop bookkeeping, debug mode's
timing of callbacks, and closing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
from asyncio import base_events, events
from asyncio.log import logger

from . import _inspect
from ._connect import ConnectMethods
from ._dns import DnsMethods
from ._ferroloop import Handle, LoopCore, bind_methods_to
from ._observe import ObserveMethods
from ._serve import ServeMethods
from ._signals import SignalMethods
from ._sockets import SocketMethods
from ._subprocess import SubprocessMethods, reap_in_thread
from ._transports import TransportMethods
from ._unix import UnixMethods
from ._watchdog import WatchdogMethods

__all__ = ["Loop"]


# LoopCore comes first, so that its (Rust) methods are found before any Python one
# (bind_methods_to relies on it). The concern classes define disjoint names
# (test_api_surface checks it) and come before BaseEventLoop, whose methods they
# override.
class Loop(
    LoopCore,
    SignalMethods,
    DnsMethods,
    SocketMethods,
    TransportMethods,
    ConnectMethods,
    ServeMethods,
    UnixMethods,
    SubprocessMethods,
    ObserveMethods,
    WatchdogMethods,
    asyncio.BaseEventLoop,
):
    """ferroloop's event loop: a drop-in `asyncio.AbstractEventLoop`."""

    def __init__(self) -> None:
        super().__init__()
        self._signal_handlers: dict[int, Handle] = {}
        # Listening Unix sockets to unlink when they stop serving: sock -> (path, inode).
        self._unix_server_paths: dict[socket.socket, tuple[str, int]] = {}
        # Children being watched: pid -> (pidfd or None, transport).
        self._children: dict[int, tuple[int | None, object]] = {}
        # Accepted TLS connections in their handshake (`_serve.py`):
        # waiter -> (protocol, SSL transport, socket transport).
        self._tls_handshakes: dict[asyncio.Future, tuple[object, object, object]] = {}
        self._init_observe()
        if os.environ.get("FERROLOOP_STATS_TIMING") == "1":
            self.set_stats_timing(True)
        _inspect.start_from_environment(self)
        if self._time_overridden():
            self._set_custom_clock(True)
        self._watchdog_from_environment()

    # A `time` set on the loop (LoopCore.__setattr__) or overridden by a subclass is the
    # clock the turn and call_later read, as asyncio's `self.time()` is.
    def _time_overridden(self) -> bool:
        return type(self).time is not _NATIVE_TIME

    # -- running ---------------------------------------------------------------

    def run_forever(self) -> None:
        self._check_closed()
        self._check_running()
        self._set_coroutine_origin_tracking(self._debug)
        old_agen_hooks = sys.get_asyncgen_hooks()
        try:
            self._thread_id = threading.get_ident()
            sys.set_asyncgen_hooks(
                firstiter=self._asyncgen_firstiter_hook,
                finalizer=self._asyncgen_finalizer_hook,
            )
            events._set_running_loop(self)
            self._take_wakeup_fd()
            self._run_forever_core()
        finally:
            self._give_back_wakeup_fd()
            self._stopping = False
            self._thread_id = None
            events._set_running_loop(None)
            self._set_coroutine_origin_tracking(False)
            sys.set_asyncgen_hooks(*old_agen_hooks)

    def _run_handle_debug(self, handle: Handle) -> None:
        """Debug mode: run one handle, timing it and logging it when slow."""
        self._current_handle = handle
        try:
            t0 = self.time()
            handle._run()
            dt = self.time() - t0
            if dt >= self.slow_callback_duration:
                logger.warning(
                    "Executing %s took %.3f seconds", base_events._format_handle(handle), dt
                )
        finally:
            self._current_handle = None
            # A callback's traceback keeps this frame (its f_back): the frame must not
            # keep the handle, and through it a finished task, alive until a gc pass.
            handle = None

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if self._debug:
            logger.debug("Close %r", self)
        if self._signal_handlers:
            if sys.is_finalizing():
                self._signal_handlers.clear()
            else:
                for sig in list(self._signal_handlers):
                    self.remove_signal_handler(sig)
        _inspect.stop(self)
        children, self._children = self._children, {}
        for pid, (pidfd, transport) in children.items():
            if pidfd is not None:
                os.close(pidfd)
            reap_in_thread(pid, getattr(transport, "_proc", None))
        self._close_tls_handshakes()
        self._close_core()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)


# LoopCore's methods (call_soon, create_future...) as descriptors of `Loop` itself: the
# interpreter's fast call of a method descriptor needs the instance's type to be exactly
# the descriptor's.
bind_methods_to(Loop)
# The native clock as Loop's own descriptor (bind_methods_to gave Loop a copy): a
# subclass that overrides `time` has another.
_NATIVE_TIME = Loop.__dict__.get("time", LoopCore.time)
