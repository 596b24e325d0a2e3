"""Serving: `create_server` (asyncio's, making ferroloop's `Server`) and accepting. A
listening socket's reader accepts a bounded batch of connections per readiness event
and makes each one's transport, plain or TLS.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import os
import socket
from asyncio import base_events, constants, trsock

from . import _workers
from ._ferroloop import accept_connections
from ._server import Server
from ._unix import unlink_if_same

__all__ = ["ServeMethods"]

# The families whose addresses `accept_connections` makes as the socket module does.
_NATIVE_FAMILIES = frozenset({socket.AF_INET, socket.AF_INET6, socket.AF_UNIX})

# A socket's family, type and protocol as plain ints: `socket.socket`'s properties make
# an enum member each, a cost per batch of connections (per connection, when they come
# one at a time).
_family_of = _socket.socket.family.__get__
_type_of = _socket.socket.type.__get__
_proto_of = _socket.socket.proto.__get__

# accept() failures that leave the connections queued: asyncio retries after a delay.
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ServeMethods:
    """The loop's serving and accepting (a base of `Loop`)."""

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
            unlink_if_same(*unix_path)

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
        if isinstance(sock, _socket.socket):
            family, kind, proto = _family_of(sock), _type_of(sock), _proto_of(sock)
        else:
            # A socket-like object (gunicorn's listeners wrap theirs): its attributes.
            family, kind, proto = sock.family, sock.type, sock.proto
        if family not in _NATIVE_FAMILIES:
            self._accept_python(
                protocol_factory,
                sock,
                sslcontext,
                server,
                backlog,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            )
            return
        # TCP_NODELAY exactly when asyncio's `_set_nodelay` would set it.
        nodelay = (
            family != socket.AF_UNIX
            and kind == socket.SOCK_STREAM
            and proto == socket.IPPROTO_TCP
        )
        accepted, exc = accept_connections(sock.fileno(), backlog, nodelay)
        self._connections_accepted += len(accepted)
        handed_over = 0
        try:
            for fd, addr in accepted:
                handed_over += 1
                if fd < 0:
                    # Closed: its TCP_NODELAY could not be set (`addr` is the OSError).
                    self._report_accept_error(addr)
                    continue
                self._serve_accepted(
                    protocol_factory,
                    fd,
                    addr,
                    (family, kind, proto),
                    sslcontext,
                    server,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
        except BaseException:
            # Each fd has one owner: those not handed over yet are closed here.
            for fd, _ in accepted[handed_over:]:
                if fd >= 0:
                    os.close(fd)
            raise
        if exc is not None:
            self._accept_failed(
                exc,
                protocol_factory,
                sock,
                sslcontext,
                server,
                backlog,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            )

    def _accept_python(
        self,
        protocol_factory,
        sock,
        sslcontext,
        server,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout,
    ):
        """Accepting through the socket object, for a family `accept_connections` does
        not know (its addresses are the socket module's to format)."""
        for _ in range(backlog):
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._accept_failed(
                    exc,
                    protocol_factory,
                    sock,
                    sslcontext,
                    server,
                    backlog,
                    ssl_handshake_timeout,
                    ssl_shutdown_timeout,
                )
                return
            self._connections_accepted += 1
            try:
                conn.setblocking(False)
                base_events._set_nodelay(conn)
            except OSError as exc:
                conn.close()
                self._report_accept_error(exc)
                continue
            shape = (conn.family, conn.type, conn.proto)
            self._serve_accepted(
                protocol_factory,
                conn.detach(),
                addr,
                shape,
                sslcontext,
                server,
                ssl_handshake_timeout,
                ssl_shutdown_timeout,
            )

    def _accept_failed(
        self,
        exc,
        protocol_factory,
        sock,
        sslcontext,
        server,
        backlog,
        ssl_handshake_timeout,
        ssl_shutdown_timeout,
    ):
        if not isinstance(exc, OSError) or exc.errno not in _OUT_OF_RESOURCES:
            raise exc
        # Out of fds or memory: the pending connections stay queued in the kernel. Stop
        # polling the socket (it would stay readable and spin the loop) and try again
        # after a delay, as asyncio does.
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

    def _accept_plain(self, protocol_factory, fd, peername, shape, server):
        """Makes the transport of an accepted connection, which takes `fd` over (it
        closes it if it fails); if the protocol cannot be made, `fd` is closed here.
        `shape`: the socket's (family, type, proto)."""
        try:
            protocol = protocol_factory()
        except (SystemExit, KeyboardInterrupt):
            os.close(fd)
            raise
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            os.close(fd)
            self._report_accept_error(exc)
            return
        try:
            self._make_socket_transport(
                None, protocol, server=server, peername=peername, fd=fd, shape=shape
            )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            self._report_accept_error(exc)

    def _report_accept_error(self, exc, protocol=None, transport=None):
        # Reported in debug mode only, as asyncio's _accept_connection2 does.
        if not self._debug:
            return
        context = {
            "message": "Error on transport creation for incoming connection",
            "exception": exc,
        }
        if protocol is not None:
            context["protocol"] = protocol
        if transport is not None:
            context["transport"] = transport
        self.call_exception_handler(context)

    def _serve_accepted(
        self, protocol_factory, fd, peername, shape, sslcontext, server, handshake_timeout,
        shutdown_timeout,
    ):
        """Hands an accepted connection's `fd` (owned from here on) to its transport.
        `shape`: its (family, type, proto). A TLS connection is asyncio's
        `_accept_connection2` without its task: the transports are made here, and what
        follows `await waiter` there is `_tls_handshake_done`, the waiter's done
        callback; `fd` is closed here until the socket transport takes it over."""
        if not sslcontext:
            self._accept_plain(protocol_factory, fd, peername, shape, server)
            return
        protocol = None
        try:
            protocol = protocol_factory()
            waiter = self.create_future()
            ssl_protocol = self._new_ssl_protocol(
                protocol, sslcontext, waiter, True, None, handshake_timeout, shutdown_timeout
            )
        except (SystemExit, KeyboardInterrupt):
            os.close(fd)
            raise
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            os.close(fd)
            self._report_accept_error(exc, protocol)
            return
        try:
            raw = self._make_socket_transport(
                None, ssl_protocol, server=server, peername=peername, fd=fd, shape=shape
            )
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            self._report_accept_error(exc, protocol)
            return
        self._tls_handshakes[waiter] = (protocol, ssl_protocol._app_transport, raw)
        waiter.add_done_callback(self._tls_handshake_done)

    def _tls_handshake_done(self, waiter):
        """The end of an accepted connection's handshake: on failure (or a cancelled
        waiter, as asyncio's cancelled task would meet it) the transport is closed and
        the error reported in debug mode."""
        entry = self._tls_handshakes.pop(waiter, None)
        if entry is None:
            return  # closed with the loop (`_close_tls_handshakes`)
        try:
            exc = waiter.exception()
        except asyncio.CancelledError as cancelled:
            exc = cancelled
        if exc is None:
            return
        protocol, transport, _ = entry
        transport.close()
        self._report_accept_error(exc, protocol, transport)

    def _close_tls_handshakes(self):
        """At the loop's close, the accepted connections whose handshake has not ended
        for `_tls_handshake_done` are closed and their fds released. asyncio has a task
        per such connection, which `asyncio.run` cancels before closing the loop: the
        task meets a `CancelledError` at `await waiter` (whatever the waiter holds),
        closes the transport and reports the error in debug mode. The same is done
        here, and the connection loss the loop will no longer run is run now."""
        handshakes, self._tls_handshakes = self._tls_handshakes, {}
        for waiter, (protocol, transport, raw) in handshakes.items():
            waiter.cancel()
            transport.close()
            self._report_accept_error(asyncio.CancelledError(), protocol, transport)
            raw._call_connection_lost(None)
