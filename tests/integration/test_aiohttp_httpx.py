"""aiohttp (server and client) and httpx's AsyncClient, on asyncio and ferroloop."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

aiohttp = pytest.importorskip("aiohttp")
httpx = pytest.importorskip("httpx")
from aiohttp import web


def make_app() -> web.Application:
    async def hello(request):
        return web.json_response({"hello": request.match_info.get("name", "world")})

    async def echo_json(request):
        body = await request.json()
        return web.json_response({"got": body, "n": len(body["items"])})

    async def stream(request):
        response = web.StreamResponse()
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        for i in range(100):
            await response.write(bytes([i]) * 1000)
        await response.write_eof()
        return response

    async def upload(request):
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest()})

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/hello/{name}", hello)
    app.router.add_post("/json", echo_json)
    app.router.add_get("/stream", stream)
    app.router.add_post("/upload", upload)
    app.router.add_get("/ws", websocket)
    return app


async def start(app, ssl_context=None):
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, port


def test_aiohttp_server_and_client(loop):
    async def main():
        runner, port = await start(make_app())
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:

            async def hello(i):
                async with session.get(f"{base}/hello/n{i}") as r:
                    assert r.status == 200
                    return (await r.json())["hello"]

            names = await asyncio.gather(*(hello(i) for i in range(100)))
            assert names == [f"n{i}" for i in range(100)]

            payload = {"items": list(range(1000)), "text": "ünïcode"}
            async with session.post(f"{base}/json", json=payload) as r:
                assert await r.json() == {"got": payload, "n": 1000}

            async with session.get(f"{base}/stream") as r:
                body = await r.read()
            assert body == b"".join(bytes([i]) * 1000 for i in range(100))

            blob = bytes(range(256)) * (10 * 1024 * 1024 // 256)  # 10 MiB
            async with session.post(f"{base}/upload", data=blob) as r:
                result = await r.json()
            assert result == {"size": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}

            async with session.ws_connect(f"{base}/ws") as ws:
                for i in range(50):
                    await ws.send_str(f"m{i}")
                    assert (await ws.receive_str()) == f"echo:m{i}"
                await ws.send_bytes(b"abc")
                assert await ws.receive_bytes() == b"cba"
                await ws.close()
            assert ws.closed
        await runner.cleanup()

    loop.run_until_complete(asyncio.wait_for(main(), 120))


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_httpx_200_concurrent_requests(loop, tls, tls_contexts):
    server_ctx, client_ctx = tls_contexts

    async def main():
        runner, port = await start(make_app(), ssl_context=server_ctx if tls else None)
        scheme, host = ("https", "localhost") if tls else ("http", "127.0.0.1")
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(verify=client_ctx if tls else True, limits=limits) as client:

            async def one(i):
                r = await client.get(f"{scheme}://{host}:{port}/hello/h{i}")
                assert r.status_code == 200
                return r.json()["hello"]

            got = await asyncio.gather(*(one(i) for i in range(200)))
            assert got == [f"h{i}" for i in range(200)]
            r = await client.post(f"{scheme}://{host}:{port}/json", content=json.dumps({"items": [1, 2]}))
            assert r.json() == {"got": {"items": [1, 2]}, "n": 2}
        await runner.cleanup()

    loop.run_until_complete(asyncio.wait_for(main(), 120))
