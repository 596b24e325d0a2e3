"""The Python half of ferroloop's event loop: the cold paths.

`Loop` runs on `LoopCore` (Rust), which owns the turn, the ready queue, timers, the
poller, `add_reader`/`add_writer`, the stream and datagram transports and the hot
`sock_*` calls. `asyncio.BaseEventLoop` supplies the documented helpers that subclasses
are meant to reuse (tasks, executors, exception handling, address resolution and happy
eyeballs for connections, `create_server`'s options, sendfile's fallback); this module
adds what a Unix loop needs on top: running-loop bookkeeping, signals, non-blocking
name resolution, the remaining `sock_*` calls, transport creation, accepting, Unix
sockets, pipes, subprocesses (child exit through pidfds) and native sendfile.
"""

from __future__ import annotations

import asyncio
import contextvars
import errno
import functools
import io
import os
import signal
import socket
import sys
import threading
from asyncio import (
    base_events,
    constants,
    coroutines,
    events,
    exceptions,
    futures,
    trsock,
    unix_events,
)
from asyncio.log import logger
from operator import methodcaller

from . import _sslproto, _workers
from ._ferroloop import Handle, LoopCore, bind_methods_to, sendfile, stat_path, unlink_path
from ._server import Server
from ._transports import DatagramTransport, SocketTransport, socket_extra

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without ssl
    ssl = None

__all__ = ["Loop"]


# 3.11's new sslproto added the TLS shutdown timeout (`ssl_shutdown_timeout=` of
# create_connection, create_server, start_tls and the Unix variants); 3.10's sslproto
# has none, and its loop methods do not take the argument.
_HAS_SSL_SHUTDOWN_TIMEOUT = hasattr(constants, "SSL_SHUTDOWN_TIMEOUT")

# `_make_socket_transport`'s "no peer address given" (None is a valid address: an
# unnamed Unix socket's).
_NO_PEER = object()
# An argument the caller did not pass (where passing even None means something).
_NOT_GIVEN = object()


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


# A Unix server removes its socket file when it closes from Python 3.13 on (asyncio's
# cleanup_socket, default True); before 3.13 asyncio leaves the file, and so does
# ferroloop unless cleanup_socket=True is passed.
_CLEANUP_SOCKET_DEFAULT = sys.version_info >= (3, 13)


def _check_ssl_socket(sock) -> None:
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


