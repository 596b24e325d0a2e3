"""asyncio's `SSLProtocol` with its per-record path in Rust (`src/tls.rs`).

The subclasses keep every state transition of asyncio's classes (handshake, shutdown,
flow control) and replace the methods that run for every record with Rust versions of
the same steps. `TlsState`, first in the protocol's bases, keeps the attributes those
steps use as fields and defines the per-record methods. They follow `asyncio.sslproto`
of Python 3.11 to 3.13, whose per-record methods are the same; on other versions
asyncio's classes are used as they are.
"""

from __future__ import annotations

import collections
import sys
from asyncio import constants, protocols, sslproto

from ._ferroloop import TlsState, ssl_protocol_methods

if sys.version_info >= (3, 11) and sys.version_info < (3, 14):
    _METHODS = ssl_protocol_methods()

    class _SSLProtocolTransport(sslproto._SSLProtocolTransport):
        write = _METHODS["write"]
        is_closing = _METHODS["is_closing"]

    class SSLProtocol(TlsState, sslproto.SSLProtocol):
        # asyncio's __init__ (the same in 3.11 to 3.13) with its helper calls made
        # inline: `_set_app_protocol`, the two `_set_*_buffer_limits` with their
        # `add_flowcontrol_defaults`, `_get_app_transport` (eight Python calls of the
        # few dozen a connection makes). One step differs: asyncio makes a zeroed
        # buffer of `max_size` (256 KiB) for `get_buffer`, per connection, about a
        # tenth of a handshake's instructions and its pages faulted in. ferroloop's
        # transport reads into the TLS object's BIO without calling `get_buffer`; made
        # empty, the buffer is grown by `get_buffer` on first use, as asyncio's grows it.
        def __init__(
            self,
            loop,
            app_protocol,
            sslcontext,
            waiter,
            server_side=False,
            server_hostname=None,
            call_connection_made=True,
            ssl_handshake_timeout=None,
            ssl_shutdown_timeout=None,
        ):
            if sslproto.ssl is None:
                raise RuntimeError("stdlib ssl module not available")

            self._ssl_buffer = bytearray()
            self._ssl_buffer_view = memoryview(self._ssl_buffer)

            if ssl_handshake_timeout is None:
                ssl_handshake_timeout = constants.SSL_HANDSHAKE_TIMEOUT
            elif ssl_handshake_timeout <= 0:
                raise ValueError(
                    f"ssl_handshake_timeout should be a positive number, got {ssl_handshake_timeout}"
                )
            if ssl_shutdown_timeout is None:
                ssl_shutdown_timeout = constants.SSL_SHUTDOWN_TIMEOUT
            elif ssl_shutdown_timeout <= 0:
                raise ValueError(
                    f"ssl_shutdown_timeout should be a positive number, got {ssl_shutdown_timeout}"
                )

            if not sslcontext:
                sslcontext = sslproto._create_transport_context(server_side, server_hostname)

            self._server_side = server_side
            if server_hostname and not server_side:
                self._server_hostname = server_hostname
            else:
                self._server_hostname = None
            self._sslcontext = sslcontext
            self._extra = {"sslcontext": sslcontext}

            self._write_backlog = collections.deque()
            self._write_buffer_size = 0

            self._waiter = waiter
            self._loop = loop
            self._app_protocol = app_protocol
            if hasattr(app_protocol, "get_buffer") and isinstance(
                app_protocol, protocols.BufferedProtocol
            ):
                self._app_protocol_get_buffer = app_protocol.get_buffer
                self._app_protocol_buffer_updated = app_protocol.buffer_updated
                self._app_protocol_is_buffer = True
            else:
                self._app_protocol_is_buffer = False
            self._app_transport = None
            self._app_transport_created = False
            self._transport = None
            self._ssl_handshake_timeout = ssl_handshake_timeout
            self._ssl_shutdown_timeout = ssl_shutdown_timeout
            self._incoming = sslproto.ssl.MemoryBIO()
            self._outgoing = sslproto.ssl.MemoryBIO()
            self._state = sslproto.SSLProtocolState.UNWRAPPED
            self._conn_lost = 0
            if call_connection_made:
                self._app_state = sslproto.AppProtocolState.STATE_INIT
            else:
                self._app_state = sslproto.AppProtocolState.STATE_CON_MADE
            self._sslobj = self._sslcontext.wrap_bio(
                self._incoming,
                self._outgoing,
                server_side=self._server_side,
                server_hostname=self._server_hostname,
            )

            self._ssl_writing_paused = False
            self._app_reading_paused = False
            self._ssl_reading_paused = False
            # `add_flowcontrol_defaults(None, None, kib)`: its check fails only for a
            # negative constant, left to it for its error.
            kib = constants.FLOW_CONTROL_HIGH_WATER_SSL_READ
            if kib < 0:
                sslproto.add_flowcontrol_defaults(None, None, kib)
            self._incoming_high_water = kib * 1024
            self._incoming_low_water = kib * 1024 // 4
            self._eof_received = False
            self._app_writing_paused = False
            kib = constants.FLOW_CONTROL_HIGH_WATER_SSL_WRITE
            if kib < 0:
                sslproto.add_flowcontrol_defaults(None, None, kib)
            self._outgoing_high_water = kib * 1024
            self._outgoing_low_water = kib * 1024 // 4
            self._app_transport = _SSLProtocolTransport(self._loop, self)
            self._app_transport_created = True

        def _get_app_transport(self):
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLProtocolTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

else:
    SSLProtocol = sslproto.SSLProtocol
