"""The inspection socket (`python -m ferroloop --inspect PATH app.py`) and
`python -m ferroloop top`: real programs in subprocesses, a real terminal (tmux)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
from ferroloop._inspect import request

from tests.conftest import wait_until

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
    if len(sys.argv) > 1:  # stall the loop: every second a callback blocks that long
        def stall():
            time.sleep(float(sys.argv[1]))
            loop.call_later(1.0, stall)
        loop.call_later(1.0, stall)
    while True:
        writer.write(b"x" * 50)
        await reader.readexactly(50)
        await asyncio.sleep(0.01)

asyncio.run(main())
"""


def answer(path):
    """A snapshot from a loop that answered; None while the socket cannot be reached
    or the loop does not answer in time (a loaded machine)."""
    try:
        snapshot = request(path)
    except OSError:
        return None
    return snapshot if "stats" in snapshot and not snapshot.get("stalled") else None


def answered(path, what="the loop to answer"):
    return wait_until(lambda: answer(path), what)


@pytest.fixture
def inspected(tmp_path):
    """Starts APP under `python -m ferroloop --inspect`; yields (socket path, port)."""
    procs = []

    def start(*args, path=None, env=None):
        script = tmp_path / "app.py"
        script.write_text(APP)
        path = path or str(tmp_path / "inspect.sock")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ferroloop", "--inspect", path, str(script), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})},
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
    snapshot = wait_until(lambda: (s := answer(path)) and s["stats"]["bytes_read"] > 0 and s,
                          "traffic")
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
    assert answered(path)["stats"]["turns"] > 0


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
        assert answered(path)["stats"]["turns"] > 0
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_stalled_loop_is_reported_with_the_last_snapshot(inspected):
    path, _ = inspected("3")
    first = answered(path)
    stalled = wait_until(lambda: (s := request(path))["stalled"] and s, "the stall")
    assert stalled["last"]["stats"]["turns"] >= first["stats"]["turns"]
    answered(path, "the recovery")


def test_top_shows_the_slowest_callbacks_with_their_names(inspected):
    from ferroloop._top import render

    # The program stalls its loop for 0.2 s every second, in a callback named stall.
    path, _ = inspected("0.2", env={"FERROLOOP_STATS_TIMING": "1"})
    stall_callback = "main.<locals>.stall() at "

    def with_the_stall():
        snapshot = answer(path)
        runs = (snapshot or {}).get("stats", {}).get("slowest_callbacks") or []
        return snapshot if any(r["callback"].startswith(stall_callback) for r in runs) else None

    snapshot = wait_until(with_the_stall, "a snapshot with the stall among the slowest")
    stalls = [r for r in snapshot["stats"]["slowest_callbacks"]
              if r["callback"].startswith(stall_callback)]
    line = APP.splitlines().index("        def stall():") + 1
    for run in stalls:
        assert run["seconds"] >= 0.2 and run["callback"].endswith(f"app.py:{line}")
    screen = render(snapshot, None)
    start = screen.index("SLOWEST CALLBACKS (since the last refresh)")
    rows = screen[start + 1 : screen.index("CONNECTIONS (2)") - 1]
    assert 1 <= len(rows) <= 10
    assert any(row.endswith(f"ms  {stalls[0]['callback']}") for row in rows)


