"""The argument checks and version gates shared by the methods that make connections
and servers (create_connection, create_server, the Unix variants, the TLS transport)."""

from __future__ import annotations

from asyncio import constants

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without ssl
    ssl = None

__all__ = [
    "HAS_SSL_SHUTDOWN_TIMEOUT",
    "NOT_GIVEN",
    "check_ssl_socket",
    "check_tls_arguments",
    "shutdown_timeout_argument",
]

# 3.11's new sslproto added the TLS shutdown timeout (`ssl_shutdown_timeout=` of
# create_connection, create_server, start_tls and the Unix variants); 3.10's sslproto
# has none, and its loop methods do not take the argument.
HAS_SSL_SHUTDOWN_TIMEOUT = hasattr(constants, "SSL_SHUTDOWN_TIMEOUT")


# An argument the caller did not pass (where passing even None means something).
NOT_GIVEN = object()


def check_ssl_socket(sock) -> None:
    if ssl is not None and isinstance(sock, ssl.SSLSocket):
        raise TypeError("Socket cannot be of type SSLSocket")


def check_tls_arguments(ssl, server_hostname, handshake_timeout, shutdown_timeout) -> None:
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


def shutdown_timeout_argument(method: str, shutdown_timeout):
    """The `ssl_shutdown_timeout` `method` was given (None when not given). Before
    3.11 asyncio's TLS has no shutdown timeout and its loop methods take no such
    argument: passing it at all, None included, is the TypeError stock asyncio raises."""
    if shutdown_timeout is NOT_GIVEN:
        return None
    if not HAS_SSL_SHUTDOWN_TIMEOUT:
        raise TypeError(f"{method}() got an unexpected keyword argument 'ssl_shutdown_timeout'")
    return shutdown_timeout
