"""asyncio's `SSLProtocol` with its per-record path in Rust (`src/tls.rs`).

The subclasses keep every state transition of asyncio's classes (handshake, shutdown,
flow control) and replace the methods that run for every record with Rust versions of
the same steps. `TlsState`, first in the protocol's bases, keeps the attributes those
steps use as fields and defines the per-record methods. They follow `asyncio.sslproto`
of Python 3.11 to 3.13, whose per-record methods are the same; on other versions
asyncio's classes are used as they are.
"""

from __future__ import annotations

import sys
from asyncio import sslproto

from ._ferroloop import TlsState, ssl_protocol_methods

if sys.version_info >= (3, 11) and sys.version_info < (3, 14):
    _METHODS = ssl_protocol_methods()

    class _SSLProtocolTransport(sslproto._SSLProtocolTransport):
        write = _METHODS["write"]
        is_closing = _METHODS["is_closing"]

    class SSLProtocol(TlsState, sslproto.SSLProtocol):
        def _get_app_transport(self):
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLProtocolTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

else:
    SSLProtocol = sslproto.SSLProtocol
