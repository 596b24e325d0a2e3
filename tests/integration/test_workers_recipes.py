"""The README's recipes for running ferroloop in several processes, each exercised:
uvicorn's own --workers, gunicorn with ferroloop.gunicorn's worker classes, and
frameworks under ferroloop's own supervisor (`python -m ferroloop --workers 2`).

Every server answers with its loop's class and its pid; a test passes when requests
are served by ferroloop loops (and, under ferroloop's supervisor, by both workers)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("aiohttp")

from tests.integration.conftest import free_port

ASGI_APP = """
import asyncio, os

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    loop = type(asyncio.get_running_loop())
    body = f"{loop.__module__}.{loop.__qualname__} {os.getpid()}".encode()
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
"""

AIOHTTP_APP = """
import asyncio, os, sys
from aiohttp import web

async def answer(request):
    loop = type(asyncio.get_running_loop())
    return web.Response(text=f"{loop.__module__}.{loop.__qualname__} {os.getpid()}")

def make_app():
    app = web.Application()
    app.router.add_get("/", answer)
    return app

async def gunicorn_app():
    return make_app()

if __name__ == "__main__":
    web.run_app(make_app(), host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

FERROLOOP = "ferroloop._loop.Loop"


def get(port: int) -> tuple[str, int] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            loop, pid = r.read().decode().split()
            return loop, int(pid)
    except OSError:
        return None


def serve_and_ask(tmp_path, argv, port: int, want_pids: int, stopped=(0,)) -> set[str]:
    """Starts `argv`, asks until `want_pids` processes answered (or 300 requests),
    stops it with SIGTERM; returns the loop classes that answered."""
    (tmp_path / "asgi_app.py").write_text(textwrap.dedent(ASGI_APP))
    (tmp_path / "aiohttp_app.py").write_text(textwrap.dedent(AIOHTTP_APP))
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while (first := get(port)) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start:\n" + log.read_text()
            time.sleep(0.1)
        answers = [first]
        while len({pid for _, pid in answers}) < want_pids and len(answers) < 300:
            answer = get(port)
            if answer is not None:
                answers.append(answer)
            time.sleep(0.01)
        pids = {pid for _, pid in answers}
        assert len(pids) >= want_pids, answers
        proc.send_signal(signal.SIGTERM)
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert returncode in stopped, log.read_text()
    assert "Traceback" not in log.read_text()
    assert not any(_alive(pid) for pid in pids)
    return {loop for loop, _ in answers}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def test_uvicorn_workers_with_ferroloop_loop(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", "asgi_app:app", "--host", "127.0.0.1",
            "--port", str(port), "--workers", "2", "--loop", "ferroloop:new_event_loop"]
    # uvicorn's supervisor re-raises the SIGTERM it handled once it has stopped.
    stopped = (0, -signal.SIGTERM)
    assert serve_and_ask(tmp_path, argv, port, want_pids=1, stopped=stopped) == {FERROLOOP}


def test_gunicorn_with_ferroloop_uvicorn_worker(tmp_path):
    pytest.importorskip("gunicorn")
    pytest.importorskip("uvicorn_worker")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "asgi_app:app", "-b", f"127.0.0.1:{port}",
            "-w", "2", "-k", "ferroloop.gunicorn.UvicornWorker"]
    assert serve_and_ask(tmp_path, argv, port, want_pids=1) == {FERROLOOP}


def test_gunicorn_with_ferroloop_aiohttp_worker(tmp_path):
    pytest.importorskip("gunicorn")
    port = free_port()
    argv = [sys.executable, "-m", "gunicorn", "aiohttp_app:gunicorn_app", "-b",
            f"127.0.0.1:{port}", "-w", "2", "-k", "ferroloop.gunicorn.AiohttpWorker"]
    assert serve_and_ask(tmp_path, argv, port, want_pids=1) == {FERROLOOP}


def test_uvicorn_under_ferroloop_workers(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "ferroloop", "--workers", "2", "-m", "uvicorn",
            "asgi_app:app", "--host", "127.0.0.1", "--port", str(port),
            "--loop", "ferroloop:new_event_loop"]
    assert serve_and_ask(tmp_path, argv, port, want_pids=2) == {FERROLOOP}


def test_aiohttp_run_app_under_ferroloop_workers(tmp_path):
    port = free_port()
    argv = [sys.executable, "-m", "ferroloop", "--workers", "2", "aiohttp_app.py", str(port)]
    assert serve_and_ask(tmp_path, argv, port, want_pids=2) == {FERROLOOP}
