"""The stream transport: Protocol and BufferedProtocol echo, flow control, half-close,
close/abort, errors, extra info and the fd ownership rules. Run on asyncio and ferroloop."""

from __future__ import annotations

import asyncio
import socket
import sys
import warnings

import ferroloop
import pytest


class Collect(asyncio.Protocol):
    """Records everything that happens to it."""

    def __init__(self, eof_keep_open=False):
        self.transport = None
        self.data = bytearray()
        self.events = []
        self.eof_keep_open = eof_keep_open
        self.lost = None

    def connection_made(self, transport):
        self.transport = transport
        self.events.append("made")

    def data_received(self, data):
        assert isinstance(data, bytes)
        self.data += data

    def eof_received(self):
        self.events.append("eof")
        return self.eof_keep_open

    def connection_lost(self, exc):
        self.events.append("lost")
        self.lost = asyncio.get_running_loop().create_future()
        self.lost.set_result(exc)


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)

    def eof_received(self):
        self.transport.write_eof()
        return True


class BufferedEcho(asyncio.BufferedProtocol):
    def __init__(self):
        self.buf = bytearray(1024)

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        self.transport.write(bytes(self.buf[:nbytes]))

    def eof_received(self):
        self.transport.write_eof()
        return True


class BufferedViewEcho(BufferedEcho):
    """Writes a view of its receive buffer, which the next read overwrites: whatever the
    transport keeps of a write must be a copy."""

    def buffer_updated(self, nbytes):
        self.transport.write(memoryview(self.buf)[:nbytes])


def _skip_unless_written_views_are_copied(loop):
    # From 3.12 asyncio's socket transport keeps a view of a buffer it could not send at
    # once instead of a copy, so a buffer reused after write() may go out changed;
    # ferroloop copies on every version.
    if sys.version_info >= (3, 12) and not isinstance(loop, ferroloop.Loop):
        pytest.skip("3.12+ asyncio keeps a view of a written buffer, not a copy")


async def _wait_for(predicate, timeout=5.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


class Accepted:
    """A protocol factory that keeps the protocols it made: from 3.12 a server's
    `wait_closed()` also waits for its connections, which the test closes first."""

    def __init__(self, factory):
        self.factory = factory
        self.protocols = []

    def __call__(self):
        protocol = self.factory()
        self.protocols.append(protocol)
        return protocol

    def close_all(self):
        for protocol in self.protocols:
            protocol.transport.close()


async def _echo_round_trip(protocol_factory, payload: bytes) -> bytes:
    loop = asyncio.get_running_loop()
    accepted = Accepted(protocol_factory)
    server = await loop.create_server(accepted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    writer.write_eof()
    echoed = await reader.read()
    writer.close()
    await writer.wait_closed()
    accepted.close_all()
    server.close()
    await server.wait_closed()
    return echoed


@pytest.mark.parametrize(
    "factory",
    [Echo, BufferedEcho, BufferedViewEcho],
    ids=["Protocol", "BufferedProtocol", "BufferedProtocol-view"],
)
def test_echo_is_byte_exact_and_half_close_keeps_the_reply_path(loop, factory):
    if factory is BufferedViewEcho:
        _skip_unless_written_views_are_copied(loop)
    payload = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: many reads, many writes
    echoed = loop.run_until_complete(_echo_round_trip(factory, payload))
    assert echoed == payload



def _reading_pair(loop, order, stop_on_read=False):
    """A transport on one end of a socketpair whose protocol, on data, wakes a task
    that answers it; returns the other end and the task once it waits."""
    ours, theirs = socket.socketpair()
    waiter = loop.create_future()

    class Reader(asyncio.Protocol):
        def data_received(self, data):
            order.append("read")
            waiter.set_result(data)
            loop.call_soon(order.append, "scheduled by the read")
            if stop_on_read:
                loop.stop()

    async def answer():
        data = await waiter
        order.append("woken")
        transport.write(data.upper())

    transport, _ = loop.run_until_complete(loop.create_connection(Reader, sock=ours))
    task = loop.create_task(answer())
    loop.run_until_complete(asyncio.sleep(0))
    theirs.setblocking(False)
    return transport, theirs, task


def test_a_task_woken_by_a_read_answers_in_the_turn_of_the_read(loop, loop_name):
    # ferroloop runs what a transport's read scheduled at the end of the read's turn,
    # as uvloop does, so the answer leaves with that turn's writes; asyncio runs the
    # same callbacks, in the same order, in the next turn.
    order = []
    transport, theirs, task = _reading_pair(loop, order)
    with theirs:
        theirs.sendall(b"ping")
        loop._run_once()
        if loop_name == "asyncio":
            assert order == ["read"]
            loop._run_once()
        assert order == ["read", "woken", "scheduled by the read"]
        assert task.done() and task.result() is None
        # Sent by the end of the turn (asyncio's selector transport sends in write()).
        assert theirs.recv(16) == b"PING"
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))


