"""Which `asyncio.AbstractEventLoop` methods a loop really implements.

A method is missing when the loop inherits `AbstractEventLoop`'s own (which raises
`NotImplementedError`) or, for the datagram `sock_*` calls that compiled loops define
only to raise, when calling it raises `NotImplementedError`.

    python -m tests.api_surface     # the README's method table
"""

from __future__ import annotations

import asyncio
import socket

PROBED = ("sock_sendto", "sock_recvfrom", "sock_recvfrom_into")


def public_methods() -> list[str]:
    return sorted(
        name
        for name, value in vars(asyncio.AbstractEventLoop).items()
        if callable(value) and not name.startswith("_")
    )


def _inherits_abstract(cls, name: str) -> bool:
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass is asyncio.AbstractEventLoop
    return True


def _probe(loop, name: str) -> bool:
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("127.0.0.1", 0))
    a.setblocking(False)
    b.setblocking(False)
    calls = {
        "sock_sendto": lambda: loop.sock_sendto(a, b"x", b.getsockname()),
        "sock_recvfrom": lambda: loop.sock_recvfrom(b, 10),
        "sock_recvfrom_into": lambda: loop.sock_recvfrom_into(b, bytearray(10)),
    }

    async def attempt():
        a.sendto(b"probe", b.getsockname())
        await asyncio.wait_for(calls[name](), 1)

    try:
        loop.run_until_complete(attempt())
        return True
    except NotImplementedError:
        return False
    finally:
        a.close()
        b.close()


def missing_methods(new_loop) -> list[str]:
    loop = new_loop()
    try:
        return [
            name
            for name in public_methods()
            if _inherits_abstract(type(loop), name) or (name in PROBED and not _probe(loop, name))
        ]
    finally:
        loop.close()


def loops() -> dict:
    import ferroloop

    found = {"asyncio": asyncio.new_event_loop}
    try:
        import uvloop
    except ImportError:
        pass
    else:
        found["uvloop"] = uvloop.new_event_loop
    found["ferroloop"] = ferroloop.new_event_loop
    return found


def main() -> None:
    factories = loops()
    missing = {name: set(missing_methods(f)) for name, f in factories.items()}
    names = list(factories)
    print("| method | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for method in public_methods():
        cells = ["no" if method in missing[n] else "yes" for n in names]
        print(f"| `{method}` | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