class Loop(LoopCore, asyncio.BaseEventLoop):
    """ferroloop's event loop: a drop-in `asyncio.AbstractEventLoop`."""

    def __init__(self) -> None:
        super().__init__()
        self._signal_handlers: dict[int, Handle] = {}
        # Listening Unix sockets to unlink when they stop serving: sock -> (path, inode).
        self._unix_server_paths: dict[socket.socket, tuple[str, int]] = {}
        # Children being watched: pid -> (pidfd or None, transport).
        self._children: dict[int, tuple[int | None, object]] = {}
        if self._time_overridden():
            self._set_custom_clock(True)

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
        children, self._children = self._children, {}
        for pid, (pidfd, transport) in children.items():
            if pidfd is not None:
                os.close(pidfd)
            _reap_in_thread(pid, getattr(transport, "_proc", None))
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
        fut.add_done_callback(functools.partial(self._sock_wait_done, handle, remove, fd))
        try:
            return await fut
        finally:
            # The future's error has this frame in its traceback, and the handle holds
            # the future: drop both, or they make a cycle.
            fut = handle = None

    @staticmethod
    def _sock_wait_done(handle, remove, fd, _fut) -> None:
        # Another operation may have replaced our callback meanwhile.
        if handle is not None and not handle.cancelled():
            remove(fd)

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
        finally:
            fut = None  # the error's traceback holds this frame: no cycle through it

    async def sock_recv(self, sock, n):
        # Checked (as _check_sock does) and read now in Rust if there is data; otherwise
        # the loop reads when the fd is ready and resolves the future, with no Python
        # callback.
        data = self._sock_recv_start(sock, n)
        if type(data) is bytes:
            return data
        try:
            return await data
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, False, data)
            raise

    async def sock_recv_into(self, sock, buf):
        count = self._sock_recv_into_start(sock, buf)
        if type(count) is int:
            return count
        try:
            return await count
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, False, count)
            raise

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
        pending = self._sock_sendall_start(sock, data)
        if pending is None:
            return
        try:
            await pending
        except exceptions.CancelledError:
            self._sock_op_cancel(sock, True, pending)
            raise

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


    # -- transports ------------------------------------------------------------

    def _make_socket_transport(
        self, sock, protocol, waiter=None, *, extra=None, server=None, peername=_NO_PEER
    ):
        base_events._set_nodelay(sock)
        if extra is None and peername is not _NO_PEER:
            # An accepted connection: the transport takes the fd over, and makes a
            # socket object and an extra dict only if asked for (an idle connection
            # holds neither). If registering it fails, the dropped transport closes the
            # fd; the caller's close of the detached socket then does nothing.
            transport = SocketTransport(self, None, protocol, None, server, peername, sock.detach())
        else:
            transport = SocketTransport(self, sock, protocol, socket_extra(sock, extra), server)
        transport._register()
        if server is not None:
            server._attach(transport)
        return self._start_transport(transport, protocol, waiter)

    def _start_transport(self, transport, protocol, waiter):
        """What asyncio's transports schedule when created: connection_made, then
        reading, then the waiter (in that order, each in its own callback)."""
        self.call_soon(protocol.connection_made, transport)
        # asyncio's reader handle copies the context when reading starts; the copy
        # this callback runs in is the same, so it is handed over instead of copied.
        context = contextvars.copy_context()
        self.call_soon(transport._start_reading, context, context=context)
        if waiter is not None:
            self.call_soon(futures._set_result_unless_cancelled, waiter, None)
        return transport

    def _make_ssl_transport(
        self,
        rawsock,
        protocol,
        sslcontext,
        waiter=None,
        *,
        server_side=False,
        server_hostname=None,
        extra=None,
        server=None,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=None,
    ):
        timeouts = {"ssl_handshake_timeout": ssl_handshake_timeout}
        if _HAS_SSL_SHUTDOWN_TIMEOUT:
            timeouts["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        ssl_protocol = _sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **timeouts
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        transport = DatagramTransport(self, sock, protocol, socket_extra(sock, extra), address)
        transport._register()
        return self._start_transport(transport, protocol, waiter)

    # -- connections -----------------------------------------------------------

    async def create_connection(
        self,
        protocol_factory,
        host=None,
        port=None,
        *,
        ssl=None,
        family=0,
        proto=0,
        flags=0,
        sock=None,
        local_addr=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=_NOT_GIVEN,
        happy_eyeballs_delay=None,
        interleave=None,
        all_errors=_NOT_GIVEN,
    ):
        # 3.10's asyncio takes neither argument (and has no ExceptionGroup for
        # all_errors): passing either is the TypeError it raises.
        ssl_shutdown_timeout = _shutdown_timeout_argument("create_connection", ssl_shutdown_timeout)
        all_errors = _all_errors_argument(all_errors)
        if server_hostname is None and ssl:
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        _check_tls_arguments(ssl, server_hostname, ssl_handshake_timeout, ssl_shutdown_timeout)
        if sock is not None:
            _check_ssl_socket(sock)
        if host is not None or port is not None:
            if sock is not None:
                raise ValueError("host/port and sock can not be specified at the same time")
            sock = await self._connect_any(
                host, port, family, proto, flags, local_addr, happy_eyeballs_delay,
                interleave, all_errors,
            )
        elif sock is None:
            raise ValueError("host and port was not specified and no sock specified")
        elif sock.type != socket.SOCK_STREAM:
            raise ValueError(f"A Stream Socket was expected, got {sock!r}")
        # 3.10's base class has no ssl_shutdown_timeout.
        shutdown = {} if ssl_shutdown_timeout is None else {
            "ssl_shutdown_timeout": ssl_shutdown_timeout
        }
        transport, protocol = await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname,
            ssl_handshake_timeout=ssl_handshake_timeout, **shutdown,
        )
        if self._debug:
            logger.debug(
                "%r connected to %s:%r: (%r, %r)",
                transport.get_extra_info("socket"), host, port, transport, protocol,
            )
        return transport, protocol

    async def _connect_any(
        self, host, port, family, proto, flags, local_addr, delay, interleave, all_errors
    ):
        """A socket connected to one of `host:port`'s addresses: one at a time, or
        happy eyeballs when `delay` is given.

        A failed attempt's exception holds, through its traceback, the frames it went
        through, and so every list it sits in that those frames hold: each such list is
        dropped before returning or raising, which leaves no reference cycle (and no
        garbage for the cyclic collector) behind a failed or successful connect."""
        infos = await self._ensure_resolved(
            (host, port), family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags,
            loop=self,
        )
        if not infos:
            raise OSError("getaddrinfo() returned empty list")
        laddr_infos = None
        if local_addr is not None:
            laddr_infos = await self._ensure_resolved(
                local_addr, family=family, type=socket.SOCK_STREAM, proto=proto, flags=flags,
                loop=self,
            )
            if not laddr_infos:
                raise OSError("getaddrinfo() returned empty list")
        if delay is not None and interleave is None:
            interleave = 1  # happy eyeballs alternates the address families by default
        if interleave:
            infos = base_events._interleave_addrinfos(infos, interleave)
        # One list of errors per attempt, which _connect_sock fills.
        errors: list[list[OSError]] | None = []
        try:
            if delay is None:
                for info in infos:
                    try:
                        return await self._connect_sock(errors, info, laddr_infos)
                    except OSError:
                        continue
            else:
                sock = await self._race_connects(errors, infos, laddr_infos, delay)
                if sock is not None:
                    return sock
            exc = _connect_error([e for attempt in errors for e in attempt], all_errors)
        finally:
            errors = None
        try:
            raise exc
        finally:
            exc = None

    async def _race_connects(self, errors, infos, laddr_infos, delay):
        """Happy eyeballs (RFC 8305), as asyncio's staggered race: the next attempt
        starts when the latest one fails or `delay` seconds after it started, whichever
        comes first; the earliest-started attempt that connects wins. Every other attempt
        is cancelled and has finished, its socket closed, before this returns. Returns
        the winner's socket, or None when every attempt failed (their errors are in
        `errors`)."""
        infos = iter(infos)
        tasks: list[asyncio.Task] = []  # in the order they started
        winner = None
        exhausted = False
        next_start = 0.0
        try:
            while True:
                winner = _first_connected(tasks)
                if winner is not None:
                    return winner
                latest_failed = bool(tasks) and tasks[-1].done()
                if not exhausted and (not tasks or latest_failed or self.time() >= next_start):
                    info = next(infos, None)
                    if info is None:
                        exhausted = True
                    else:
                        tasks.append(self.create_task(self._connect_sock(errors, info, laddr_infos)))
                        next_start = self.time() + delay
                        continue
                pending = [task for task in tasks if not task.done()]
                if not pending:
                    if exhausted:
                        return None
                    continue  # the latest failed: the next one starts now
                await asyncio.wait(
                    pending,
                    timeout=None if exhausted else max(0.0, next_start - self.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            for task in tasks:
                task.cancel()  # nothing for those already done
            if any(not task.done() for task in tasks):
                await asyncio.wait(tasks)
            for task in tasks:
                connected = not task.cancelled() and task.exception() is None
                if connected and task.result() is not winner:
                    task.result().close()
            tasks = None

    # -- servers ---------------------------------------------------------------

    async def create_server(
        self, protocol_factory, host=None, port=None, *, keep_alive=None, start_serving=True,
        **kwargs,
    ):
        kwargs["reuse_port"] = _workers.reuse_port_default(kwargs.get("reuse_port"), host, port)
        server = await super().create_server(
            protocol_factory, host, port, start_serving=False, **kwargs
        )
        # Same layout, more methods: the close_clients/abort_clients of 3.13.
        server.__class__ = Server
        if keep_alive:
            for sock in server._sockets:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if start_serving:
            server._start_serving()
            # One turn, so that the listening sockets are registered when this returns.
            await asyncio.sleep(0)
        return server

    def _start_serving(
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=constants.SSL_HANDSHAKE_TIMEOUT,
        ssl_shutdown_timeout=None,
    ):
        if sock.fileno() == -1:
            return  # closed while an accept retry was pending
        self.add_reader(
            sock.fileno(),
            self._accept_connection,
            protocol_factory,
            sock,
            sslcontext,
            server,
            backlog,
            ssl_handshake_timeout,
            ssl_shutdown_timeout,
        )
        _workers.notify_serving()

    def _stop_serving(self, sock):
        self.remove_reader(sock.fileno())
        unix_path = self._unix_server_paths.pop(sock, None)
        sock.close()
        if unix_path is not None:
            _unlink_if_same(*unix_path)

    def _accept_connection(
        self,
        protocol_factory,
        sock,
        sslcontext,
        server,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout,
    ):
        # A bounded batch per readiness event: other connections get their turn.
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
                conn.setblocking(False)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                # Out of fds or memory: the pending connections stay queued in the kernel.
                # Stop polling the socket (it would stay readable and spin the loop) and
                # try again after a delay, as asyncio does.
                self.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": exc,
                        "socket": trsock.TransportSocket(sock),
                    }
                )
                self.remove_reader(sock.fileno())
                self.call_later(
                    constants.ACCEPT_RETRY_DELAY,
                    self._start_serving,
                    protocol_factory,
                    sock,
                    sslcontext,
                    server,
                    backlog,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
                return
            if sslcontext:
                self.create_task(
                    self._accept_ssl(
                        protocol_factory,
                        conn,
                        {"peername": addr},
                        sslcontext,
                        server,
                        ssl_handshake_timeout,
                        ssl_shutdown_timeout,
                    )
                )
            else:
                self._accept_plain(protocol_factory, conn, addr, server)

    def _accept_plain(self, protocol_factory, conn, peername, server):
        try:
            protocol = protocol_factory()
            self._make_socket_transport(conn, protocol, server=server, peername=peername)
        except (SystemExit, KeyboardInterrupt):
            conn.close()
            raise
        except BaseException as exc:  # noqa: BLE001 - reported, the server goes on
            conn.close()
            self.call_exception_handler(
                {"message": "Error on transport creation for incoming connection", "exception": exc}
            )

    async def _accept_ssl(
        self, protocol_factory, conn, extra, sslcontext, server, handshake_timeout, shutdown_timeout
    ):
        protocol = transport = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            transport = self._make_ssl_transport(
                conn,
                protocol,
                sslcontext,
                waiter=waiter,
                server_side=True,
                extra=extra,
                server=server,
                ssl_handshake_timeout=handshake_timeout,
                ssl_shutdown_timeout=shutdown_timeout,
            )
            try:
                await waiter
            except BaseException:
                transport.close()
                raise
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - reported, the server goes on
            context = {
                "message": "Error on transport creation for incoming connection",
                "exception": exc,
            }
            if protocol is not None:
                context["protocol"] = protocol
            if transport is not None:
                context["transport"] = transport
            self.call_exception_handler(context)

    # -- Unix sockets ----------------------------------------------------------

    async def create_unix_connection(
        self,
        protocol_factory,
        path=None,
        *,
        ssl=None,
        sock=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=_NOT_GIVEN,
    ):
        ssl_shutdown_timeout = _shutdown_timeout_argument("create_unix_connection", ssl_shutdown_timeout)
        _check_tls_arguments(ssl, server_hostname, ssl_handshake_timeout, ssl_shutdown_timeout)
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
            try:
                sock.setblocking(False)
                await self.sock_connect(sock, path)
            except BaseException:
                sock.close()
                raise
        else:
            if sock is None:
                raise ValueError("no path and sock were specified")
            _check_unix_stream_socket(sock)
            sock.setblocking(False)
        timeouts = {"ssl_handshake_timeout": ssl_handshake_timeout}
        if _HAS_SSL_SHUTDOWN_TIMEOUT:
            timeouts["ssl_shutdown_timeout"] = ssl_shutdown_timeout
        return await self._create_connection_transport(
            sock, protocol_factory, ssl, server_hostname, **timeouts
        )

    async def create_unix_server(
        self,
        protocol_factory,
        path=None,
        *,
        sock=None,
        backlog=100,
        ssl=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=_NOT_GIVEN,
        start_serving=True,
        cleanup_socket=_CLEANUP_SOCKET_DEFAULT,
    ):
        ssl_shutdown_timeout = _shutdown_timeout_argument("create_unix_server", ssl_shutdown_timeout)
        if isinstance(ssl, bool):
            raise TypeError("ssl argument must be an SSLContext or None")
        if ssl_handshake_timeout is not None and not ssl:
            raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
        if ssl_shutdown_timeout is not None and not ssl:
            raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
        if path is not None:
            if sock is not None:
                raise ValueError("path and sock can not be specified at the same time")
            path = os.fspath(path)
            sock = _workers.shared_unix_socket(path, backlog)  # None outside worker mode
            if sock is None:
                sock = _bind_unix_socket(path)
            else:
                cleanup_socket = False  # the supervisor removes the file when all have stopped
        else:
            if sock is None:
                raise ValueError("path was not specified, and no sock specified")
            _check_unix_stream_socket(sock)
        if cleanup_socket:
            bound = sock.getsockname()
            if isinstance(bound, str) and bound and not bound.startswith("\0"):
                try:
                    self._unix_server_paths[sock] = (bound, stat_path(bound)[1])
                except OSError:
                    pass
        sock.setblocking(False)
        timeouts = [ssl_handshake_timeout]
        if _HAS_SSL_SHUTDOWN_TIMEOUT:
            timeouts.append(ssl_shutdown_timeout)
        server = Server(self, [sock], protocol_factory, ssl, backlog, *timeouts)
        if start_serving:
            server._start_serving()
            await asyncio.sleep(0)
        return server

    # -- pipes and subprocesses ------------------------------------------------

    # asyncio's Unix pipe transports (and the subprocess transport over them) drive
    # their fds with these selector-loop names.

    def _add_reader(self, fd, callback, *args):
        self.add_reader(fd, callback, *args)

    def _remove_reader(self, fd):
        return self.remove_reader(fd)

    def _add_writer(self, fd, callback, *args):
        self.add_writer(fd, callback, *args)

    def _remove_writer(self, fd):
        return self.remove_writer(fd)

    def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return unix_events._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):
        return unix_events._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

    async def _make_subprocess_transport(
        self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
    ):
        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            waiter=waiter, extra=extra, **kwargs,
        )
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp) -> None:
        """Notices the child's exit on the loop thread, without a thread per child: a
        pidfd (Linux 5.3+) becomes readable when the child exits. Without pidfds the
        loop reaps watched children on SIGCHLD instead (main thread only)."""
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._children[pid] = (None, transp)
            self.add_signal_handler(signal.SIGCHLD, self._reap_children)
            self._reap_children()
            return
        self._children[pid] = (pidfd, transp)
        self.add_reader(pidfd, self._child_exited, pid)

    def _child_exited(self, pid: int) -> None:
        pidfd, transp = self._children.pop(pid, (None, None))
        if pidfd is not None:
            self.remove_reader(pidfd)
            os.close(pidfd)
        if transp is not None:
            transp._process_exited(self._reap(pid, transp))

    def _reap_children(self) -> None:
        for pid, (pidfd, transp) in list(self._children.items()):
            if pidfd is not None:
                continue
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, None
            if done == 0:
                continue
            del self._children[pid]
            if status is None:
                transp._process_exited(self._reap(pid, transp))
            else:
                transp._process_exited(os.waitstatus_to_exitcode(status))
        if not any(pidfd is None for pidfd, _ in self._children.values()):
            self.remove_signal_handler(signal.SIGCHLD)

    @staticmethod

    def _reap(pid: int, transp) -> int:
        try:
            _, status = os.waitpid(pid, 0)  # the child has exited: this does not block
        except ChildProcessError:
            # Reaped already, by Popen.poll() in the transport's close().
            returncode = getattr(transp._proc, "returncode", None)
            if returncode is not None:
                return returncode
            logger.warning("Unknown child process pid %d, will report returncode 255", pid)
            return 255
        return os.waitstatus_to_exitcode(status)

    # -- sendfile --------------------------------------------------------------

    async def _sendfile_native(self, transp, file, offset, count):
        resume_reading = transp.is_reading()
        transp.pause_reading()
        await transp._make_empty_waiter()
        # The transport gives its fd back while sock_sendfile drives it.
        transp._unregister()
        try:
            return await self.sock_sendfile(transp._sock, file, offset, count, fallback=False)
        finally:
            transp._reset_empty_waiter()
            transp._register()
            if resume_reading:
                transp.resume_reading()

    async def _sock_sendfile_native(self, sock, file, offset, count):
        try:
            fileno = file.fileno()
        except (AttributeError, io.UnsupportedOperation):
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        try:
            fsize = os.fstat(fileno).st_size
        except OSError:
            raise exceptions.SendfileNotAvailableError("not a regular file") from None
        blocksize = count if count else fsize
        if not blocksize:
            return 0  # an empty file
        total = 0
        try:
            while True:
                todo = min(count - total, blocksize) if count else blocksize
                if todo <= 0:
                    break
                send = functools.partial(_sendfile_once, fileno, offset + total, todo)
                try:
                    sent = send(sock)
                except (BlockingIOError, InterruptedError):
                    sent = await self._sock_wait(sock, True, send)
                if sent == 0:
                    break  # end of file
                total += sent
        except OSError as exc:
            if exc.errno == errno.ENOTCONN and type(exc) is not ConnectionError:
                raise ConnectionError(errno.ENOTCONN, "socket is not connected") from exc
            if total == 0:
                raise exceptions.SendfileNotAvailableError("os.sendfile call failed") from exc
            raise
        finally:
            if total > 0:
                os.lseek(fileno, offset + total, os.SEEK_SET)
        return total


