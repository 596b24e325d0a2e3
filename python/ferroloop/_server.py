"""`Server`: asyncio's server object, plus the client tracking of Python 3.13
(`close_clients`, `abort_clients`) on every Python version."""

from __future__ import annotations

import inspect
from asyncio import base_events

__all__ = ["Server"]

# 3.12 passes the transport to `_attach`/`_detach`; 3.11 does not.
_BASE_TAKES_TRANSPORT = len(inspect.signature(base_events.Server._attach).parameters) > 1


class Server(base_events.Server):
    """`asyncio.Server` with `close_clients()` and `abort_clients()`. The connections
    are found in the loop's fd registry, which holds every live transport with the
    server that accepted it; no per-connection set is kept."""

    if not _BASE_TAKES_TRANSPORT:
        # The transports pass themselves, as 3.12's do; 3.12's methods are inherited.

        def _attach(self, transport=None) -> None:
            super()._attach()

        def _detach(self, transport=None) -> None:
            super()._detach()

    def _accepted_transports(self) -> list:
        return self._loop._server_transports(self)

    def close_clients(self) -> None:
        """Closes every connection this server accepted (they flush first)."""
        for transport in self._accepted_transports():
            transport.close()

    def abort_clients(self) -> None:
        """Aborts every connection this server accepted, dropping unsent data."""
        for transport in self._accepted_transports():
            transport.abort()
