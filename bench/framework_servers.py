"""The servers of the framework workloads, one per run, on the loop named:

    python bench/framework_servers.py LOOP KIND

KIND: uvicorn (uvicorn with httptools and a raw ASGI app) | starlette (uvicorn with
httptools and a Starlette route returning JSON) | aiohttp (aiohttp.web) | websockets
(a websockets echo server) | uvicorn-tls (the uvicorn server over HTTPS, given its
certificate and key files as `--ssl-certfile`/`--ssl-keyfile` give them) | aiohttp-tls
(the aiohttp server with an `ssl_context`); the TLS servers use the certificate
bench/_tls.py gives them. Each listens on 127.0.0.1, prints its port, and serves as
its users deploy it (access logs off, as in production) until SIGTERM. What each answers
is in FRAMEWORKS, which bench/echo.py hands to the load generator to check.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from _loops import new_loop
from _tls import server_context, server_files

TEXT = b"Hello, world!"
JSON = b'{"hello":"world"}'
# kind -> (load generator mode, request path, exact response body)
FRAMEWORKS = {
    "uvicorn": ("http-any", "/", TEXT),
    "starlette": ("http-any", "/json", JSON),
    "aiohttp": ("http-any", "/", TEXT),
    "websockets": ("ws", None, None),
    "uvicorn-tls": ("http-any", "/", TEXT),
    "aiohttp-tls": ("http-any", "/", TEXT),
}


async def raw_asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(TEXT))],
        }
    )
    await send({"type": "http.response.body", "body": TEXT})


def starlette_app():
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request):
        return JSONResponse({"hello": "world"})

    return Starlette(routes=[Route("/json", hello)])


def listener() -> socket.socket:
    # IPPROTO_TCP, as getaddrinfo gives it to a server that binds by host and port:
    # asyncio sets TCP_NODELAY on accepted connections only when the protocol says TCP,
    # and without it a response written in two parts waits for the delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_uvicorn(app, sock, stop: asyncio.Future, ready: asyncio.Future, tls=False) -> None:
    import uvicorn

    # uvicorn builds its SSLContext from the files, as its command line's options do.
    certfile, keyfile = server_files() if tls else (None, None)
    config = uvicorn.Config(
        app, http="httptools", lifespan="off", access_log=False, log_level="warning", loop="none",
        ssl_certfile=certfile, ssl_keyfile=keyfile,
    )
    server = uvicorn.Server(config)
    # uvicorn installs its own SIGTERM handling while it serves; stopping is ours.
    server.install_signal_handlers = lambda: None
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    # uvicorn says it listens only through this flag; a server that fails first (rloop
    # has no TLS) ends `serving` with its error.
    while not server.started:
        if serving.done():
            serving.result()
            return
        await asyncio.sleep(0.01)
    ready.set_result(None)
    await stop
    server.should_exit = True
    await serving


async def serve_aiohttp(sock, stop: asyncio.Future, ready: asyncio.Future, tls=False) -> None:
    from aiohttp import web

    async def hello(request):
        return web.Response(body=TEXT, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=1024, ssl_context=server_context() if tls else None)
    await site.start()
    ready.set_result(None)
    await stop
    await runner.cleanup()


async def serve_websockets(sock, stop: asyncio.Future, ready: asyncio.Future) -> None:
    from websockets.asyncio.server import serve

    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    # No keepalive pings (they would interleave with the echoed frames the load
    # generator checks) and no compression (the client does not offer it).
    async with serve(echo, sock=sock, ping_interval=None, compression=None, max_size=None):
        ready.set_result(None)
        await stop


async def main(kind: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    # uvicorn raises the SIGTERM it captured again once it has stopped: the second is
    # no news.
    loop.add_signal_handler(signal.SIGTERM, lambda: stop.done() or stop.set_result(None))
    ready = loop.create_future()
    sock = listener()
    port = sock.getsockname()[1]
    tls = kind.endswith("-tls")
    if kind in ("uvicorn", "uvicorn-tls"):
        serving = serve_uvicorn(raw_asgi, sock, stop, ready, tls)
    elif kind == "starlette":
        serving = serve_uvicorn(starlette_app(), sock, stop, ready)
    elif kind in ("aiohttp", "aiohttp-tls"):
        serving = serve_aiohttp(sock, stop, ready, tls)
    else:
        serving = serve_websockets(sock, stop, ready)
    task = loop.create_task(serving)
    # The port is announced once the server listens; a server that cannot start exits
    # with its error instead (the harness reports its last line).
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if not ready.done():
        task.result()
        raise RuntimeError(f"the {kind} server stopped before it listened")
    print(port, flush=True)
    await task


if __name__ == "__main__":
    loop_name, kind = sys.argv[1], sys.argv[2]
    if kind not in FRAMEWORKS:
        sys.exit(f"unknown framework workload {kind}; one of {', '.join(FRAMEWORKS)}")
    logging.basicConfig(level=logging.WARNING)
    loop = new_loop(loop_name)
    try:
        loop.run_until_complete(main(kind))
    finally:
        loop.close()
