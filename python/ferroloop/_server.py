"""`Server`: asyncio's server object, plus the client tracking of Python 3.13
(`close_clients`, `abort_clients`) on every Python version."""

from __future__ import annotations

import inspect
from asyncio import base_events

__all__ = ["Server"]

# 3.13 passes the transport to `_attach`/`_detach`; 3.10-3.12 do not.
_BASE_TAKES_TRANSPORT = len(inspect.signature(base_events.Server._attach).parameters) > 1


class Server(base_events.Server):
    """`asyncio.Server` with `close_clients()` and `abort_clients()`. The connections
    are found in the loop's fd registry, which holds every live transport with the
    server that accepted it (ferroloop keeps no per-connection set of its own; 3.13's
base keeps its `_clients`)."""

    if not _BASE_TAKES_TRANSPORT:
        # ferroloop's transports pass themselves, as 3.13's do; 3.13's methods are
        # inherited (no call in between: these run once per connection each). Same
        # signature on every version, for the stub checker.

        def _attach(self, transport) -> None:
            super()._attach()

        def _detach(self, transport) -> None:
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
