"""The inspection socket (`python -m ferroloop --inspect PATH app.py`) and
`python -m ferroloop top`: real programs in subprocesses, a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest
from ferroloop._inspect import request

WAIT = 30

APP = """
import asyncio, sys, time

async def handle(reader, writer):
    while data := await reader.read(100):
        writer.write(data)
        await writer.drain()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    print(port, flush=True)
    loop = asyncio.get_running_loop()
    if len(sys.argv) > 1:  # stall the loop: one callback blocks for that long
        loop.call_later(1.0, time.sleep, float(sys.argv[1]))
    while True:
        writer.write(b"x" * 50)
        await reader.readexactly(50)
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


def wait_until(predicate, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def inspected(tmp_path):
    """Starts APP under `python -m ferroloop --inspect`; yields (socket path, port)."""
    procs = []

    def start(*args, path=None):
        script = tmp_path / "app.py"
        script.write_text(APP)
        path = path or str(tmp_path / "inspect.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferroloop", "--inspect", path, str(script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        procs.append(proc)
        port = int(proc.stdout.readline())
        wait_until(lambda: os.path.exists(path), "the inspection socket")
        return path, port

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(WAIT)
        proc.stdout.close()
        proc.stderr.close()


def test_snapshot_has_the_stats_and_the_connections(inspected):
    path, port = inspected()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    snapshot = wait_until(lambda: (s := request(path))["stats"]["bytes_read"] > 0 and s, "traffic")
    assert snapshot["stalled"] is False
    assert snapshot["stats"]["connections_accepted"] == 1
    ports = sorted(row["local"][1] for row in snapshot["connections"])
    assert port in ports and len(ports) == 2
    assert all(row["kind"] == "tcp" and row["reading"] for row in snapshot["connections"])


def test_garbage_gets_an_error_and_the_socket_keeps_serving(inspected):
    path, _ = inspected()
    for garbage in (b"\x00" * 100 + b"\n", b"GET / HTTP/1.1\r\n\r\n", b"snapshot please\n", b""):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(WAIT)
            sock.connect(path)
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: sock.recv(4096), b""))
        assert "error" in json.loads(reply)
    assert request(path)["stats"]["turns"] > 0


@pytest.mark.skipif(os.getuid() != 0, reason="switching to another user needs root")
def test_other_users_are_refused_even_when_the_file_mode_allows_them(inspected):
    # A directory every user can enter (pytest's tmp_path is under a 0700 one).
    directory = tempfile.mkdtemp(prefix="ferroloop-inspect-")
    os.chmod(directory, 0o755)
    path, _ = inspected(path=os.path.join(directory, "inspect.sock"))
    probe = (
        "import os, socket, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1])\n"
        "except PermissionError:\n"
        "    print('refused by the file mode'); sys.exit()\n"
        "try:\n"
        "    s.sendall(b'snapshot\\n')\n"
        "    data = s.recv(4096)\n"
        "except (BrokenPipeError, ConnectionResetError):\n"
        "    data = b''  # closed before the request was read\n"
        "print('answer', repr(data))\n"
    )

    def as_nobody():
        proc = subprocess.run([sys.executable, "-c", probe, path], capture_output=True,
                              text=True, timeout=WAIT, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    try:
        assert as_nobody() == "refused by the file mode"
        os.chmod(path, 0o666)
        assert as_nobody() == "answer b''"  # SO_PEERCRED: closed without a byte
        assert request(path)["stats"]["turns"] > 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_stalled_loop_is_reported_with_the_last_snapshot(inspected):
    path, _ = inspected("3")
    first = request(path)
    assert first["stalled"] is False
    stalled = wait_until(lambda: (s := request(path))["stalled"] and s, "the stall")
    assert stalled["last"]["stats"]["turns"] >= first["stats"]["turns"]
    wait_until(lambda: not request(path)["stalled"], "the recovery")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make servers)")
def test_top_renders_in_a_real_terminal(inspected, tmp_path):
    path, port = inspected()
    session = f"ferroloop-top-{os.getpid()}"
    command = f"{sys.executable} -m ferroloop top {path} --interval 0.3"
    env = {**os.environ, "TMUX": ""}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "30", command],
                   check=True, env=env, timeout=WAIT)
    try:
        def screen():
            out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                 capture_output=True, text=True, env=env, timeout=WAIT,
                                 check=False)
            return out.stdout.splitlines()

        # Rates appear from the second refresh on.
        lines = wait_until(lambda: (s := screen()) and any(l.startswith("turns/s ") and "-" not in l.split()[1] for l in s) and s,
                           "a screen with rates")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], env=env, timeout=WAIT, check=False)
    assert lines[0].startswith("ferroloop top - pid ")
    assert "CONNECTIONS (2)" in lines
    header = lines.index("CONNECTIONS (2)") + 1
    assert lines[header].split()[:4] == ["KIND", "FD", "LOCAL", "PEER"]
    rows = [l.split() for l in lines[header + 1 : header + 3]]
    assert {r[0] for r in rows} == {"tcp"}
    assert f"127.0.0.1:{port}" in {r[2] for r in rows} | {r[3] for r in rows}
    assert all(r[8] == "y" for r in rows)


def test_each_worker_serves_its_own_path_and_removes_it_on_a_graceful_stop(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio\n"
        "async def main():\n"
        "    server = await asyncio.start_server(lambda r, w: None, '127.0.0.1', 0)\n"
        "    async with server:\n"
        "        await server.serve_forever()\n"
        "asyncio.run(main())\n"
    )
    path = str(tmp_path / "inspect.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferroloop", "--inspect", path, "--workers", "2", str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        paths = [f"{path}.0", f"{path}.1"]
        wait_until(lambda: all(os.path.exists(p) for p in paths), "both workers' sockets")
        snapshots = [wait_until(lambda p=p: _answer(p), f"{p} to answer") for p in paths]
        assert [s["worker"] for s in snapshots] == ["0", "1"]
        assert snapshots[0]["pid"] != snapshots[1]["pid"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        assert not any(os.path.exists(p) for p in paths)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(WAIT)
        proc.stderr.close()


def _answer(path):
    try:
        return request(path)
    except OSError:
        return None