@contextlib.contextmanager
def top_in_tmux(path):
    """`top PATH` running in a detached tmux session; yields a function returning its
    screen's lines."""
    session = f"ferroloop-top-{os.getpid()}"
    command = f"{sys.executable} -m ferroloop top {path} --interval 0.3"
    env = {**os.environ, "TMUX": ""}
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "30", command],
                   check=True, env=env, timeout=WAIT)

    def screen():
        out = subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                             capture_output=True, text=True, env=env, timeout=WAIT, check=False)
        return out.stdout.splitlines()

    try:
        yield screen
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], env=env, timeout=WAIT, check=False)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make servers)")
def test_top_renders_in_a_real_terminal(inspected, tmp_path):
    path, port = inspected()
    with top_in_tmux(path) as screen:
        # Rates appear from the second refresh on.
        lines = wait_until(lambda: (s := screen()) and any(l.startswith("turns/s ") and "-" not in l.split()[1] for l in s) and s,
                           "a screen with rates")
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
    log = open(tmp_path / "supervisor.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferroloop", "--inspect", path, "--workers", "2", str(script)],
        stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        paths = [f"{path}.0", f"{path}.1"]
        wait_until(lambda: all(os.path.exists(p) for p in paths), "both workers' sockets")
        snapshots = [answered(p) for p in paths]
        assert [s["worker"] for s in snapshots] == ["0", "1"]
        assert snapshots[0]["pid"] != snapshots[1]["pid"]
        proc.send_signal(signal.SIGTERM)
        try:
            status = proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            status = None
        log.flush()
        assert status == 0, (tmp_path / "supervisor.log").read_text()
        left = [p for p in paths if os.path.exists(p)]
        assert not left, (tmp_path / "supervisor.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()  # the workers follow their supervisor (their lifeline)
            proc.wait(WAIT)
        log.close()


def run_program(tmp_path, source, path, timeout=WAIT):
    """Runs `source` with FERROLOOP_INSPECT=path; the program finds `path` in argv[1]."""
    script = tmp_path / "prog.py"
    script.write_text(source)
    return subprocess.run([sys.executable, str(script), path], capture_output=True, text=True,
                          timeout=timeout, check=False, env={**os.environ, "FERROLOOP_INSPECT": path})


def test_a_loop_made_after_the_first_one_closed_is_served(tmp_path):
    path = str(tmp_path / "inspect.sock")
    done = run_program(tmp_path, (
        "import asyncio, sys, ferroloop\n"
        "from ferroloop._inspect import request\n"
        "async def ask():\n"
        "    return (await asyncio.to_thread(request, sys.argv[1]))['stats']['turns'] > 0\n"
        "print(ferroloop.run(asyncio.sleep(0, 'first')))\n"
        "print(ferroloop.run(ask()))\n"
    ), path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["first", "True"]
    assert not os.path.exists(path)


def test_a_program_exiting_with_its_loop_unclosed_leaves_no_socket_file(tmp_path):
    path = str(tmp_path / "inspect.sock")
    done = run_program(tmp_path, (
        "import os, sys, ferroloop\n"
        "loop = ferroloop.new_event_loop()\n"
        "print(os.path.exists(sys.argv[1]))\n"
        "sys.exit(0)  # loop never closed: a program interrupted before it could\n"
    ), path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]
    assert not os.path.exists(path)


def test_a_forked_child_closing_its_copy_leaves_the_parent_served(tmp_path):
    path = str(tmp_path / "inspect.sock")
    done = run_program(tmp_path, (
        "import asyncio, os, sys, ferroloop\n"
        "from ferroloop._inspect import request\n"
        "loop = ferroloop.new_event_loop()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    loop.close()\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "async def ask():\n"
        "    return (await asyncio.to_thread(request, sys.argv[1]))['pid'] == os.getpid()\n"
        "print(loop.run_until_complete(ask()))\n"
        "loop.close()\n"
    ), path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"]


def test_a_silent_client_delays_neither_others_nor_the_close(tmp_path):
    path = str(tmp_path / "inspect.sock")
    done = run_program(tmp_path, (
        "import asyncio, socket, sys, time, ferroloop\n"
        "from ferroloop._inspect import request\n"
        "path = sys.argv[1]\n"
        "silent = socket.socket(socket.AF_UNIX)\n"
        "async def main():\n"
        "    silent.connect(path)\n"
        "    started = time.monotonic()\n"
        "    await asyncio.to_thread(request, path)\n"
        "    return time.monotonic() - started\n"
        "loop = ferroloop.new_event_loop()\n"
        "waited = loop.run_until_complete(main())\n"
        "silent2 = socket.socket(socket.AF_UNIX)\n"
        "silent2.connect(path)\n"
        "started = time.monotonic()\n"
        "loop.close()\n"
        "print(round(waited, 2), round(time.monotonic() - started, 2))\n"
    ), path)
    assert done.returncode == 0, done.stderr
    waited, closing = map(float, done.stdout.split())
    # The silent client gets 0.2 s; a loaded machine may add some.
    assert waited < 1.5 and closing < 1.5, (waited, closing)


def test_a_stall_is_served_with_the_stack_the_watchdog_took(tmp_path):
    from ferroloop._top import render

    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio, time\n"
        "def blocker():\n"
        "    time.sleep(3)\n"
        "async def main():\n"
        "    asyncio.get_running_loop().call_later(0.5, blocker)\n"
        "    await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    path = str(tmp_path / "inspect.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferroloop", "--watchdog", "100ms", "--inspect", path, str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        def stalled_with_report():
            snapshot = _reply(path) or {}
            reports = snapshot.get("watchdog") or []
            stalls = [r for r in reports if r["kind"] == "stalled" and r["stack"]]
            return snapshot if snapshot.get("stalled") and stalls else None

        snapshot = wait_until(stalled_with_report, "a stalled reply with the watchdog's report")
        (stall,) = [r for r in snapshot["watchdog"] if r["kind"] == "stalled"]
        assert "blocker" in stall["handle"] and "time.sleep(3)" in stall["stack"]
        screen = render(snapshot, None)
        assert any("STILL BLOCKED" in line for line in screen)
        assert any("time.sleep(3)" in line for line in screen)
        recovered = wait_until(
            lambda: (s := answer(path)) and any(r["kind"] == "recovered" for r in s["watchdog"]) and s,
            "the recovery report")
        assert recovered["watchdog"][-1]["duration"] >= 2.5
    finally:
        proc.kill()
        proc.wait(WAIT)
        proc.stderr.close()


def _reply(path):
    try:
        return request(path)
    except OSError:
        return None


WORKER_APP = (
    "import asyncio\n"
    "async def main():\n"
    "    server = await asyncio.start_server(lambda r, w: None, '127.0.0.1', 0)\n"
    "    async with server:\n"
    "        await server.serve_forever()\n"
    "asyncio.run(main())\n"
)


@pytest.fixture
def two_workers(tmp_path):
    """A 2-worker program under `--inspect PATH`, both answering; yields PATH."""
    script = tmp_path / "app.py"
    script.write_text(WORKER_APP)
    path = str(tmp_path / "inspect.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ferroloop", "--inspect", path, "--workers", "2", str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    pids = []
    try:
        for p in (f"{path}.0", f"{path}.1"):
            pids.append(answered(p, f"{p} to answer")["pid"])
        yield path
    finally:
        proc.kill()
        proc.wait(WAIT)
        # The workers would follow their supervisor through their lifeline, but not at
        # once (nor at all while stopped): they must not load the tests that come next.
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def top_json(path):
    done = subprocess.run([sys.executable, "-m", "ferroloop", "top", path, "--json"],
                          capture_output=True, text=True, timeout=WAIT, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def not_serving(path):
    """A socket file nothing listens on (a worker killed with SIGKILL leaves one)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(path)


def test_top_json_gathers_every_worker_and_reports_one_that_refuses(two_workers):
    path = two_workers
    not_serving(f"{path}.2")
    # (a loaded machine may keep a worker from answering within top's 2 s: ask again)
    gathered = wait_until(lambda: (g := top_json(path))["total"]["workers_answering"] == 2 and g,
                          "both workers to answer top")
    workers = gathered["workers"]
    assert [w["index"] for w in workers] == [0, 1, 2]
    assert [w["path"] for w in workers] == [f"{path}.0", f"{path}.1", f"{path}.2"]
    assert [w.get("worker") for w in workers[:2]] == ["0", "1"]
    assert workers[0]["pid"] != workers[1]["pid"]
    assert workers[2]["error"].startswith("refused")
    total = gathered["total"]
    assert (total["workers"], total["workers_answering"]) == (3, 2)
    for key in ("turns", "callbacks", "bytes_read", "io_events"):
        assert total[key] == sum(w["stats"][key] for w in workers[:2]), key
    assert total["turns"] > 0
    # One worker's path is one loop, shown as without worker mode.
    assert top_json(f"{path}.1")["pid"] == workers[1]["pid"]


def test_top_json_reports_a_frozen_worker_as_not_answering(two_workers):
    path = two_workers
    pid = answered(f"{path}.1")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        workers = wait_until(lambda: (w := top_json(path)["workers"]) and "stats" in w[0] and w,
                             "worker 0 to answer top")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "stats" in workers[0] and workers[0]["pid"] != pid
    assert workers[1]["error"] == "no answer in 2 s"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (make servers)")
def test_top_over_workers_renders_in_a_real_terminal(two_workers):
    path = two_workers
    pids = [answered(f"{path}.{i}")["pid"] for i in (0, 1)]
    not_serving(f"{path}.2")
    with top_in_tmux(path) as screen:
        def with_rates():
            lines = screen()
            total = [line.split() for line in lines if line.startswith("total ")]
            # Both workers answered this refresh (a loaded machine may delay one).
            answering = " 3 workers, 2 answering - " in (lines or [""])[0]
            return lines if answering and total and total[0][1] != "-" else None

        lines = wait_until(with_rates, "a screen with the workers' rates")
    assert lines[0].startswith(f"ferroloop top - {path} - 3 workers, 2 answering - ")
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKER "))
    assert lines[header].split() == ["WORKER", "PID", "TURNS/S", "CALLBACKS/S", "IN", "B/S",
                                     "OUT", "B/S", "CONNS", "LAST", "STALL"]
    total, *rows = (line.split() for line in lines[header + 1 : header + 5])
    assert total[0] == "total" and float(total[1].replace(",", "")) > 0
    assert [row[:2] for row in rows[:2]] == [["0", str(pids[0])], ["1", str(pids[1])]]
    assert all(row[-1] == "off" and row[-2] == "watchdog" for row in rows[:2])
    assert rows[2] == ["2", "-", "refused:", "not", "serving"]


def test_top_over_workers_merges_their_slowest_callbacks():
    from ferroloop._top import render_workers

    def worker(index, runs):
        stats = {"turns": 1, "callbacks": 1, "bytes_read": 0, "bytes_written": 0,
                 "slowest_callbacks": [{"seconds": s, "callback": name} for s, name in runs]}
        return {"index": index, "pid": 100 + index, "time": 0.0, "stats": stats,
                "connections": [], "watchdog": None}

    gathered = {"path": "p", "time": 0.0, "total": {
        "workers_answering": 2, "connections_accepted": 0, "exceptions_reported": 0,
        "turns": 2, "callbacks": 2, "bytes_read": 0, "bytes_written": 0, "connections": 0},
        "workers": [worker(0, [(0.3, "a() at x.py:1"), (0.1, "b() at x.py:2")]),
                    worker(1, [(0.2, "task 'T' step: c()")])]}
    screen = render_workers(gathered, None)
    start = screen.index("SLOWEST CALLBACKS (since the last refresh)")
    assert [line.split() for line in screen[start + 1:]] == [
        ["300.000", "ms", "[0]", "a()", "at", "x.py:1"],
        ["200.000", "ms", "[1]", "task", "'T'", "step:", "c()"],
        ["100.000", "ms", "[0]", "b()", "at", "x.py:2"],
    ]
