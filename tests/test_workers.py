"""`python -m ferroloop --workers N`: real supervisors and workers on 127.0.0.1.

Worker mode is ferroloop's own feature, so these tests run it only (the client side
uses plain sockets). No timing is asserted; every wait has a deadline, and every
process started is killed, with its process group, when the test ends."""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.conftest import wait_until

# Answers each connection, once it has read a byte, with "<pid> <worker index>"; on
# its way out (asyncio.run's shutdown) leaves a marker file named after its pid. Serves
# on a port (digits), a Unix socket path, or an abstract Unix name (@name).
PID_SERVER = """
import asyncio, os, sys

async def handle(reader, writer):
    await reader.read(1)
    writer.write(f"{os.getpid()} {os.environ['FERROLOOP_WORKER']}\\n".encode())
    await writer.drain()
    writer.close()

async def main(where, markers):
    if where.isdigit():
        server = await asyncio.start_server(handle, "127.0.0.1", int(where))
    else:
        server = await asyncio.start_unix_server(handle, where.replace("@", "\\0", 1))
    # One write per line: the workers share the log, and print() may write in pieces.
    os.write(1, f"listening {os.getpid()}\\n".encode())
    try:
        async with server:
            await server.serve_forever()
    finally:
        open(os.path.join(markers, str(os.getpid())), "w").close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""

WAIT = 30  # seconds: the deadline of every wait below


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> set[int]:
    """The live (not zombie) processes whose parent is `pid`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.add(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Supervisor:
    """A `python -m ferroloop --workers ...` process; its output goes to a file."""

    def __init__(self, tmp_path, program: str, flags: list[str], args: list[str], **popen):
        self.script = tmp_path / "app.py"
        self.script.write_text(textwrap.dedent(program))
        self.log_path = tmp_path / "supervisor.log"
        log_fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ferroloop", *flags, str(self.script), *args],
                cwd=tmp_path,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                **popen,
            )
        finally:
            os.close(log_fd)
        self.seen: set[int] = set()

    def log(self) -> str:
        return self.log_path.read_text()

    def workers(self) -> set[int]:
        pids = children(self.proc.pid)
        self.seen |= pids
        return pids

    def wait_workers(self, count: int) -> set[int]:
        return wait_until(lambda: len(self.workers()) == count and self.workers(), f"{count} workers")

    def wait_listening(self, pids: set[int]) -> None:
        """Until each of `pids` printed "listening <pid>" (PID_SERVER does)."""
        wait_until(lambda: all(f"listening {pid}\n" in self.log() for pid in pids), "listening")

    def stop(self, signum=signal.SIGTERM) -> int:
        self.proc.send_signal(signum)
        return self.proc.wait(timeout=WAIT)

    def kill_all(self) -> None:
        self.workers()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=WAIT)
        for pid in self.seen:
            try:
                os.killpg(pid, signal.SIGKILL)  # each worker leads its own group
            except (ProcessLookupError, PermissionError):
                pass


@pytest.fixture
def supervisors():
    started = []

    def start(*args, **kwargs) -> Supervisor:
        sup = Supervisor(*args, **kwargs)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.kill_all()


