"""The programs in examples/ run unchanged on ferroloop (through `python -m ferroloop`)
and on stock asyncio (plain `python`), and do what they say."""

from __future__ import annotations

import functools
import http.server
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
RUNNERS = {
    "asyncio": [sys.executable],
    "ferroloop": [sys.executable, "-m", "ferroloop"],
}


@pytest.fixture(params=sorted(RUNNERS))
def runner(request):
    return RUNNERS[request.param]


class Server:
    """An example server in a subprocess, on a free port, stopped with Ctrl-C."""

    def __init__(self, runner, name):
        self.proc = subprocess.Popen(
            [*runner, str(EXAMPLES / name), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("serving on "), line + self.proc.stderr.read()
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self):
        self.proc.send_signal(signal.SIGINT)
        _out, err = self.proc.communicate(timeout=20)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return self.proc.returncode, err


def _run(runner, name, *args):
    return subprocess.run(
        [*runner, str(EXAMPLES / name), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("server_name", ["echo_server.py", "echo_server_protocol.py"])
def test_echo_server_and_client(runner, server_name):
    server = Server(runner, server_name)
    try:
        client = _run(runner, "echo_client.py", "127.0.0.1", str(server.port), "hello", "wörld")
        assert client.returncode == 0, client.stderr
        assert client.stdout.splitlines() == ["echoed: hello", "echoed: wörld"]
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw:
            payload = bytes(range(256)) * 1000
            raw.sendall(payload)
            raw.shutdown(socket.SHUT_WR)
            got = b""
            while len(got) < len(payload) and (chunk := raw.recv(65536)):
                got += chunk
            assert got == payload
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_chat_server_broadcasts_lines(runner):
    server = Server(runner, "chat_server.py")
    try:
        alice = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        bob = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        alice_in, bob_in = alice.makefile("rb"), bob.makefile("rb")
        alice.sendall(b"alice\n")
        assert alice_in.readline() == b"welcome, alice\n"
        bob.sendall(b"bob\n")
        assert bob_in.readline() == b"welcome, bob\n"
        assert alice_in.readline() == b"* bob joined\n"
        bob.sendall(b"hi alice\n")
        assert alice_in.readline() == b"bob: hi alice\n"
        alice.sendall(b"hi bob\n")
        assert bob_in.readline() == b"alice: hi bob\n"
        bob_in.close()  # the file object shares the socket: close both to disconnect
        bob.close()
        assert alice_in.readline() == b"* bob left\n"
        alice_in.close()
        alice.close()
    finally:
        code, err = server.stop()
    assert code == 0, err


def test_http_get_fetches_a_page(runner, tmp_path):
    (tmp_path / "page.txt").write_text("served over HTTP/1.0\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/page.txt"
        result = _run(runner, "http_get.py", url)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("HTTP/1.0 200")
        assert lines[-1] == "served over HTTP/1.0"
        missing = _run(runner, "http_get.py", url + ".missing")
        assert missing.stdout.splitlines()[0].startswith("HTTP/1.0 404")
    finally:
        httpd.shutdown()
        httpd.server_close()
