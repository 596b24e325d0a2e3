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
        get_extra_info = _METHODS["get_extra_info"]

    class SSLProtocol(TlsState, sslproto.SSLProtocol):
        def __init__(self, *args, **kwargs):
            # asyncio's __init__ makes a zeroed buffer of `max_size` (256 KiB) for
            # `get_buffer`, per connection: about a tenth of a handshake's instructions,
            # and its pages faulted in. ferroloop's transport reads into the TLS
            # object's BIO without calling `get_buffer`; made empty, the buffer is grown
            # by `get_buffer` on first use, as asyncio's `get_buffer` grows it.
            self.max_size = 0
            try:
                super().__init__(*args, **kwargs)
            finally:
                del self.max_size

        def _get_app_transport(self):
            if self._app_transport is None:
                if self._app_transport_created:
                    raise RuntimeError("Creating _SSLProtocolTransport twice")
                self._app_transport = _SSLProtocolTransport(self._loop, self)
                self._app_transport_created = True
            return self._app_transport

else:
    SSLProtocol = sslproto.SSLProtocol
