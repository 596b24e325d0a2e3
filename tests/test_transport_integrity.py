"""Integrity under load, ownership and leaks, and faults, on asyncio and ferroloop:
bytes come back exact and in order, fds and transports are released, an fd number
reused by a new connection never sees the old one's data, and EMFILE is survived."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import random
import socket
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import open_fds


def _transport_count() -> int:
    """Live stream transports of either loop (asyncio's selector one or ferroloop's)."""
    gc.collect()
    names = {"_SelectorSocketTransport", "SocketTransport"}
    return sum(1 for o in gc.get_objects() if type(o).__name__ in names)


async def _length_prefixed_echo(reader, writer):
    try:
        while True:
            header = await reader.readexactly(4)
            size = int.from_bytes(header, "big")
            body = await reader.readexactly(size)
            writer.write(header + body)
            await writer.drain()
    except asyncio.IncompleteReadError:
        pass
    writer.close()


def test_100_clients_random_sizes_get_every_byte_back_in_order(loop):
    rng = random.Random(20261122)

    async def client(port, sizes):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = hashlib.sha256()
        got = hashlib.sha256()
        for size in sizes:
            body = rng.randbytes(size)
            sent.update(body)
            writer.write(size.to_bytes(4, "big") + body)
        for size in sizes:
            header = await reader.readexactly(4)
            assert int.from_bytes(header, "big") == size
            got.update(await reader.readexactly(size))
        writer.close()
        await writer.wait_closed()
        assert got.digest() == sent.digest()
        return len(sizes)

    async def main():
        server = await asyncio.start_server(_length_prefixed_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        # Log-uniform from 1 byte to 1 MiB, both ends included.
        plans = [
            [1, 1 << 20] if i == 0 else [int(2 ** rng.uniform(0, 20)) for _ in range(3)]
            for i in range(100)
        ]
        done = await asyncio.gather(*(client(port, sizes) for sizes in plans))
        assert sum(done) == sum(len(p) for p in plans)
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 120))


def test_half_close_in_both_directions(loop):
    async def main():
        async def server_side(reader, writer):
            request = await reader.read()  # until the client's EOF
            writer.write(b"reply to " + request)
            writer.write_eof()  # the server half-closes too
            await writer.drain()
            # The connection is half-closed both ways; the socket is still open.
            assert not writer.is_closing()
            writer.close()

        server = await asyncio.start_server(server_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"question")
        writer.write_eof()
        assert await reader.read() == b"reply to question"
        assert reader.at_eof()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 20))


def test_drain_waits_for_a_peer_that_stops_reading_and_memory_stays_bounded(loop):
    chunk = b"d" * 65536

    async def main():
        state = {"writes": 0, "max_buffer": 0, "writer": None}
        drained_all = asyncio.Event()

        async def flood(reader, writer):
            state["writer"] = writer
            transport = writer.transport
            for _ in range(400):  # 25 MiB, far beyond socket buffers
                writer.write(chunk)
                state["max_buffer"] = max(state["max_buffer"], transport.get_write_buffer_size())
                state["writes"] += 1
                await writer.drain()
            drained_all.set()
            writer.close()

        server = await asyncio.start_server(flood, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=65536)
        await asyncio.sleep(0.3)
        # The client stopped reading (its reader is paused at the limit): drain blocks.
        stalled_at = state["writes"]
        await asyncio.sleep(0.2)
        assert state["writes"] == stalled_at < 400
        assert not drained_all.is_set()
        high = state["writer"].transport.get_write_buffer_limits()[1]
        assert state["max_buffer"] <= high + len(chunk)
        total = 0
        while data := await reader.read(1 << 20):
            total += len(data)
        assert total == 400 * len(chunk)
        assert drained_all.is_set()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 60))


def test_10000_connect_echo_close_cycles_leak_no_fd_and_no_transport(loop):
    async def echo(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def cycle(i):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"%d" % i)
            assert await reader.read() == b"%d" % i
            writer.close()
            await writer.wait_closed()

        await cycle(-1)  # warm up lazily created objects (executor-free: numeric host)
        await asyncio.sleep(0.05)
        fds, transports = open_fds(), _transport_count()
        for start in range(0, 10_000, 50):
            await asyncio.gather(*(cycle(i) for i in range(start, start + 50)))
        await asyncio.sleep(0.05)
        assert open_fds() == fds
        assert _transport_count() == transports
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 300))


def test_cancelled_create_connection_and_sock_connect_leak_no_fd(loop):
    async def main():
        # A listener whose backlog is full and never accepted: further connects hang
        # in SYN_SENT until cancelled.
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            fillers.append(s)
        await asyncio.sleep(0.05)
        before = open_fds()
        for _ in range(20):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.create_connection(asyncio.Protocol, "127.0.0.1", port), 0.02)
            sock = socket.socket()
            sock.setblocking(False)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 0.02)
            # The socket survives the cancellation and stays usable: it can be closed.
            assert sock.fileno() >= 0
            sock.close()
        await asyncio.sleep(0.05)
        assert open_fds() == before
        for s in fillers:
            s.close()
        listener.close()

    loop.run_until_complete(asyncio.wait_for(main(), 60))


def test_reused_fd_number_never_sees_the_old_connections_data(loop):
    async def main():
        connections = []

        class Record(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.fd = transport.get_extra_info("socket").fileno()
                self.data = bytearray()
                self.lost = False
                connections.append(self)

            def data_received(self, data):
                self.data += data

            def connection_lost(self, exc):
                self.lost = True

        server = await loop.create_server(Record, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reused = 0
        for round_ in range(20):
            old_client = socket.create_connection(("127.0.0.1", port))
            while len(connections) < 2 * round_ + 1:
                await asyncio.sleep(0.001)
            old = connections[-1]
            old_client.sendall(b"old" * 1000)
            # The server drops the old connection in the same turn as the peer keeps
            # sending: events for the old fd may already be queued.
            old.transport.abort()
            old_client.sendall(b"OLD-AFTER-CLOSE")
            new_client = socket.create_connection(("127.0.0.1", port))
            while len(connections) < 2 * round_ + 2:
                await asyncio.sleep(0.001)
            new = connections[-1]
            reused += new.fd == old.fd
            new_client.sendall(b"new")
            while bytes(new.data) != b"new":
                assert len(new.data) < 3, bytes(new.data)
                await asyncio.sleep(0.001)
            try:
                old_client.sendall(b"OLD-LATE")
            except OSError:
                pass
            await asyncio.sleep(0.005)
            assert bytes(new.data) == b"new"
            assert b"new" not in old.data and b"OLD" not in bytes(old.data).replace(b"old", b"")
            old_client.close()
            new.transport.close()
            new_client.close()
            await asyncio.sleep(0.005)
        assert reused > 0, "the fd number was never reused: the test proved nothing"
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 60))


EMFILE_SERVER = textwrap.dedent(
    """
    import asyncio, resource, sys
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
    if {loop!r} == "ferroloop":
        import ferroloop
        new_loop = ferroloop.new_event_loop
    else:
        new_loop = asyncio.new_event_loop

    async def echo(reader, writer):
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda l, ctx: errors.append(ctx.get("message")))
        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        line = await loop.run_in_executor(None, sys.stdin.readline)
        print("errors:", sorted(set(errors)), flush=True)
        server.close()

    loop = new_loop()
    loop.run_until_complete(main())
    """
)


def test_server_survives_emfile_and_serves_again(loop_name):
    code = EMFILE_SERVER.format(loop=loop_name)
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        port = int(proc.stdout.readline())
        clients = []
        echoed = 0
        for i in range(80):  # more connections than the server has fds
            c = socket.create_connection(("127.0.0.1", port))
            # The first connection shows the server is up, however slow the machine.
            c.settimeout(10 if i == 0 else 0.15)
            clients.append(c)
            c.sendall(b"%d;" % i)
            try:
                echoed += c.recv(100) == b"%d;" % i
            except TimeoutError:
                pass  # accepted by the kernel, not by the starved server
        assert 0 < echoed < 80
        for c in clients:
            c.close()
        # Once fds are free again, the server (retrying accept) serves new clients.
        c = socket.create_connection(("127.0.0.1", port))
        c.settimeout(10)
        c.sendall(b"after")
        assert c.recv(100) == b"after"
        c.close()
        proc.stdin.write("done\n")
        proc.stdin.flush()
        report = proc.stdout.readline()
        assert "socket.accept() out of system resource" in report
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
