"""`Server`: asyncio's server object, plus the client tracking of Python 3.13
(`close_clients`, `abort_clients`) on every Python version."""

from __future__ import annotations

import sys
from asyncio import base_events

__all__ = ["Server"]


class Server(base_events.Server):
    """`asyncio.Server` with `close_clients()` and `abort_clients()`. The connections
    are found in the loop's fd registry, which holds every live transport with the
    server that accepted it (ferroloop keeps no per-connection set of its own; 3.13's
base keeps its `_clients`)."""

    if sys.version_info < (3, 13):
        # ferroloop's transports pass themselves, as 3.13's do, to 3.13's methods,
        # inherited (no call in between: these run once per connection each). Before
        # 3.13 the base takes no transport; the default keeps a bare `_attach()` (as
        # CPython's own tests call it) working.

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
