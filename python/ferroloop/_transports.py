"""The Python face of the Rust transports.

`SocketTransport` is the Rust `StreamTransport` plus what Python code expects of an
asyncio transport: an instance `__dict__` (test suites patch transports with
`mock.patch.object`), the class attributes `BaseEventLoop` consults for `sendfile` and
`start_tls`, and `isinstance(transport, asyncio.Transport)`. A Rust class cannot
inherit from `asyncio.Transport` (its `__slots__` layout conflicts with any native
base), so the transport reports an `asyncio.Transport` subclass as its `__class__`,
the hook `isinstance` consults after the real type, as `unittest.mock` does.

`TransportMethods`, a base of `Loop`, holds the loop's side: the `_make_*_transport`
factories `BaseEventLoop`'s methods call, which make these transports and start them
as asyncio's transports start.
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import sys
from asyncio import base_events, constants, futures, sslproto, transports, trsock

from . import _sslproto
from ._arguments import HAS_SSL_SHUTDOWN_TIMEOUT
from ._ferroloop import DatagramTransport as _DatagramCore
from ._ferroloop import StreamTransport

__all__ = [
    "DatagramTransport",
    "SocketTransport",
    "TransportMethods",
    "socket_extra",
]

class _SocketTransportInterface(transports._FlowControlMixin, asyncio.Transport):
    """What `SocketTransport` instances report as their `__class__`. It includes the
    flow-control mixin because `loop.sendfile`'s fallback requires it."""

    __slots__ = ()


_SocketTransportInterface.__name__ = "SocketTransport"
_SocketTransportInterface.__qualname__ = "SocketTransport"


class SocketTransport(StreamTransport):
    """A TCP or Unix stream connection; the read and write paths are in Rust."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    @property
    def __class__(self):
        return _SocketTransportInterface


class _DatagramTransportInterface(transports._FlowControlMixin, asyncio.DatagramTransport):
    """What `DatagramTransport` instances report as their `__class__`."""

    __slots__ = ()


_DatagramTransportInterface.__name__ = "DatagramTransport"
_DatagramTransportInterface.__qualname__ = "DatagramTransport"


class DatagramTransport(_DatagramCore):
    """A UDP or Unix datagram endpoint; reads and buffering are in Rust."""

    @property
    def __class__(self):
        return _DatagramTransportInterface


def socket_extra(sock: socket.socket, extra: dict | None) -> dict:
    """The `get_extra_info` dict of a new socket transport. Like asyncio's it is the
    caller's dict (not a copy) with `peername` added; `socket` and `sockname`, which
    few callers ask for, are added by `fill_socket_extra` on first request or when the
    socket is closed, whichever comes first: an idle connection keeps two objects
    fewer."""
    info = {} if extra is None else extra
    if "peername" not in info:
        try:
            info["peername"] = sock.getpeername()
        except OSError:
            info["peername"] = None
    return info


def fill_socket_extra(sock: socket.socket, info: dict) -> None:
    """Adds `socket` and `sockname` to a transport's extra dict (see `socket_extra`)."""
    if "socket" not in info:
        info["socket"] = trsock.TransportSocket(sock)
    if "sockname" not in info:
        try:
            info["sockname"] = sock.getsockname()
        except OSError:
            info["sockname"] = None


class TransportMethods:
    """The loop's transport factories (a base of `Loop`), which `BaseEventLoop`'s
    methods call."""

    def _make_socket_transport(
        self, sock, protocol, waiter=None, *, extra=None, server=None, peername=None, fd=-1,
        shape=None,
    ):
        if sock is None:
            # An accepted connection (`_serve.py`), non-blocking and with TCP_NODELAY
            # where asyncio sets it: the transport takes `fd` over (it closes it if
            # this fails), keeps `peername` and the socket's (family, type, proto)
            # `shape`, and makes a socket object and an extra dict only if asked for
            # (an idle connection holds neither).
            transport = SocketTransport(
                self, None, protocol, None, server, peername, fd, shape
            )
        else:
            base_events._set_nodelay(sock)
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
        ssl_protocol = self._new_ssl_protocol(
            protocol, sslcontext, waiter, server_side, server_hostname,
            ssl_handshake_timeout, ssl_shutdown_timeout,
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    def _new_ssl_protocol(
        self, protocol, sslcontext, waiter, server_side, server_hostname,
        handshake_timeout, shutdown_timeout,
    ):
        """ferroloop's `SSLProtocol`, given the shutdown timeout where the running
        asyncio takes one."""
        timeouts = {"ssl_handshake_timeout": handshake_timeout}
        if HAS_SSL_SHUTDOWN_TIMEOUT:
            timeouts["ssl_shutdown_timeout"] = shutdown_timeout
        return _sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **timeouts
        )

    # The versions whose `sslproto` ferroloop's `SSLProtocol` subclasses (`_sslproto.py`).
    if sys.version_info >= (3, 11) and sys.version_info < (3, 14):

        async def start_tls(
            self,
            transport,
            protocol,
            sslcontext,
            *,
            server_side=False,
            server_hostname=None,
            ssl_handshake_timeout=None,
            ssl_shutdown_timeout=None,
        ):
            """`BaseEventLoop.start_tls` (the same in 3.11 to 3.13) on ferroloop's
            `SSLProtocol`, whose records, handshake and shutdown run in Rust; asyncio's
            would make its own class's protocol."""
            if sslproto.ssl is None:
                raise RuntimeError("Python ssl module is not available")
            if not isinstance(sslcontext, sslproto.ssl.SSLContext):
                raise TypeError(
                    f"sslcontext is expected to be an instance of ssl.SSLContext, got {sslcontext!r}"
                )
            if not getattr(transport, "_start_tls_compatible", False):
                raise TypeError(f"transport {transport!r} is not supported by start_tls()")
            waiter = self.create_future()
            ssl_protocol = _sslproto.SSLProtocol(
                self,
                protocol,
                sslcontext,
                waiter,
                server_side,
                server_hostname,
                ssl_handshake_timeout=ssl_handshake_timeout,
                ssl_shutdown_timeout=ssl_shutdown_timeout,
                call_connection_made=False,
            )
            # No byte may reach the TLS protocol before its connection_made: reading
            # resumes in the callback after it.
            transport.pause_reading()
            transport.set_protocol(ssl_protocol)
            made = self.call_soon(ssl_protocol.connection_made, transport)
            resumed = self.call_soon(transport.resume_reading)
            try:
                await waiter
            except BaseException:
                transport.close()
                made.cancel()
                resumed.cancel()
                raise
            return ssl_protocol._app_transport

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):
        transport = DatagramTransport(self, sock, protocol, socket_extra(sock, extra), address)
        transport._register()
        return self._start_transport(transport, protocol, waiter)