def test_what_a_read_scheduled_waits_for_the_next_run_after_a_stop(loop):
    # A stop() requested in the turn ends the run after it, as in asyncio: what the
    # read scheduled runs when the loop runs again.
    order = []
    transport, theirs, task = _reading_pair(loop, order, stop_on_read=True)
    with theirs:
        theirs.sendall(b"ping")
        loop.run_forever()
        assert order == ["read"]
        loop.run_until_complete(task)
        assert order == ["read", "woken", "scheduled by the read"]
        assert theirs.recv(16) == b"PING"
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))

def test_a_stop_scheduled_before_a_read_ends_the_run_after_asyncios_next_turn(loop):
    # One turn runs H (which schedules a stop), a read (which schedules X) and an
    # expired timer (which schedules Y). asyncio runs stop, X and Y together in the
    # next turn and only then leaves run_forever: ferroloop, which runs what the read
    # scheduled in the read's turn, must still run Y before it leaves.
    order = []
    ours, theirs = socket.socketpair()

    class Reader(asyncio.Protocol):
        def data_received(self, data):
            order.append("read")
            loop.call_soon(order.append, "X")

    async def connect():
        return await loop.connect_accepted_socket(Reader, ours)

    transport, _ = loop.run_until_complete(connect())
    loop.run_until_complete(asyncio.sleep(0))  # reading has started

    def stop():
        order.append("stop")
        loop.stop()

    def h():
        order.append("H")
        loop.call_soon(stop)

    def t():
        order.append("T")
        loop.call_soon(order.append, "Y")

    with theirs:
        theirs.sendall(b"x")  # in our receive buffer already: the first poll sees it
        loop.call_soon(h)
        loop.call_at(loop.time() - 1, t)
        loop.run_forever()
        assert order == ["H", "read", "T", "stop", "X", "Y"]
        transport.close()
        loop.run_until_complete(asyncio.sleep(0))
    assert order == ["H", "read", "T", "stop", "X", "Y"]


