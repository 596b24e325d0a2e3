"""Seeing inside a running loop: `loop.stats()` and `loop.connections()`.

The counters are kept by the Rust turn (`src/stats.rs`) at the cost of an addition;
the clock is read around the poll, each turn and each callback only once
`loop.set_stats_timing(True)` is called. What only the Python layer sees (exceptions
reported, connections accepted, pipes and subprocesses) is counted here.
"""

from __future__ import annotations

import asyncio
import weakref
from asyncio import format_helpers, sslproto
from typing import Any

from ._ferroloop import StreamTransport


class ObserveMethods:
    """`stats`, `connections` and the counting they need."""

    _exceptions_reported: int
    _connections_accepted: int
    _pipe_transports: weakref.WeakSet

    def _init_observe(self) -> None:
        self._exceptions_reported = 0
        self._connections_accepted = 0
        self._pipe_transports = weakref.WeakSet()
        # Stream transports out of the registry while loop.sendfile drives their socket.
        self._sendfile_transports: set = set()

    def call_exception_handler(self, context):
        self._exceptions_reported += 1
        return super().call_exception_handler(context)  # type: ignore[misc]

    def _note_pipe_transport(self, transport):
        self._pipe_transports.add(transport)
        return transport

    def stats(self) -> dict[str, Any]:
        """A snapshot of the loop's counters (see the README, "Seeing inside a loop").

        Always kept: turns, callbacks and I/O events run, timers scheduled, fired and
        cancelled, bytes read and written by transports (TCP, Unix, TLS records, datagrams),
        connections accepted, exceptions reported, what is registered now, and the
        histograms of the ready queue's depth per turn and of timer lateness. With
        `set_stats_timing(True)` also: seconds spent polling and running, and the
        histograms of turn and callback length, and `slowest_callbacks`: the slowest
        runs since the previous `stats()` call (at most 10, longest first, each
        `{"seconds": s, "callback": name}`; a run is reported to one call only). A
        histogram is `{"buckets": [(upper_bound, count), ...], "count": n, "sum": total}`
        with log-spaced (power of two) bounds; the last bound is `inf`.
        """
        return self._snapshot(take_slowest=True)

    def _snapshot(self, take_slowest: bool) -> dict[str, Any]:
        """`stats()`; without `take_slowest` (the exporters, which have no place for
        them) the slowest runs are neither reported nor let go."""
        snapshot = self._stats(take_slowest)  # type: ignore[attr-defined]
        runs = snapshot.get("slowest_callbacks")
        if runs is not None:
            snapshot["slowest_callbacks"] = [
                {"seconds": seconds, "callback": _describe_run(kind, obj, detail)}
                for seconds, kind, obj, detail in runs
            ]
        snapshot["exceptions_reported"] = self._exceptions_reported
        snapshot["connections_accepted"] = self._connections_accepted
        snapshot["pipes_open"] = sum(1 for t in list(self._pipe_transports) if not t.is_closing())
        snapshot["subprocesses"] = len(self._children)  # type: ignore[attr-defined]
        snapshot["time"] = self.time()  # type: ignore[attr-defined]
        return snapshot

    def connections(self) -> list[dict[str, Any]]:
        """Every live transport: kind, fd, local and peer address, age in seconds, bytes
        in and out, write buffer size and water marks, whether it reads, and for TLS
        the protocol version, cipher and record path. Pipes and subprocesses (asyncio's
        own transport classes) are listed with what they expose."""
        transports = self._registered_transports()
        transports += [t for t in self._sendfile_transports if t not in transports]
        rows = [_native_row(t) for t in transports]
        for transport in list(self._pipe_transports):
            if not transport.is_closing():
                rows.append(_pipe_row(transport))
        for _pidfd, transport in list(self._children.values()):  # type: ignore[attr-defined]
            rows.append(_subprocess_row(transport))
        return rows


