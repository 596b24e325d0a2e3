"""Name resolution: `getaddrinfo` and `getnameinfo` run in the default executor, as
asyncio's do, except for numeric addresses, which resolve at once without a thread hop.
"""

from __future__ import annotations

import socket

__all__ = ["DnsMethods"]


def _is_numeric_host(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        try:
            host = host.decode("idna")
        except UnicodeError:
            return False
    if not isinstance(host, str):
        return False
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host.partition("%")[0])
            return True
        except (OSError, ValueError):
            continue
    return False


def _is_numeric_port(port) -> bool:
    if port is None or isinstance(port, int):
        return True
    if isinstance(port, (str, bytes)):
        return port.isdigit()
    return False


class DnsMethods:
    """The loop's name resolution (a base of `Loop`)."""

    async def getaddrinfo(self, host, port, *, family=0, type=0, proto=0, flags=0):
        if _is_numeric_host(host) and _is_numeric_port(port):
            # Numeric addresses resolve without DNS: no thread hop needed.
            return socket.getaddrinfo(host, port, family, type, proto, flags)
        resolve = self._getaddrinfo_debug if self._debug else socket.getaddrinfo
        return await self.run_in_executor(None, resolve, host, port, family, type, proto, flags)

    async def getnameinfo(self, sockaddr, flags=0):
        numeric = socket.NI_NUMERICHOST | socket.NI_NUMERICSERV
        if flags & numeric == numeric:
            return socket.getnameinfo(sockaddr, flags)
        return await self.run_in_executor(None, socket.getnameinfo, sockaddr, flags)