def test_buffer_writes_to_a_full_socket_keep_every_byte(loop):
    # The peer reads nothing for a while: the echo's writes of views of its receive
    # buffer meet a full socket, are sent in part, and the rest must be kept as it was
    # when written, though the next read overwrites the buffer it came from.
    _skip_unless_written_views_are_copied(loop)
    payload = bytes(range(251)) * (64 * 1024)  # 16 MiB, more than both sockets hold

    async def main():
        accepted = Accepted(BufferedViewEcho)
        server = await loop.create_server(accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(payload)
        await asyncio.sleep(0.3)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        writer.close()
        await writer.wait_closed()
        accepted.close_all()
        server.close()
        await server.wait_closed()
        return echoed

    assert loop.run_until_complete(main()) == payload


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_extra_info_of_an_accepted_connection_survives_its_close(loop, host):
    # asyncio reads socket, sockname and peername when the transport is made; asking
    # for them first after the connection is closed must give the same answers, in the
    # socket module's form (a 4-tuple for IPv6).
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6")

    async def main():
        server_sides = []

        def factory():
            server_sides.append(Collect())
            return server_sides[-1]

        server = await loop.create_server(factory, host, 0)
        server_name = server.sockets[0].getsockname()
        tr, _ = await loop.create_connection(Collect, host, server_name[1])
        await _wait_for(lambda: server_sides and server_sides[0].transport is not None)
        accepted = server_sides[0].transport
        client_name = tr.get_extra_info("sockname")
        assert accepted.get_extra_info("peername") == client_name
        tr.close()
        await _wait_for(lambda: server_sides[0].lost is not None)
        assert accepted.is_closing()
        assert accepted.get_extra_info("sockname") == server_name
        assert accepted.get_extra_info("peername") == client_name
        assert type(accepted.get_extra_info("peername")) is tuple
        sock = accepted.get_extra_info("socket")
        assert sock is accepted.get_extra_info("socket")
        assert sock.fileno() == -1
        listener = server.sockets[0]
        assert (sock.family, sock.type, sock.proto) == (
            listener.family, listener.type, listener.proto
        )
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_transport_surface(loop):
    async def main():
        server_side = Collect()
        server = await loop.create_server(lambda: server_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, client = await loop.create_connection(Collect, "127.0.0.1", port)
        await _wait_for(lambda: server_side.transport is not None)

        assert isinstance(tr, asyncio.Transport)
        assert isinstance(tr, asyncio.BaseTransport)
        assert tr.get_protocol() is client
        assert tr.get_extra_info("peername") == ("127.0.0.1", port)
        assert tr.get_extra_info("sockname") == tr.get_extra_info("socket").getsockname()
        assert tr.get_extra_info("missing", "dflt") == "dflt"
        sock = tr.get_extra_info("socket")
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        assert tr.can_write_eof() is True
        assert tr.is_reading() is True
        assert tr.get_write_buffer_size() == 0
        assert tr.get_write_buffer_limits() == (16384, 65536)
        tr.set_write_buffer_limits(high=400)
        assert tr.get_write_buffer_limits() == (100, 400)
        tr.set_write_buffer_limits(low=10)
        assert tr.get_write_buffer_limits() == (10, 40)
        with pytest.raises(ValueError):
            tr.set_write_buffer_limits(high=1, low=2)
        with pytest.raises(TypeError):
            tr.write("text")
        with pytest.raises(TypeError):
            tr.writelines([b"ok", 42])

        tr.write(bytearray(b"ab"))
        tr.write(memoryview(b"cd"))
        tr.writelines([b"ef", bytearray(b"gh"), memoryview(b"ij")])
        tr.write(b"")
        await _wait_for(lambda: bytes(server_side.data) == b"abcdefghij")

        tr.pause_reading()
        assert tr.is_reading() is False
        tr.pause_reading()  # idempotent
        server_side.transport.write(b"while paused")
        await asyncio.sleep(0.05)
        assert bytes(client.data) == b""
        tr.resume_reading()
        await _wait_for(lambda: bytes(client.data) == b"while paused")

        other = Collect()
        tr.set_protocol(other)
        assert tr.get_protocol() is other
        server_side.transport.write(b"to the new protocol")
        await _wait_for(lambda: bytes(other.data) == b"to the new protocol")

        tr.close()
        assert tr.is_closing() is True
        assert tr.is_reading() is False
        await _wait_for(lambda: other.lost is not None)
        assert await other.lost is None
        assert other.events == ["lost"]
        assert client.events == ["made"]
        await _wait_for(lambda: server_side.lost is not None)
        assert server_side.events == ["made", "eof", "lost"]
        assert sock.fileno() == -1
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_eof_received_true_keeps_transport_open_for_writing(loop):
    async def main():
        server_side = Collect(eof_keep_open=True)
        server = await loop.create_server(lambda: server_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"question")
        writer.write_eof()
        await _wait_for(lambda: "eof" in server_side.events)
        assert server_side.transport.is_closing() is False
        server_side.transport.write(b"answer after eof")
        server_side.transport.close()
        assert await reader.read() == b"answer after eof"
        await _wait_for(lambda: server_side.lost is not None)
        assert await server_side.lost is None
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_close_flushes_pending_writes_and_abort_drops_them(loop):
    async def main():
        received = {}

        async def read_all(reader, writer):
            tag = await reader.readexactly(1)
            received[tag] = await reader.read()
            writer.close()

        server = await asyncio.start_server(read_all, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        big = b"x" * (8 * 1024 * 1024)

        tr, proto = await loop.create_connection(Collect, "127.0.0.1", port)
        tr.write(b"c")
        tr.write(big)
        tr.close()
        tr.close()  # a second close is a no-op
        await _wait_for(lambda: b"c" in received, timeout=20)
        assert received[b"c"] == big
        assert await proto.lost is None

        tr, proto = await loop.create_connection(Collect, "127.0.0.1", port)
        tr.write(b"a")
        await asyncio.sleep(0.05)
        tr.write(big)
        tr.abort()
        assert tr.is_closing()
        await _wait_for(lambda: proto.lost is not None)
        assert await proto.lost is None
        await _wait_for(lambda: b"a" in received)
        assert len(received[b"a"]) < len(big)
        assert tr.get_write_buffer_size() == 0
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_write_after_close_is_ignored_then_warned(loop, caplog):
    async def main():
        server = await loop.create_server(Collect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(Collect, "127.0.0.1", port)
        tr.abort()
        await _wait_for(lambda: proto.lost is not None)
        with caplog.at_level("WARNING", logger="asyncio"):
            for _ in range(7):
                tr.write(b"late")  # never raises
        warned = [r for r in caplog.records if "socket.send() raised exception" in r.message]
        assert len(warned) >= 1
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_write_after_write_eof_raises(loop):
    async def main():
        server = await loop.create_server(Collect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, _ = await loop.create_connection(Collect, "127.0.0.1", port)
        tr.write_eof()
        with pytest.raises(RuntimeError):
            tr.write(b"x")
        tr.close()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_peer_reset_is_connection_reset_error(loop):
    async def main():
        server_side = Collect()
        server = await loop.create_server(lambda: server_side, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        raw = socket.create_connection(("127.0.0.1", port))
        await _wait_for(lambda: server_side.transport is not None)
        # Make the server's writes fail: the peer resets the connection (RST on close
        # with SO_LINGER 0) while the server keeps writing.
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()
        for _ in range(200):
            if server_side.lost is not None:
                break
            server_side.transport.write(b"y" * 65536)
            await asyncio.sleep(0.005)
        await _wait_for(lambda: server_side.lost is not None)
        exc = await server_side.lost
        assert isinstance(exc, (ConnectionResetError, BrokenPipeError))
        assert server_side.events.count("lost") == 1
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_flow_control_pauses_at_high_water_and_resumes_below_low(loop):
    calls = []

    class Watch(Collect):
        def pause_writing(self):
            calls.append(("pause", self.transport.get_write_buffer_size()))

        def resume_writing(self):
            calls.append(("resume", self.transport.get_write_buffer_size()))

    async def main():
        a, b = socket.socketpair()
        tr, _proto = await loop.connect_accepted_socket(Watch, a)
        tr.set_write_buffer_limits(high=64 * 1024, low=16 * 1024)
        tr.write(b"z" * (4 * 1024 * 1024))  # far more than the socket buffers hold
        assert calls and calls[0][0] == "pause"
        assert calls[0][1] > 64 * 1024
        await asyncio.sleep(0.05)
        assert len(calls) == 1  # nobody reads: still paused
        b.setblocking(False)
        got = 0
        while got < 4 * 1024 * 1024:
            try:
                got += len(b.recv(1 << 20))
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await _wait_for(lambda: len(calls) == 2)
        assert calls[1][0] == "resume"
        assert calls[1][1] <= 16 * 1024
        tr.close()
        b.close()

    loop.run_until_complete(main())


def test_add_reader_on_a_transport_fd_raises(loop):
    async def main():
        a, b = socket.socketpair()
        tr, _ = await loop.connect_accepted_socket(Collect, a)
        with pytest.raises(RuntimeError, match="is used by transport"):
            loop.add_reader(a.fileno(), print)
        with pytest.raises(RuntimeError, match="is used by transport"):
            loop.remove_writer(a.fileno())
        tr.close()
        await asyncio.sleep(0.01)
        b.close()

    loop.run_until_complete(main())


def test_protocol_error_goes_to_exception_handler_and_closes(loop):
    contexts = []
    loop.set_exception_handler(lambda lp, ctx: contexts.append(ctx))

    class Broken(Collect):
        def data_received(self, data):
            raise ZeroDivisionError("boom")

    async def main():
        a, b = socket.socketpair()
        _tr, proto = await loop.connect_accepted_socket(Broken, a)
        b.send(b"hello")
        await _wait_for(lambda: proto.lost is not None)
        exc = await proto.lost
        assert isinstance(exc, ZeroDivisionError)
        b.close()

    loop.run_until_complete(main())
    assert len(contexts) == 1
    assert contexts[0]["message"] == "Fatal error: protocol.data_received() call failed."
    assert isinstance(contexts[0]["exception"], ZeroDivisionError)
    assert contexts[0]["transport"] is not None


def test_context_of_protocol_callbacks_is_a_copy(loop):
    import contextvars

    var = contextvars.ContextVar("var", default="unset")
    seen = []

    class Ctx(Collect):
        def data_received(self, data):
            seen.append(var.get())
            var.set("changed in callback")

    async def main():
        var.set("creator")
        a, b = socket.socketpair()
        tr, _proto = await loop.connect_accepted_socket(Ctx, a)
        b.send(b"1")
        await _wait_for(lambda: len(seen) == 1)
        b.send(b"2")
        await _wait_for(lambda: len(seen) == 2)
        assert var.get() == "creator"
        tr.close()
        b.close()

    loop.run_until_complete(main())
    assert seen[0] == "creator"
    assert seen[1] == "changed in callback"


@pytest.mark.parametrize("buffered", [False, True])
def test_protocol_callbacks_from_an_empty_context_keep_one_context_each(loop, buffered):
    # Connections made from an empty context: each one's read callbacks share one
    # context of their own across calls (a token from one call resets in a later one),
    # separate from every other connection's and from the creator's.
    import contextvars

    count = contextvars.ContextVar("count", default=0)
    tokens = contextvars.ContextVar("tokens", default=None)

    def on_read(seen):
        seen.append(count.get())
        count.set(count.get() + 1)
        if tokens.get() is None:
            tokens.set(tokens.set("first"))
        elif len(seen) == 3:
            tokens.reset(tokens.get())  # ValueError from any other context
            seen.append(tokens.get())

    class Plain(Collect):
        def __init__(self):
            super().__init__()
            self.seen = []

        def data_received(self, data):
            on_read(self.seen)

    class Buffered(asyncio.BufferedProtocol):
        def __init__(self):
            self.seen = []
            self.buf = bytearray(64)

        def get_buffer(self, hint):
            count.set(count.get() + 100)  # visible to buffer_updated, then undone
            return self.buf

        def buffer_updated(self, nbytes):
            count.set(count.get() - 100)
            on_read(self.seen)

    async def main():
        pairs = [socket.socketpair() for _ in range(2)]
        made = [await loop.connect_accepted_socket(Buffered if buffered else Plain, a) for a, _ in pairs]
        for reads in (1, 2, 3):
            for _, b in pairs:
                b.send(b"x")
            await _wait_for(lambda n=reads: all(len(p.seen) >= n for _, p in made))
        assert count.get() == 0
        for (tr, _), (_, b) in zip(made, pairs):
            tr.close()
            b.close()
        await asyncio.sleep(0)
        return [p.seen for _, p in made]

    task = contextvars.Context().run(loop.create_task, main())
    assert loop.run_until_complete(task) == [[0, 1, 2, None]] * 2


def test_unclosed_transport_socket_is_closed_with_the_loop_gone(loop):
    # Closing the loop does not close transports (as in asyncio); closing the transport
    # afterwards must not raise and must release the socket.
    async def main():
        a, b = socket.socketpair()
        tr, _ = await loop.connect_accepted_socket(Collect, a)
        return tr, a, b

    tr, a, b = loop.run_until_complete(main())
    tr.abort()
    loop.run_until_complete(asyncio.sleep(0))
    assert a.fileno() == -1
    b.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loop.close()


def test_data_written_from_resume_writing_after_close_is_still_sent(loop):
    # sslproto does this: paused, it is closed, then writes its close_notify from
    # resume_writing() once the buffer drains. That write must reach the peer.
    class Late(Collect):
        def pause_writing(self):
            self.transport.close()

        def resume_writing(self):
            self.transport.write(b"FINAL")

    async def main():
        a, b = socket.socketpair()
        tr, proto = await loop.connect_accepted_socket(Late, a)
        big = b"p" * (4 * 1024 * 1024)
        tr.write(big)  # pauses (and so closes) with most of it still buffered
        assert tr.is_closing()
        b.setblocking(False)
        got = bytearray()
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
                continue
            if not chunk:
                break
            got += chunk
        assert bytes(got) == big + b"FINAL"
        await _wait_for(lambda: proto.lost is not None)
        b.close()

    loop.run_until_complete(asyncio.wait_for(main(), 30))