# LoopCore's methods (call_soon, create_future...) as descriptors of `Loop` itself: the
# interpreter's fast call of a method descriptor needs the instance's type to be exactly
# the descriptor's.
bind_methods_to(Loop)
# The native clock as Loop's own descriptor (bind_methods_to gave Loop a copy): a
# subclass that overrides `time` has another.
_NATIVE_TIME = Loop.__dict__.get("time", LoopCore.time)


def _reap_in_thread(pid: int, popen=None) -> None:
    """Reaps a child that outlives its loop once it exits, so that it stays no zombie:
    a daemon thread blocks in waitpid for it (as asyncio's threaded child watcher does
    for every child)."""
    try:
        threading.Thread(
            target=_wait_for_child,
            args=(pid, popen),
            name=f"ferroloop-reaper-{pid}",
            daemon=True,
        ).start()
    except RuntimeError:
        pass  # the interpreter is shutting down: it can start no thread


def _wait_for_child(pid: int, popen) -> None:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return  # reaped elsewhere already (Popen.poll, a SIGCHLD handler)
    # The exit status goes where the child's Popen keeps it, so a later poll() or
    # kill() of the transport sees a finished child instead of a pid that may be reused.
    if popen is not None and popen.returncode is None:
        popen.returncode = os.waitstatus_to_exitcode(status)