def _native_row(transport) -> dict[str, Any]:
    read, written, age = transport._ferroloop_counters or (None, None, None)
    peer = transport.get_extra_info("peername")
    local = transport.get_extra_info("sockname")
    address = local if local is not None else peer
    unix = isinstance(address, (str, bytes))
    if isinstance(transport, StreamTransport):
        kind = "unix" if unix else "tcp"
        reading = transport.is_reading()
    else:
        kind = "unix-datagram" if unix else "udp"
        reading = not transport.is_closing()
    low, high = transport.get_write_buffer_limits()
    protocol = transport.get_protocol()
    row = {
        "kind": kind,
        "fd": transport._sock_fd,
        "local": local,
        "peer": peer,
        "age": age,
        "bytes_read": read,
        "bytes_written": written,
        "write_buffer_size": transport.get_write_buffer_size(),
        "write_buffer_limits": (low, high),
        "reading": reading,
        "closing": transport.is_closing(),
        "protocol": _name(protocol),
        "tls": None,
    }
    if isinstance(protocol, sslproto.SSLProtocol):
        row["protocol"] = _name(protocol._app_protocol)
        row["tls"] = _tls_info(protocol)
    return row


def _tls_info(protocol) -> dict[str, Any]:
    sslobj = getattr(protocol, "_sslobj", None)
    if sslobj is None:  # 3.10's sslproto keeps it in its SSL pipe
        sslobj = getattr(getattr(protocol, "_sslpipe", None), "ssl_object", None)
    cipher = sslobj.cipher() if sslobj is not None else None
    return {
        "version": sslobj.version() if sslobj is not None else None,
        "cipher": cipher[0] if cipher else None,
        "path": getattr(protocol, "_ferroloop_tls_path", "asyncio sslproto"),
    }


# A row of loop.connections(): what a transport kind does not have stays None.
_ROW = dict.fromkeys((
    "kind", "fd", "local", "peer", "age", "bytes_read", "bytes_written",
    "write_buffer_size", "write_buffer_limits", "reading", "closing", "protocol", "tls",
))


def _pipe_row(transport) -> dict[str, Any]:
    pipe = transport.get_extra_info("pipe")
    writes = isinstance(transport, asyncio.WriteTransport)
    return {
        **_ROW,
        "kind": "pipe",
        "fd": pipe.fileno() if pipe is not None else None,
        "write_buffer_size": transport.get_write_buffer_size() if writes else 0,
        "write_buffer_limits": transport.get_write_buffer_limits() if writes else None,
        "reading": None if writes else transport.is_reading(),
        "closing": transport.is_closing(),
        "protocol": _name(transport.get_protocol()),
    }


def _subprocess_row(transport) -> dict[str, Any]:
    return {
        **_ROW,
        "kind": "subprocess",
        "write_buffer_size": 0,
        "closing": transport.is_closing(),
        "protocol": _name(transport.get_protocol()),
        "pid": transport.get_pid(),
        "returncode": transport.get_returncode(),
    }


def _describe_run(kind: str, obj, detail: str | None) -> str:
    """A slow run's name: a task's name and coroutine for a task step, the callback and
    where it is defined for another callback (as asyncio's debug mode names a handle),
    the protocol's class and method for a transport's readiness."""
    if kind == "sock":
        return f"loop.{obj}()"
    if kind == "transport":
        return _describe_protocol_call(obj, detail)
    owner = getattr(obj, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        what = getattr(coro, "__qualname__", None) or type(coro).__qualname__
        return f"task {owner.get_name()!r} step: {what}()"
    return format_helpers._format_callback_source(obj, ())


def _describe_protocol_call(transport, detail: str | None) -> str:
    protocol = transport.get_protocol()
    tls = isinstance(protocol, sslproto.SSLProtocol)
    if tls:
        protocol = protocol._app_protocol
    if detail == "write":
        method = "(write buffer flushed)"
    elif not isinstance(transport, StreamTransport):
        method = ".datagram_received"
    elif isinstance(protocol, asyncio.BufferedProtocol):
        method = ".buffer_updated"
    else:
        method = ".data_received"
    return f"{_name(protocol)}{method}" + (" (TLS)" if tls else "")


def _name(obj) -> str | None:
    if obj is None:
        return None
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"

