"""No `AbstractEventLoop` method is left unimplemented on ferroloop."""

from __future__ import annotations

import asyncio
import inspect

import ferroloop
from ferroloop._ferroloop import LoopCore

from tests.api_surface import missing_methods, public_methods


def test_the_probe_finds_nothing_missing_on_stock_asyncio():
    # The yardstick: if the probe flagged asyncio's own loop, it would be wrong.
    assert missing_methods(asyncio.new_event_loop) == []


def test_ferroloop_implements_every_abstract_event_loop_method():
    assert len(public_methods()) > 40
    assert missing_methods(ferroloop.new_event_loop) == []


def test_every_method_of_loops_python_bases_is_the_one_loop_uses():
    # `Loop` is LoopCore, then one base class per concern (_signals, _unix...), then
    # BaseEventLoop. A name two of those bases define, or one that LoopCore defines
    # too, would silently resolve to the earlier one.
    bases = [
        cls
        for cls in ferroloop.Loop.__mro__[1:]
        if cls.__module__.startswith("ferroloop.") and cls is not LoopCore
    ]
    assert len(bases) > 5
    for base in bases:
        for name, attr in vars(base).items():
            if not name.startswith("__"):
                assert inspect.getattr_static(ferroloop.Loop, name) is attr, f"{base.__name__}.{name}"
