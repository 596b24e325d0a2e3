"""Pipes and subprocesses on asyncio and ferroloop: the pipe's owner and its fd, the
subprocess API with its stdio forms and options, bulk data, many children, leaks."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

from tests.conftest import open_fds

PY = sys.executable


class Reader(asyncio.Protocol):
    def __init__(self):
        self.data = bytearray()
        self.events = []
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.events.append("eof")

    def connection_lost(self, exc):
        self.events.append(("lost", exc))


def test_read_pipe_closes_the_pipe_object_fd_exactly_once(loop):
    async def main():
        r, w = os.pipe()
        pipe = open(r, "rb", buffering=0)  # noqa: SIM115 - ownership moves to the transport
        tr, proto = await loop.connect_read_pipe(Reader, pipe)
        assert tr.get_extra_info("pipe") is pipe
        os.write(w, b"through the pipe")
        os.close(w)
        while ("lost", None) not in proto.events:
            await asyncio.sleep(0.001)
        assert bytes(proto.data) == b"through the pipe"
        assert proto.events == ["eof", ("lost", None)]
        assert pipe.closed
        # The fd number is free again; a new fd gets it and must stay untouched by
        # anything the old transport does from now on.
        fresh_r, fresh_w = os.pipe()
        assert r in (fresh_r, fresh_w)
        tr.close()
        await asyncio.sleep(0.01)
        os.write(fresh_w, b"still mine")
        assert os.read(fresh_r, 100) == b"still mine"
        os.close(fresh_r)
        os.close(fresh_w)

    loop.run_until_complete(asyncio.wait_for(main(), 10))


def test_write_pipe_and_peer_close(loop, tmp_path):
    async def main():
        r, w = os.pipe()
        pipe = open(w, "wb", buffering=0)  # noqa: SIM115 - ownership moves to the transport
        tr, proto = await loop.connect_write_pipe(Reader, pipe)
        tr.write(b"hello ")
        tr.writelines([b"pipe", b"!"])
        await asyncio.sleep(0.01)
        assert os.read(r, 100) == b"hello pipe!"
        assert tr.can_write_eof()
        os.close(r)  # the reader goes away: the transport notices and closes
        while not proto.events:
            await asyncio.sleep(0.001)
        assert proto.events[0][0] == "lost"
        assert pipe.closed

        with open(tmp_path / "regular", "wb") as regular, pytest.raises(ValueError):
            await loop.connect_write_pipe(Reader, regular)  # pipes, sockets, char devices only

    loop.run_until_complete(asyncio.wait_for(main(), 10))


def test_subprocess_exec_and_shell_with_communicate(loop, tmp_path):
    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys, os; d = sys.stdin.buffer.read(); "
            "sys.stdout.buffer.write(d.upper()); sys.stderr.write(os.getcwd() + '|' + os.environ['FERRO_TEST']); sys.exit(4)",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=str(tmp_path), env={**os.environ, "FERRO_TEST": "env passed"},
        )
        out, err = await proc.communicate(b"shout")
        assert out == b"SHOUT"
        assert err.decode() == f"{tmp_path}|env passed"
        assert proc.returncode == 4

        proc = await asyncio.create_subprocess_shell(
            "echo to-stderr 1>&2; echo to-stdout", stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, err = await proc.communicate()
        assert sorted(out.split()) == [b"to-stderr", b"to-stdout"]
        assert err is None
        assert proc.returncode == 0

        log = tmp_path / "log.txt"
        with open(log, "wb") as fh:
            proc = await asyncio.create_subprocess_exec(
                PY, "-c", "print('into a file')", stdout=fh, stdin=subprocess.DEVNULL
            )
            assert await proc.wait() == 0
        assert log.read_bytes() == b"into a file\n"

    loop.run_until_complete(asyncio.wait_for(main(), 60))


def test_subprocess_signals_and_transport_surface(loop):
    async def main():
        script = "import signal, sys, time; print('ready', flush=True); time.sleep(60)"
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", script, stdout=subprocess.PIPE, start_new_session=True
        )
        assert await proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGUSR1)
        assert await proc.wait() == -signal.SIGUSR1

        for stop, code in ((lambda p: p.terminate(), -signal.SIGTERM), (lambda p: p.kill(), -signal.SIGKILL)):
            proc = await asyncio.create_subprocess_exec(PY, "-c", script, stdout=subprocess.PIPE)
            assert await proc.stdout.readline() == b"ready\n"
            stop(proc)
            assert await proc.wait() == code

        transport, _protocol = await loop.subprocess_exec(
            asyncio.SubprocessProtocol, PY, "-c", "import sys; sys.exit(9)",
            stdin=None, stdout=None, stderr=None,
        )
        assert transport.get_pid() > 0
        assert transport.get_pipe_transport(1) is None
        while transport.get_returncode() is None:
            await asyncio.sleep(0.005)
        assert transport.get_returncode() == 9
        transport.close()

        r, w = os.pipe()
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", f"import os; os.write({w}, b'passed fd')", pass_fds=(w,)
        )
        os.close(w)
        assert await proc.wait() == 0
        assert os.read(r, 100) == b"passed fd"
        os.close(r)

    loop.run_until_complete(asyncio.wait_for(main(), 60))


def test_100_mib_through_a_pipe(loop):
    size = 100 * 1024 * 1024

    async def main():
        proc = await asyncio.create_subprocess_exec(
            PY, "-c", "import sys, shutil; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer, 1 << 20)",
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        chunk = bytes(range(256)) * 4096  # 1 MiB

        async def feed():
            for _ in range(size // len(chunk)):
                proc.stdin.write(chunk)
                await proc.stdin.drain()
            proc.stdin.close()

        async def consume():
            total = 0
            while data := await proc.stdout.read(1 << 20):
                # Every byte in its place: position i holds i % 256.
                assert data[0] == total % 256 and data[-1] == (total + len(data) - 1) % 256
                total += len(data)
            return total

        _, total = await asyncio.gather(feed(), consume())
        assert total == size
        assert await proc.wait() == 0

    loop.run_until_complete(asyncio.wait_for(main(), 120))


def test_200_children_at_once(loop):
    async def main():
        async def child(i):
            proc = await asyncio.create_subprocess_exec(
                PY, "-c", f"print({i} * 2)", stdout=subprocess.PIPE
            )
            out, _ = await proc.communicate()
            return int(out), proc.returncode

        results = await asyncio.gather(*(child(i) for i in range(200)))
        assert results == [(i * 2, 0) for i in range(200)]

    loop.run_until_complete(asyncio.wait_for(main(), 180))


def test_1000_runs_leak_no_fd_and_no_process(loop):
    true = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"

    pids = []

    async def main():
        async def run():
            proc = await asyncio.create_subprocess_exec(
                true, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            pids.append(proc.pid)
            await proc.communicate()
            assert proc.returncode == 0

        await run()
        fds = open_fds()
        for _ in range(50):
            await asyncio.gather(*(run() for _ in range(20)))
        await asyncio.sleep(0.05)
        assert open_fds() == fds
        assert len(pids) == 1001
        for pid in pids:  # every child was reaped (other tests' servers may still run)
            with pytest.raises(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    loop.run_until_complete(asyncio.wait_for(main(), 180))


def _proc_state(pid: int) -> str | None:
    """The state letter of `pid` in /proc (Z: a zombie), or None once it is reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_a_child_that_outlives_its_loop_is_reaped(loop, loop_name):
    if loop_name == "asyncio" and sys.version_info >= (3, 12):
        # Its pidfd watcher stops watching with the loop: the child stays a zombie.
        pytest.skip("asyncio 3.12+ leaves a child that outlives its loop a zombie")
    r, w = os.pipe()

    async def main():
        proc = await asyncio.create_subprocess_exec(PY, "-c", "import os; os.read(0, 1)", stdin=r)
        return proc.pid, proc._transport._proc

    try:
        with warnings.catch_warnings():
            # Both loops warn of the transport left unclosed when it is collected.
            warnings.simplefilter("ignore", ResourceWarning)
            pid, popen = loop.run_until_complete(main())
            loop.close()  # the child still runs: it waits for its stdin
            gc.collect()
    finally:
        os.close(r)
        os.close(w)  # now it reads EOF and exits
    deadline = time.monotonic() + 30
    while _proc_state(pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    state = _proc_state(pid)
    if state is not None:
        os.waitpid(pid, 0)  # leave no zombie behind this failure
    assert state is None
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    if loop_name == "ferroloop":
        # The transport, collected unclosed, killed the child as asyncio's does; the
        # status is kept where its Popen looks for it, so a later poll() or kill()
        # sees a finished child, not a pid that may have been reused. (The reaper
        # writes it just after its waitpid returns.)
        while popen.returncode is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert popen.returncode == -signal.SIGKILL