def _sendfile_once(fileno, offset, count, sock):
    return sendfile(sock.fileno(), fileno, offset, count)


def _first_connected(tasks):
    """The socket of the earliest-started attempt that connected, if any (an attempt
    cancelled from outside counts as failed)."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
    return None


def _connect_error(errors: list[OSError], all_errors: bool) -> BaseException:
    """What a create_connection whose every attempt failed raises, as asyncio does: the
    error when there is one (or they all read the same), else one naming them all;
    with all_errors (3.11+, see _all_errors_argument), an ExceptionGroup of them all."""
    if all_errors:
        return ExceptionGroup("create_connection failed", errors)  # noqa: F821
    first = str(errors[0])
    if all(str(e) == first for e in errors):
        return errors[0]
    return OSError("Multiple exceptions: {}".format(", ".join(str(e) for e in errors)))


def _check_tls_arguments(ssl, server_hostname, handshake_timeout, shutdown_timeout) -> None:
    if ssl:
        if server_hostname is None:
            raise ValueError("you have to pass server_hostname when using ssl")
        return
    if server_hostname is not None:
        raise ValueError("server_hostname is only meaningful with ssl")
    if handshake_timeout is not None:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if shutdown_timeout is not None:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")


def _all_errors_argument(all_errors) -> bool:
    """create_connection's `all_errors` (False when not given): 3.11+, where
    ExceptionGroup exists (asyncio itself takes it from 3.12)."""
    if all_errors is _NOT_GIVEN:
        return False
    if sys.version_info < (3, 11):
        raise TypeError("create_connection() got an unexpected keyword argument 'all_errors'")
    return all_errors


def _shutdown_timeout_argument(method: str, shutdown_timeout):
    """The `ssl_shutdown_timeout` a Unix method was given (None when not given). Before
    3.11 asyncio's TLS has no shutdown timeout and its loop methods take no such
    argument: passing it at all, None included, is the TypeError stock asyncio raises."""
    if shutdown_timeout is _NOT_GIVEN:
        return None
    if not _HAS_SSL_SHUTDOWN_TIMEOUT:
        raise TypeError(f"{method}() got an unexpected keyword argument 'ssl_shutdown_timeout'")
    return shutdown_timeout


def _check_unix_stream_socket(sock) -> None:
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")


def _bind_unix_socket(path: str) -> socket.socket:
    """A Unix stream socket bound to `path`; a stale socket file left there by a dead
    server is removed first (abstract names, starting with a NUL, have no file). The
    stat and unlink are native calls (see fs_ops.rs)."""
    if path and path[0] not in (0, "\x00"):
        try:
            if stat_path(path)[0]:
                unlink_path(path)
        except FileNotFoundError:
            pass
        except OSError as err:
            logger.error("Unable to check or remove stale UNIX socket %r: %r", path, err)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(errno.EADDRINUSE, f"Address {path!r} is already in use") from None
        raise
    except BaseException:
        sock.close()
        raise
    return sock


def _unlink_if_same(path: str, inode: int) -> None:
    """Removes the socket file of a closed server unless something replaced it."""
    try:
        if stat_path(path)[1] == inode:
            unlink_path(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)
