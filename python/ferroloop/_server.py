"""`Server`: asyncio's server object, plus the client tracking of Python 3.13
(`close_clients`, `abort_clients`) on every Python version."""

from __future__ import annotations

import inspect
from asyncio import base_events

__all__ = ["Server"]

# 3.12 passes the transport to `_attach`/`_detach`; 3.11 does not.
_BASE_TAKES_TRANSPORT = len(inspect.signature(base_events.Server._attach).parameters) > 1


class Server(base_events.Server):
    """`asyncio.Server` with `close_clients()` and `abort_clients()`."""

    def _clients_set(self) -> set:
        # A plain set, not asyncio 3.13's WeakSet: every transport leaves it in
        # `_detach` when its connection is lost, and an idle connection then costs the
        # set's slot instead of a weak reference and its callback.
        clients = self.__dict__.get("_ferroloop_clients")
        if clients is None:
            clients = self.__dict__["_ferroloop_clients"] = set()
        return clients

    def _attach(self, transport=None) -> None:
        if _BASE_TAKES_TRANSPORT:
            super()._attach(transport)
        else:
            super()._attach()
        if transport is not None:
            self._clients_set().add(transport)

    def _detach(self, transport=None) -> None:
        if transport is not None:
            self._clients_set().discard(transport)
        if _BASE_TAKES_TRANSPORT:
            super()._detach(transport)
        else:
            super()._detach()

    def close_clients(self) -> None:
        """Closes every connection this server accepted (they flush first)."""
        for transport in list(self._clients_set()):
            transport.close()

    def abort_clients(self) -> None:
        """Aborts every connection this server accepted, dropping unsent data."""
        for transport in list(self._clients_set()):
            transport.abort()
