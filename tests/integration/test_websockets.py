"""The websockets library, server and client, on asyncio and ferroloop."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("websockets")
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from websockets.exceptions import ConnectionClosedError


def test_websockets_echo_close_codes_and_ping(loop):
    async def handler(ws):
        async for message in ws:
            if message == "bye":
                await ws.close(code=4000, reason="asked to leave")
                return
            await ws.send(message)

    async def main():
        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                for i in range(1000):
                    message = f"text {i}" if i % 2 else bytes([i % 256]) * (i % 700 + 1)
                    await ws.send(message)
                    assert await ws.recv() == message
                latency = await (await ws.ping(b"are you there"))
                assert latency >= 0
                await ws.send("bye")
                with pytest.raises(ConnectionClosedError):  # 4000 is not a "normal" close
                    await ws.recv()
                assert ws.close_code == 4000
                assert ws.close_reason == "asked to leave"

    loop.run_until_complete(asyncio.wait_for(main(), 60))
