"""Serving: `create_server` (asyncio's, making ferroloop's `Server`) and accepting. A
listening socket's reader accepts a bounded batch of connections per readiness event
and makes each one's transport, plain or TLS.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from asyncio import constants, trsock

from . import _workers
from ._server import Server
from ._unix import unlink_if_same

__all__ = ["ServeMethods"]


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
            self._connections_accepted += 1
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
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            conn.close()
            # Reported in debug mode only, as asyncio's _accept_connection2 does.
            if self._debug:
                self.call_exception_handler(
                    {"message": "Error on transport creation for incoming connection",
                     "exception": exc}
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
        except BaseException as exc:  # noqa: BLE001 - the server goes on
            # A failed handshake is reported in debug mode only, as in asyncio.
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
