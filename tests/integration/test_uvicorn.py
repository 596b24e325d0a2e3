"""uvicorn serving an ASGI app with the loop chosen by its --loop option:
`--loop ferroloop:new_event_loop` (a loop factory import string, uvicorn 0.36+)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
from websockets.asyncio.client import connect

from tests.integration.conftest import free_port

APP = textwrap.dedent(
    '''
    import asyncio

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "http":
            loop = type(asyncio.get_running_loop())
            body = f"{loop.__module__}.{loop.__qualname__} {scope['path']}".encode()
            await receive()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            assert (await receive())["type"] == "websocket.connect"
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                await send({"type": "websocket.send", "text": "echo " + message["text"]})
    '''
)

LOOP_OPTION = {"asyncio": "asyncio", "ferroloop": "ferroloop:new_event_loop"}


def test_uvicorn_http_and_websocket(loop_name, loop, tmp_path):
    (tmp_path / "asgi_app.py").write_text(APP)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1",
         "--port", str(port), "--loop", LOOP_OPTION[loop_name], "--ws", "websockets-sansio"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    async def main():
        async with httpx.AsyncClient() as client:
            for _ in range(600):  # up to 30 s for uvicorn to start on a slow machine
                try:
                    r = await client.get(f"http://127.0.0.1:{port}/ping")
                    break
                except httpx.ConnectError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("uvicorn did not start")
            expected = "ferroloop._loop.Loop" if loop_name == "ferroloop" else "asyncio.unix_events._UnixSelectorEventLoop"
            assert r.text == f"{expected} /ping"
            got = await asyncio.gather(*(client.get(f"http://127.0.0.1:{port}/p{i}") for i in range(100)))
            assert [g.text.split()[1] for g in got] == [f"/p{i}" for i in range(100)]
        async with connect(f"ws://127.0.0.1:{port}/ws") as ws:
            for i in range(100):
                await ws.send(f"m{i}")
                assert await ws.recv() == f"echo m{i}"

    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    # uvicorn re-raises the SIGTERM it handled once it has shut down gracefully.
    assert proc.returncode in (0, -15), out
    assert "Application shutdown complete" in out
