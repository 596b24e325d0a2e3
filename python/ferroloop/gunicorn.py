"""gunicorn worker classes that run their event loop on ferroloop.

    gunicorn app:app -k ferroloop.gunicorn.UvicornWorker -w 4    # ASGI, needs uvicorn-worker
    gunicorn app:make_app -k ferroloop.gunicorn.AiohttpWorker    # aiohttp.web, needs aiohttp

gunicorn forks its workers before any loop runs, then each worker makes its own loop:
these classes only choose that loop. The classes are made on first access, so this
module imports neither uvicorn-worker nor aiohttp until gunicorn asks for one of them.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

__all__ = ["AiohttpWorker", "UvicornWorker"]  # noqa: F822 - made by __getattr__

_made: dict[str, type] = {}


def _uvicorn_worker() -> type:
    from uvicorn_worker import UvicornWorker as Base

    class UvicornWorker(Base):
        """uvicorn-worker's `UvicornWorker`, with ferroloop as uvicorn's loop."""

        CONFIG_KWARGS: ClassVar[dict[str, Any]] = {**Base.CONFIG_KWARGS, "loop": "ferroloop:new_event_loop"}

    return UvicornWorker


def _aiohttp_worker() -> type:
    from aiohttp.worker import GunicornWebWorker
    from gunicorn.workers.base import Worker

    import ferroloop

    class AiohttpWorker(GunicornWebWorker):
        """aiohttp's `GunicornWebWorker`, on a ferroloop loop."""

        def init_process(self) -> None:
            # GunicornWebWorker.init_process with ferroloop's loop in place of
            # asyncio.new_event_loop(); gunicorn's own init_process then runs the worker.
            self.loop = ferroloop.new_event_loop()
            asyncio.set_event_loop(self.loop)
            Worker.init_process(self)

    return AiohttpWorker


_FACTORIES = {"UvicornWorker": _uvicorn_worker, "AiohttpWorker": _aiohttp_worker}


def __getattr__(name: str) -> Any:
    factory = _FACTORIES.get(name)
    if factory is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _made:
        cls = factory()
        cls.__module__ = __name__
        cls.__qualname__ = name
        _made[name] = cls
    return _made[name]