def ask(address) -> tuple[int, int]:
    """One connection: (pid, worker index) of the worker that served it."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(WAIT)
        s.connect(address)
        s.sendall(b"?")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(100)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
    pid, index = data.split()
    return int(pid), int(index)


def start_pid_servers(supervisors, tmp_path, count=2, flags=()):
    port = free_port()
    markers = tmp_path / "markers"
    markers.mkdir()
    sup = supervisors(tmp_path, PID_SERVER, ["--workers", str(count), *flags], [str(port), str(markers)])
    pids = sup.wait_workers(count)
    sup.wait_listening(pids)
    serve_until_every_worker_answers(("127.0.0.1", port), pids)
    return sup, ("127.0.0.1", port), markers


def serve_until_every_worker_answers(address, pids: set[int]) -> collections.Counter:
    answers = collections.Counter()
    for _ in range(1000):
        answers[ask(address)[0]] += 1
        if set(answers) >= pids:
            return answers
    raise AssertionError(f"workers {pids} did not all answer: {answers}")


def test_a_thousand_connections_reach_every_worker(supervisors, tmp_path):
    sup, address, markers = start_pid_servers(supervisors, tmp_path)
    pids = sup.workers()
    by_pid, by_index = collections.Counter(), collections.Counter()
    for _ in range(1000):
        pid, index = ask(address)
        by_pid[pid] += 1
        by_index[index] += 1
    print(f"\n1,000 connections over 2 workers: {dict(sorted(by_index.items()))} (by worker index)")
    assert set(by_pid) == pids
    assert sorted(by_index) == [0, 1]
    assert sum(by_pid.values()) == 1000
    assert sup.stop() == 0
    assert sorted(os.listdir(markers)) == sorted(str(p) for p in pids)


def test_killed_worker_is_replaced_and_service_continues(supervisors, tmp_path):
    sup, address, _ = start_pid_servers(supervisors, tmp_path)
    first = sup.workers()
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    after = wait_until(lambda: (w := sup.workers()) and len(w) == 2 and victim not in w and w, "a replacement")
    (new,) = after - first
    wait_until(lambda: f"(pid {victim}) killed by SIGKILL" in sup.log(), "the restart log line")
    assert re.search(rf"worker \d \(pid {victim}\) killed by SIGKILL after [\d.]+ s; restarting it in", sup.log())
    answers = serve_until_every_worker_answers(address, after)
    assert victim not in answers and new in answers
    assert sup.stop() == 1, "a worker died without being asked: the exit status says so"


def test_sigterm_stops_every_worker_gracefully(supervisors, tmp_path):
    sup, _, markers = start_pid_servers(supervisors, tmp_path)
    pids = sup.workers()
    assert sup.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in pids)
    # Each worker's main coroutine ran its `finally:` (asyncio.run's shutdown).
    assert sorted(os.listdir(markers)) == sorted(str(p) for p in pids)
    log = sup.log()
    assert "Traceback" not in log and "KeyboardInterrupt" not in log
    assert log.count("exited with status 0 after it was asked to stop") == 2


def test_sigint_stops_like_sigterm(supervisors, tmp_path):
    sup, _, markers = start_pid_servers(supervisors, tmp_path)
    pids = sup.workers()
    assert sup.stop(signal.SIGINT) == 0
    assert not any(alive(pid) for pid in pids)
    assert sorted(os.listdir(markers)) == sorted(str(p) for p in pids)


STUBBORN = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()
while True:
    time.sleep(1)
"""


def test_worker_that_ignores_the_stop_is_killed_after_the_graceful_timeout(supervisors, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    sup = supervisors(tmp_path, STUBBORN, ["--workers", "2", "--graceful-timeout", "1"], [str(ready)])
    pids = sup.wait_workers(2)
    wait_until(lambda: len(os.listdir(ready)) == 2, "the workers to ignore SIGINT")
    assert sup.stop() == 1
    assert not any(alive(pid) for pid in pids)
    assert sup.log().count("did not stop within 1 s: killing it") == 2


def test_a_second_stop_signal_kills_at_once(supervisors, tmp_path):
    ready = tmp_path / "ready"
    ready.mkdir()
    sup = supervisors(tmp_path, STUBBORN, ["--workers", "2", "--graceful-timeout", "600"], [str(ready)])
    pids = sup.wait_workers(2)
    wait_until(lambda: len(os.listdir(ready)) == 2, "the workers to ignore SIGINT")
    sup.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: "SIGTERM: stopping the workers" in sup.log(), "the first stop")
    assert sup.stop(signal.SIGINT) == 1
    assert "SIGINT again: killing the workers now" in sup.log()
    assert not any(alive(pid) for pid in pids)


