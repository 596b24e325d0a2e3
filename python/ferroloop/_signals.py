"""Signals: `add_signal_handler` and `remove_signal_handler`.

A handled signal's Python-level handler does nothing: the interpreter writes the signal
number to the loop's wakeup fd (`signal.set_wakeup_fd`), and the core reads it in the
turn and passes it to `_handle_signals`, which schedules the handler's callback.
"""

from __future__ import annotations

import errno
import signal
from asyncio import coroutines
from asyncio.log import logger

__all__ = ["SignalMethods"]


def _sighandler_noop(signum, frame):
    """The Python-level handler of a signal the loop handles; the work happens when
    the loop reads the signal number from its wakeup fd."""


class SignalMethods:
    """The loop's signal handling (a base of `Loop`)."""

    def _check_signal(self, sig) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    def add_signal_handler(self, sig, callback, *args) -> None:
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            # Raises ValueError outside the main thread.
            signal.set_wakeup_fd(self._wakeup_fd(), warn_on_full_buffer=False)
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        self._signal_handlers[sig] = self._signal_handle(callback, args)
        self._signals_watched = True
        try:
            signal.signal(sig, _sighandler_noop)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            self._release_wakeup_fd()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

    def remove_signal_handler(self, sig) -> bool:
        self._check_signal(sig)
        if self._signal_handlers.pop(sig, None) is None:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        self._release_wakeup_fd()
        return True

    def _release_wakeup_fd(self) -> None:
        if self._signal_handlers:
            return
        self._signals_watched = False
        try:
            signal.set_wakeup_fd(-1)
        except (ValueError, OSError) as exc:
            logger.info("set_wakeup_fd(-1) failed: %s", exc)

    def _handle_signals(self, signums: bytes) -> None:
        """Called by the core with the signal numbers read from the wakeup fd."""
        for signum in signums:
            handle = self._signal_handlers.get(signum)
            if handle is None:
                continue
            if handle.cancelled():
                self.remove_signal_handler(signum)
            else:
                self._add_callback(handle)
