"""The Python half of ferroloop's event loop: the cold paths.

`Loop` runs on `LoopCore` (Rust), which owns the turn, the ready queue, timers, the
poller and `add_reader`/`add_writer`. `asyncio.BaseEventLoop` supplies the documented
helpers that subclasses are meant to reuse (tasks, executors, exception handling,
address resolution for connections); this module adds what a Unix loop needs on top:
running-loop bookkeeping, signals, non-blocking name resolution and the `sock_*` calls.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import signal
import socket
import sys
import threading
from asyncio import base_events, coroutines, events
from asyncio.log import logger
from operator import methodcaller

from ._ferroloop import Handle, LoopCore

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without ssl
    ssl = None

__all__ = ["Loop"]


def _sighandler_noop(signum, frame):
    """The Python-level handler of a signal the loop handles; the work happens when
    the loop reads the signal number from its wakeup fd."""


def _is_numeric_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        try:
            host = host.decode("idna")
        except UnicodeError:
            return False
    if not isinstance(host, str):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.partition("%")[0])
            return True
        except (OSError, ValueError):
            continue
    return False


def _is_numeric_port(port) -> bool:
    if port is None or isinstance(port, int):
        return True
    if isinstance(port, (str, bytes)):
        return port.isdigit()
    return False


def _check_ssl_socket(sock) -> None:
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


class Loop(LoopCore, asyncio.BaseEventLoop):
    """ferroloop's event loop: a drop-in `asyncio.AbstractEventLoop`."""

    def __init__(self) -> None:
        super().__init__()
        self._signal_handlers: dict[int, Handle] = {}

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
            self._run_forever_core()
        finally:
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
        self._close_core()
        self._executor_shutdown_called = True
        executor = self._default_executor
        if executor is not None:
            self._default_executor = None
            executor.shutdown(wait=False)

    # -- signals ---------------------------------------------------------------

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
        self._signal_handlers[sig] = Handle(callback, args, self, None)
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

    # -- name resolution -------------------------------------------------------

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        if _is_numeric_host(host) and _is_numeric_port(port):
            # Numeric addresses resolve without DNS: no thread hop needed.
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        resolve = self._getaddrinfo_debug if self._debug else socket.getaddrinfo
        return await self.run_in_executor(None, resolve, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr, flags=0):
        numeric = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        if flags & numeric == numeric:
            return socket.getnameinfo(sockaddr, flags)
        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)

    # -- low-level socket operations -------------------------------------------

    def _check_sock(self, sock) -> None:
        _check_ssl_socket(sock)
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def _sock_wait(self, sock, writable: bool, op):
        """Waits until `sock` is ready and `op(sock)` stops raising BlockingIOError.
        `op` looks the socket method up on each try, as asyncio does."""
        fut = self.create_future()
        fd = sock.fileno()
        add, get, remove = (
            (self.add_writer, self._get_writer, self.remove_writer)
            if writable
            else (self.add_reader, self._get_reader, self.remove_reader)
        )
        add(fd, self._sock_retry, fut, sock, op)
        handle = get(fd)

        def done(_fut):
            # Another operation may have replaced our callback meanwhile.
            if handle is not None and not handle.cancelled():
                remove(fd)

        fut.add_done_callback(done)
        try:
            return await fut
        finally:
            fut = None

    @staticmethod
    def _sock_retry(fut, sock, op) -> None:
        if fut.done():
            return
        try:
            result = op(sock)
        except (BlockingIOError, InterruptedError):
            return
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the future carries any failure
            fut.set_exception(exc)
        else:
            fut.set_result(result)

    async def sock_recv(self, sock, n):
        self._check_sock(sock)
        try:
            return sock.recv(n)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recv", n))

    async def sock_recv_into(self, sock, buf):
        self._check_sock(sock)
        try:
            return sock.recv_into(buf)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recv_into", buf))

    async def sock_recvfrom(self, sock, bufsize):
        self._check_sock(sock)
        try:
            return sock.recvfrom(bufsize)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recvfrom", bufsize))

    async def sock_recvfrom_into(self, sock, buf, nbytes=0):
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        try:
            return sock.recvfrom_into(buf, nbytes)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, methodcaller("recvfrom_into", buf, nbytes))

    async def sock_sendto(self, sock, data, address):
        self._check_sock(sock)
        try:
            return sock.sendto(data, address)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, True, methodcaller("sendto", data, address))

    async def sock_sendall(self, sock, data):
        self._check_sock(sock)
        try:
            sent = sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        view = memoryview(data).cast("B")
        while sent < len(view):
            sent += await self._sock_wait(sock, True, methodcaller("send", view[sent:]))

    async def sock_connect(self, sock, address):
        self._check_sock(sock)
        if sock.family == socket.AF_INET or (
            base_events._HAS_IPv6 and sock.family == socket.AF_INET6
        ):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            _, _, _, _, address = resolved[0]
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass
        await self._sock_wait(sock, True, functools.partial(self._sock_connect_result, address=address))

    @staticmethod
    def _sock_connect_result(sock, address) -> None:
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err in (errno.EINPROGRESS, errno.EALREADY, errno.EAGAIN):
            raise BlockingIOError(err, "connect in progress")
        if err != 0:
            raise OSError(err, f"Connect call failed {address}")

    async def sock_accept(self, sock):
        self._check_sock(sock)
        try:
            return self._accept_nonblocking(sock)
        except (BlockingIOError, InterruptedError):
            pass
        return await self._sock_wait(sock, False, self._accept_nonblocking)

    @staticmethod
    def _accept_nonblocking(sock):
        conn, address = sock.accept()
        conn.setblocking(False)
        return conn, address

