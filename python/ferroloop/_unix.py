"""Unix stream sockets: `create_unix_connection` and `create_unix_server`. A server's
path is bound after removing a stale socket file left there, and its file is removed
when it stops serving (with cleanup_socket, the default from Python 3.13).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
from asyncio.log import logger

from . import _workers
from ._arguments import (
    HAS_SSL_SHUTDOWN_TIMEOUT,
    NOT_GIVEN,
    check_tls_arguments,
    shutdown_timeout_argument,
)
from ._ferroloop import stat_path, unlink_path
from ._server import Server

__all__ = ["UnixMethods", "unlink_if_same"]


# A Unix server removes its socket file when it closes from Python 3.13 on (asyncio's
# cleanup_socket, default True); before 3.13 asyncio leaves the file, and so does
# ferroloop unless cleanup_socket=True is passed.
_CLEANUP_SOCKET_DEFAULT = sys.version_info >= (3, 13)


class UnixMethods:
    """The loop's Unix socket methods (a base of `Loop`)."""

    async def create_unix_connection(
        self,
        protocol_factory,
        path=None,
        *,
        ssl=None,
        sock=None,
        server_hostname=None,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=NOT_GIVEN,
    ):
        ssl_shutdown_timeout = shutdown_timeout_argument("create_unix_connection", ssl_shutdown_timeout)
        check_tls_arguments(ssl, server_hostname, ssl_handshake_timeout, ssl_shutdown_timeout)
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
        if HAS_SSL_SHUTDOWN_TIMEOUT:
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
        ssl_shutdown_timeout=NOT_GIVEN,
        start_serving=True,
        cleanup_socket=_CLEANUP_SOCKET_DEFAULT,
    ):
        ssl_shutdown_timeout = shutdown_timeout_argument("create_unix_server", ssl_shutdown_timeout)
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
        if HAS_SSL_SHUTDOWN_TIMEOUT:
            timeouts.append(ssl_shutdown_timeout)
        server = Server(self, [sock], protocol_factory, ssl, backlog, *timeouts)
        if start_serving:
            server._start_serving()
            await asyncio.sleep(0)
        return server


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


def unlink_if_same(path: str, inode: int) -> None:
    """Removes the socket file of a closed server unless something replaced it."""
    try:
        if stat_path(path)[1] == inode:
            unlink_path(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)