def test_workers_stop_gracefully_when_the_supervisor_is_killed(supervisors, tmp_path):
    sup, _, markers = start_pid_servers(supervisors, tmp_path)
    pids = sup.workers()
    sup.proc.kill()
    sup.proc.wait(timeout=WAIT)
    wait_until(lambda: not any(alive(pid) for pid in pids), "the orphaned workers to stop")
    assert sorted(os.listdir(markers)) == sorted(str(p) for p in pids)


CRASHING = """
raise RuntimeError("this program always fails")
"""


def test_a_program_that_keeps_crashing_is_restarted_with_back_off(supervisors, tmp_path):
    sup = supervisors(tmp_path, CRASHING, ["--workers", "1"], [])

    def delays():
        return re.findall(r"status 1 after [\d.]+ s; restarting it in ([\d.]+) s", sup.log())

    wait_until(lambda: len(delays()) >= 3, "three restarts")
    assert sup.stop() == 1
    first = [float(d) for d in delays()[:3]]
    assert first == [0.5, 1.0, 2.0]
    assert "RuntimeError: this program always fails" in sup.log()


def test_unix_server_is_shared_by_the_workers(supervisors, tmp_path):
    path = str(tmp_path / "srv.sock")
    markers = tmp_path / "markers"
    markers.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:  # a file left by an earlier run
        stale.bind(path)
    sup = supervisors(tmp_path, PID_SERVER, ["--workers", "2"], [path, str(markers)])
    pids = sup.wait_workers(2)
    sup.wait_listening(pids)

    # Bursts of connections at once: both workers, woken by the one shared listening
    # socket, take some (which one wins each is up to the scheduler).
    results, errors = [], []

    def client():
        try:
            for _ in range(50):
                results.append(ask(path)[0])
        except OSError as exc:
            errors.append(exc)

    for _ in range(10):
        threads = [threading.Thread(target=client) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        if set(results) == pids:
            break
    assert not errors
    assert set(results) == pids, collections.Counter(results)
    print(f"\nUnix socket, 2 workers: {sorted(collections.Counter(results).values())}")

    # A restarted worker gets the same socket from the supervisor.
    victim = min(pids)
    os.kill(victim, signal.SIGKILL)
    after = wait_until(lambda: (w := sup.workers()) and len(w) == 2 and victim not in w and w, "a replacement")
    (new,) = after - pids
    seen = set()
    wait_until(lambda: seen.add(ask(path)[0]) or new in seen, "the new worker to serve")

    assert sup.stop() == 1  # one worker was killed
    assert not os.path.exists(path), "the socket file outlived the server"
    assert str(new) in os.listdir(markers)


def test_abstract_unix_name_is_shared_too(supervisors, tmp_path):
    name = f"\0ferroloop-workers-{os.getpid()}-{time.monotonic_ns()}"
    markers = tmp_path / "markers"
    markers.mkdir()
    sup = supervisors(tmp_path, PID_SERVER, ["--workers", "2"], ["@" + name[1:], str(markers)])
    pids = sup.wait_workers(2)
    sup.wait_listening(pids)
    answered = {ask(name)[0] for _ in range(50)}
    assert answered <= pids and answered
    assert sup.stop() == 0


UNBINDABLE = """
import asyncio, os, sys

async def main():
    try:
        await asyncio.start_unix_server(lambda r, w: None, sys.argv[1])
    except OSError as exc:
        # One write per line, as in PID_SERVER: both workers share the log.
        os.write(1, f"refused: {exc.errno} {exc}\\n".encode())
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_unix_path_the_supervisor_cannot_bind_is_an_oserror_in_the_worker(supervisors, tmp_path):
    path = str(tmp_path / "missing" / "srv.sock")
    sup = supervisors(tmp_path, UNBINDABLE, ["--workers", "2"], [path])
    sup.wait_workers(2)
    wait_until(lambda: sup.log().count("refused: 2 ") == 2, "both workers' errors")
    assert f"(binding {path!r} in the supervisor)" in sup.log()
    assert sup.stop() == 0


def test_sighup_restarts_every_worker_without_refusing_connections(supervisors, tmp_path):
    sup, address, _ = start_pid_servers(supervisors, tmp_path)
    before = sup.workers()
    served, errors = collections.Counter(), collections.Counter()
    done = threading.Event()

    def client():
        while not done.is_set():
            try:
                served[ask(address)[0]] += 1
            except OSError as exc:
                errors[type(exc).__name__] += 1

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_until(lambda: sum(served.values()) > 50, "the client to run")
        sup.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: sup.log().count(" replaces pid ") == 2, "both replacements")
        after = wait_until(lambda: (w := sup.workers()) and len(w) == 2 and not w & before and w,
                           "the old workers to exit")
        count = sum(served.values())
        wait_until(lambda: sum(served.values()) > count + 50, "the client to go on")
    finally:
        done.set()
        thread.join(WAIT)
    print(f"\nrolling restart: {sum(served.values())} requests, errors {dict(errors)}")
    assert errors["ConnectionRefusedError"] == 0
    assert set(served) & after, "the new workers served"
    assert sup.stop() == 0


PORT_ZERO = """
import asyncio, os

async def main():
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    os.write(1, f"port {server.sockets[0].getsockname()[1]}\\n".encode())  # one write: a shared log
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def test_port_zero_gives_each_worker_its_own_port_and_a_warning(supervisors, tmp_path):
    sup = supervisors(tmp_path, PORT_ZERO, ["--workers", "2"], [])

    def ports():
        return set(re.findall(r"^port (\d+)$", sup.log(), re.MULTILINE))

    wait_until(lambda: len(ports()) == 2, "a port from each worker")
    assert sup.log().count("create_server on port 0 gives each worker its own port") == 2
    assert sup.stop() == 0


SLEEPER = """
import asyncio, os
os.write(1, f"worker {os.environ['FERROLOOP_WORKER']} of {os.environ['FERROLOOP_WORKERS']}\\n".encode())
asyncio.run(asyncio.sleep(3600))
"""


@pytest.mark.parametrize("cpus", ["all", "one"])
def test_workers_auto_is_one_per_cpu_of_the_affinity_mask(supervisors, tmp_path, cpus):
    mask = sorted(os.sched_getaffinity(0))
    if cpus == "one":
        mask = mask[:1]
    sup = supervisors(
        tmp_path, SLEEPER, ["--workers", "auto"], [],
        preexec_fn=lambda: os.sched_setaffinity(0, mask),
    )
    sup.wait_workers(len(mask))
    lines = [f"worker {index} of {len(mask)}" for index in range(len(mask))]
    wait_until(lambda: all(line in sup.log() for line in lines), "every worker's line")
    assert f"starting {len(mask)} worker{'s' if len(mask) > 1 else ''}:" in sup.log()
    assert sup.stop() == 0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--workers", "0", "app.py"], "--workers takes a positive number or auto"),
        (["--workers", "two", "app.py"], "--workers takes a positive number or auto"),
        (["--graceful-timeout", "3", "app.py"], "--workers takes a positive number or auto"),
        (["--workers", "2"], "no program to run"),
        (["--workers", "2", "missing.py"], "can't open file 'missing.py'"),
    ],
)
def test_bad_worker_flags_are_usage_errors(tmp_path, flags, message):
    (tmp_path / "app.py").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "ferroloop", *flags],
        cwd=tmp_path, capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert proc.returncode == 2
    assert message in proc.stderr


def test_plain_run_is_not_a_worker(tmp_path):
    script = tmp_path / "app.py"
    script.write_text(
        "import asyncio, os\n"
        "from ferroloop import _workers\n"
        "print(os.environ.get('FERROLOOP_WORKER'), _workers._control)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ferroloop", str(script)],
        capture_output=True, text=True, timeout=WAIT, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None None"
