"""Outgoing connections: `create_connection`, one address at a time or with happy
eyeballs (RFC 8305) when a delay is given, and the error it raises when every attempt
failed.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from asyncio import base_events
from asyncio.log import logger

from ._arguments import NOT_GIVEN, check_ssl_socket, check_tls_arguments, shutdown_timeout_argument

__all__ = ["ConnectMethods"]


class ConnectMethods:
    """The loop's `create_connection` (a base of `Loop`)."""

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
        ssl_shutdown_timeout=NOT_GIVEN,
        happy_eyeballs_delay=None,
        interleave=None,
        all_errors=NOT_GIVEN,
    ):
        # 3.10's asyncio takes neither argument (and has no ExceptionGroup for
        # all_errors): passing either is the TypeError it raises.
        ssl_shutdown_timeout = shutdown_timeout_argument("create_connection", ssl_shutdown_timeout)
        all_errors = _all_errors_argument(all_errors)
        if server_hostname is None and ssl:
            if not host:
                raise ValueError("You must set server_hostname when using ssl without a host")
            server_hostname = host
        check_tls_arguments(ssl, server_hostname, ssl_handshake_timeout, ssl_shutdown_timeout)
        if sock is not None:
            check_ssl_socket(sock)
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


def _all_errors_argument(all_errors) -> bool:
    """create_connection's `all_errors` (False when not given): 3.11+, where
    ExceptionGroup exists (asyncio itself takes it from 3.12)."""
    if all_errors is NOT_GIVEN:
        return False
    if sys.version_info < (3, 11):
        raise TypeError("create_connection() got an unexpected keyword argument 'all_errors'")
    return all_errors
