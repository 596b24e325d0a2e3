"""No `AbstractEventLoop` method is left unimplemented on ferroloop."""

from __future__ import annotations

import asyncio

import ferroloop

from tests.api_surface import missing_methods, public_methods


def test_the_probe_finds_nothing_missing_on_stock_asyncio():
    # The yardstick: if the probe flagged asyncio's own loop, it would be wrong.
    assert missing_methods(asyncio.new_event_loop) == []


def test_ferroloop_implements_every_abstract_event_loop_method():
    assert len(public_methods()) > 40
    assert missing_methods(ferroloop.new_event_loop) == []
