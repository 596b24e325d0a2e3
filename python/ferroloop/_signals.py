"""Signals: `add_signal_handler` and `remove_signal_handler`.

A handled signal's Python-level handler does nothing: the interpreter writes the signal
number to the loop's wakeup fd (`signal.set_wakeup_fd`), and the core reads it in the
turn and passes it to `_handle_signals`, which schedules the handler's callback.
"""

from __future__ import annotations

import errno
import signal
import threading
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

    # While the loop runs in the main thread, every signal wakes it: the interpreter
    # writes its number to the loop's signal socket, which the poll watches, so a
    # signal that arrives between the turn's check of pending signals and the wait (or
    # in another thread) cannot leave the loop asleep with asyncio.run's SIGINT handler
    # never run. A wakeup fd someone else set is left alone.
    _wakeup_taken = False

    def _take_wakeup_fd(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        ours = self._wakeup_fd()
        try:
            previous = signal.set_wakeup_fd(ours, warn_on_full_buffer=False)
        except (ValueError, OSError):
            return
        if previous not in (-1, ours):
            signal.set_wakeup_fd(previous)
            return
        self._wakeup_taken = previous == -1

    def _give_back_wakeup_fd(self) -> None:
        if not self._wakeup_taken:
            return
        self._wakeup_taken = False
        if self._signal_handlers:
            return  # add_signal_handler's, kept until the last handler goes
        try:
            previous = signal.set_wakeup_fd(-1)
        except ValueError:
            return  # not the main thread
        except OSError as exc:
            logger.info("set_wakeup_fd(-1) failed: %s", exc)
            return
        if previous not in (-1, self._wakeup_fd()):
            signal.set_wakeup_fd(previous)  # replaced meanwhile: not ours to undo

    def _release_wakeup_fd(self) -> None:
        if self._signal_handlers:
            return
        if self._wakeup_taken or (
            self.is_running() and threading.current_thread() is threading.main_thread()
        ):
            # The running loop keeps it; run_forever gives it back when it ends.
            self._wakeup_taken = True
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
