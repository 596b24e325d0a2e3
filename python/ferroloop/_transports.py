"""The Python face of the Rust transports.

`SocketTransport` is the Rust `StreamTransport` plus what Python code expects of an
asyncio transport: an instance `__dict__` (test suites patch transports with
`mock.patch.object`), the class attributes `BaseEventLoop` consults for `sendfile` and
`start_tls`, and `isinstance(transport, asyncio.Transport)`. A Rust class cannot
inherit from `asyncio.Transport` (its `__slots__` layout conflicts with any native
base), so the transport reports an `asyncio.Transport` subclass as its `__class__`,
the hook `isinstance` consults after the real type, as `unittest.mock` does.
"""

from __future__ import annotations

import asyncio
import socket
from asyncio import constants, transports, trsock

from ._ferroloop import DatagramTransport as _DatagramCore
from ._ferroloop import StreamTransport

__all__ = ["DatagramTransport", "SocketTransport", "socket_extra"]


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
