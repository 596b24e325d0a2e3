"""TLS over the stream transport, on asyncio and ferroloop: byte-exact echo under
concurrency, verification failures as the ssl exceptions asyncio raises, SNI, ALPN,
client certificates, start_tls on both sides, the shutdown timeout and fd leaks."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import hashlib
import random
import socket
import ssl
import sys
import threading
import time
import weakref

import pytest

from tests.conftest import open_fds

certs = pytest.importorskip("test.test_asyncio.utils")
CERT, CA = certs.SIGNED_CERTFILE, certs.SIGNING_CA  # CN=localhost, signed by CA
SELF_SIGNED = certs.ONLYCERT, certs.ONLYKEY


def server_context(alpn=None, require_client_cert=False):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERT)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(CA)
    return ctx


def client_context(alpn=None, client_cert=False):
    ctx = ssl.create_default_context(cafile=CA)
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if client_cert:
        ctx.load_cert_chain(CERT)
    return ctx


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    writer.close()


def test_tls_echo_50_clients_random_sizes(loop):
    rng = random.Random(7)

    async def client(port, sizes):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
        )
        sent, got = hashlib.sha256(), hashlib.sha256()
        for size in sizes:
            body = rng.randbytes(size)
            sent.update(body)
            writer.write(body)
            got.update(await reader.readexactly(size))
        assert got.digest() == sent.digest()
        info = writer.get_extra_info
        assert isinstance(info("ssl_object"), ssl.SSLObject)
        assert info("peercert")["subject"][-1][0] == ("commonName", "localhost")
        assert info("cipher")[0]
        assert info("compression") is None
        assert isinstance(info("sslcontext"), ssl.SSLContext)
        # Names the TLS protocol does not keep come from the socket transport.
        assert info("peername") == ("127.0.0.1", port)
        assert info("sockname") == info("socket").getsockname()
        assert info("no such name") is None
        assert info("no such name", 7) == 7
        writer.close()
        await writer.wait_closed()
        # Closed, the socket transport is gone: only the protocol's names and defaults.
        assert isinstance(info("ssl_object"), ssl.SSLObject)
        assert info("peername", 7) == 7
        return sum(sizes)

    async def main():
        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        plans = [[int(2 ** rng.uniform(0, 18)) for _ in range(4)] for _ in range(50)]
        totals = await asyncio.gather(*(client(port, p) for p in plans))
        assert sum(totals) == sum(map(sum, plans))
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 120))


def test_failed_verification_is_the_ssl_exception_asyncio_raises(loop):
    async def main():
        bad = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        bad.load_cert_chain(*SELF_SIGNED)
        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=bad)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
        server.close()
        await server.wait_closed()

        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch|match"):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="not-localhost"
            )
        with pytest.raises(ValueError):
            await asyncio.open_connection("127.0.0.1", port, server_hostname="localhost")
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_sni_alpn_and_client_certificates(loop):
    async def main():
        seen_names = []
        ctx = server_context(alpn=["h2", "http/1.1"], require_client_cert=True)
        ctx.sni_callback = lambda sslobj, name, _ctx: seen_names.append(name)
        peers = []

        async def handler(reader, writer):
            peers.append(writer.get_extra_info("peercert"))
            await _echo(reader, writer)

        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(alpn=["http/1.1"], client_cert=True),
            server_hostname="localhost",
        )
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        assert seen_names == ["localhost"]
        assert peers and peers[0]["subject"][-1][0] == ("commonName", "localhost")
        writer.close()
        await writer.wait_closed()

        # Without a client certificate the server refuses the handshake.
        # (TLS 1.3 completes the client side first: the refusal can arrive as EOF.)
        with pytest.raises((ssl.SSLError, ConnectionResetError, asyncio.IncompleteReadError)):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            writer.write(b"x")
            await reader.readexactly(1)
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_start_tls_on_both_sides_and_stream_writer_start_tls(loop):
    async def main():
        upgraded = loop.create_future()

        async def handler(reader, writer):
            assert await reader.readline() == b"STARTTLS\n"
            writer.write(b"GO\n")
            await writer.drain()
            tr = await loop.start_tls(writer.transport, writer.transport.get_protocol(),
                                      server_context(), server_side=True)
            writer._transport = tr  # StreamWriter before 3.11 had no start_tls
            reader._transport = tr
            line = await reader.readline()
            tr.write(b"secure " + line)
            upgraded.set_result(tr.get_extra_info("ssl_object") is not None)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"STARTTLS\n")
        assert await reader.readline() == b"GO\n"
        if sys.version_info >= (3, 11):
            await writer.start_tls(client_context(), server_hostname="localhost")
        else:
            tr = await loop.start_tls(writer.transport, writer.transport.get_protocol(),
                                      client_context(), server_hostname="localhost")
            writer._transport = tr
            reader._transport = tr
        assert writer.get_extra_info("ssl_object") is not None
        writer.write(b"hello\n")
        assert await reader.readline() == b"secure hello\n"
        assert await upgraded is True
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_close_does_not_hang_on_a_peer_that_never_answers(loop):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    release = threading.Event()

    def silent_tls_server():
        conn, _ = listener.accept()
        tls = server_context().wrap_socket(conn, server_side=True)
        release.wait(30)  # handshake done; never reads again, never answers close_notify
        tls.close()

    thread = threading.Thread(target=silent_tls_server, daemon=True)
    thread.start()

    async def main():
        lost = loop.create_future()

        class Client(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.set_result(exc)

        timeout = {"ssl_shutdown_timeout": 0.5}
        if sys.version_info < (3, 11):
            # 3.10's TLS has no shutdown timeout: the argument is refused, close() waits
            # for the peer's close_notify, and only abort() lets go.
            with pytest.raises(TypeError, match="ssl_shutdown_timeout"):
                await loop.create_connection(
                    Client, "127.0.0.1", port, ssl=client_context(),
                    server_hostname="localhost", **timeout,
                )
            timeout = {}
        tr, _ = await loop.create_connection(
            Client, "127.0.0.1", port, ssl=client_context(), server_hostname="localhost",
            **timeout,
        )
        # Fill the peer's receive buffer so that our close_notify cannot even be sent.
        for _ in range(200):
            tr.write(b"z" * 65536)
        started = time.monotonic()
        tr.close()
        if sys.version_info < (3, 11):
            await asyncio.sleep(1)
            assert not lost.done()
            tr.abort()
        await asyncio.wait_for(lost, 20)
        return time.monotonic() - started

    try:
        elapsed = loop.run_until_complete(main())
        assert elapsed < 15  # let go after ssl_shutdown_timeout, not after the peer
    finally:
        release.set()
        thread.join(10)
        listener.close()


@pytest.mark.parametrize(
    "method", ["create_connection", "create_server", "create_unix_connection", "create_unix_server"]
)
def test_ssl_shutdown_timeout_taken_where_asyncio_takes_it(loop, method, tmp_path):
    # 3.11+: refused without ssl, as the handshake timeout; 3.10 has no such argument.
    where = (str(tmp_path / "sock"),) if "unix" in method else ("127.0.0.1", 0)
    expected = ValueError if sys.version_info >= (3, 11) else TypeError
    with pytest.raises(expected, match="ssl_shutdown_timeout"):
        call = getattr(loop, method)(asyncio.Protocol, *where, ssl_shutdown_timeout=1.0)
        loop.run_until_complete(call)


def test_1000_tls_connections_leak_no_fd(loop):
    async def main():
        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        ctx = client_context()

        async def one():
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
            )
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            writer.close()
            await writer.wait_closed()

        await one()
        await asyncio.sleep(0.05)
        before = open_fds()
        for _ in range(20):
            await asyncio.gather(*(one() for _ in range(50)))
        await asyncio.sleep(0.1)
        assert open_fds() == before
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 300))


def test_tls_protocols_and_transports_are_freed_once_closed(loop):
    # Every SSL protocol and app transport of 40 closed connections (both ends) is
    # gone after a collection: nothing of the TLS layer keeps them alive.
    refs = []

    async def handler(reader, writer):
        refs.append(weakref.ref(writer.transport))
        refs.append(weakref.ref(writer.transport._ssl_protocol))
        await _echo(reader, writer)

    async def main():
        server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]

        async def one(i):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
            )
            refs.append(weakref.ref(writer.transport))
            refs.append(weakref.ref(writer.transport._ssl_protocol))
            body = bytes([i]) * (1000 * i + 1)
            writer.write(body)
            assert await reader.readexactly(len(body)) == body
            writer.close()
            await writer.wait_closed()

        await asyncio.gather(*(one(i) for i in range(40)))
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)

    loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert len(refs) == 160
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []


def test_ssl_protocol_in_a_reference_cycle_is_collected(loop_name):
    # A cycle through the attributes the per-record path keeps (here the protocol as
    # its own transport and app protocol) is found by the collector.
    if loop_name == "ferroloop":
        from ferroloop._sslproto import SSLProtocol
    else:
        from asyncio.sslproto import SSLProtocol
    loop = asyncio.new_event_loop()
    try:
        proto = SSLProtocol(loop, asyncio.Protocol(), client_context(), None)
        proto._transport = proto
        proto._app_protocol = proto
        proto._write_backlog.append(proto)
        ref = weakref.ref(proto)
        del proto
        gc.collect()
        assert ref() is None
    finally:
        loop.close()


def test_tls_protocol_writes_flow_control_pause_and_close_notify(loop):
    # asyncio's SSLProtocol over the Rust transport: writelines, bad and empty writes,
    # writes far past the high-water mark (pause_writing while still writing, then
    # resume_writing as the peer reads), pause_reading, and the peer's close_notify
    # (eof_received, then connection_lost) must behave as on asyncio's own transport.
    big = random.Random(7).randbytes(4 << 20)
    events = []
    server_side = {}

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.got = bytearray()
            server_side["proto"] = self
            self.written = 0
            # A fixed send buffer: an autotuned one on loopback may take the whole
            # 4 MiB at once on some machines, and nothing would ever pause.
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            transport.set_write_buffer_limits(high=64 * 1024)
            with pytest.raises(TypeError) as info:
                transport.write("text")
            events.append(("bad write", str(info.value)))
            transport.write(b"")
            transport.writelines([b"hello ", bytearray(b"tls "), memoryview(b"world\n")])
            # In pieces: once the socket's transport pauses the TLS layer, the rest
            # waits in the TLS buffers, and the protocol is paused in turn.
            for i in range(0, len(big), 65536):
                transport.write(memoryview(big)[i : i + 65536])
                self.written = i + 65536

        def pause_writing(self):
            # Paused while connection_made is still writing, not later.
            events.append(("pause_writing", self.written < len(big)))

        def resume_writing(self):
            events.append("resume_writing")

        def data_received(self, data):
            self.got += data

        def eof_received(self):
            events.append(("eof_received", bytes(self.got)))

        def connection_lost(self, exc):
            events.append(("connection_lost", exc))

    async def main():
        server = await loop.create_server(Server, "127.0.0.1", 0, ssl=server_context())
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname="localhost"
        )
        assert await reader.readexactly(16) == b"hello tls world\n"
        await asyncio.sleep(0.05)  # the server is now held by the unread 4 MiB
        received = await reader.readexactly(len(big))
        transport = server_side["proto"].transport
        transport.pause_reading()
        writer.write(b"after pause")
        await writer.drain()
        await asyncio.sleep(0.05)
        assert bytes(server_side["proto"].got) == b""
        transport.resume_reading()
        await asyncio.sleep(0.05)
        writer.close()  # sends close_notify
        await writer.wait_closed()
        for _ in range(100):
            if any(e[0] == "connection_lost" for e in events if isinstance(e, tuple)):
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        return received

    assert loop.run_until_complete(main()) == big
    assert events[0] == ("bad write", "data: expecting a bytes-like instance, got str")
    assert events[1] == ("pause_writing", True)
    assert "resume_writing" in events
    if sys.version_info >= (3, 11):
        assert ("eof_received", b"after pause") in events
    else:
        # 3.10's sslproto answers the peer's close_notify by closing, without
        # eof_received.
        assert not any(e[0] == "eof_received" for e in events if isinstance(e, tuple))
        assert bytes(server_side["proto"].got) == b"after pause"
    assert events[-1] == ("connection_lost", None)


class _CountingSSLObject(ssl.SSLObject):
    """A subclass the server's context makes: its methods must be the ones called."""

    reads = 0

    def read(self, *args):
        type(self).reads += 1
        return super().read(*args)


def _tls_client_one_segment(port, chunks, replies):
    # Handshakes over memory BIOs, then sends every record of `chunks` and the
    # close_notify after them in one sendall, so the server receives many records, and
    # the end of the stream, per read. Keeps what the server sends until it closes.
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536) or b"")
    for chunk in chunks:
        tls.write(chunk)
    with pytest.raises(ssl.SSLWantReadError):
        tls.unwrap()  # queues the close_notify; the server's is still to come
    sock.sendall(outgoing.read())
    while data := sock.recv(65536):
        replies.append(data)
    sock.close()


@pytest.mark.parametrize("subclass", [False, True], ids=["SSLObject", "subclass"])
def test_tls_many_records_per_read_after_paused_reading_then_close_notify(loop, subclass):
    # The server reads nothing for 0.3 s while 3 MiB of records of random sizes (1 byte
    # to 40 KiB) arrive in one send with the close_notify right after them: once it
    # reads, each read finds many records, a batch holds more than 256 KiB of plaintext,
    # and the end of the stream comes in the same read as the last data. Every byte
    # must arrive once and in order, before eof_received, then connection_lost(None).
    rng = random.Random(11)
    chunks = []
    total = 0
    while total < 3 << 20:
        chunks.append(rng.randbytes(rng.choice([1, 7, 100, 1500, 16384, 16385, 40000])))
        total += len(chunks[-1])
    expected = b"".join(chunks)
    events = []
    _CountingSSLObject.reads = 0

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.got = bytearray()
            self.calls = 0
            transport.pause_reading()
            asyncio.get_running_loop().call_later(0.3, transport.resume_reading)

        def data_received(self, data):
            self.got += data
            self.calls += 1

        def eof_received(self):
            events.append(("eof", bytes(self.got) == expected, self.calls))

        def connection_lost(self, exc):
            events.append(("lost", exc))
            if sys.version_info < (3, 11):
                # 3.10's sslproto closes on the peer's close_notify, without
                # eof_received: what arrived is checked here instead.
                events.insert(0, ("closed", bytes(self.got) == expected, self.calls))

    async def main():
        ctx = server_context()
        if subclass:
            ctx.sslobject_class = _CountingSSLObject
        server = await loop.create_server(Server, "127.0.0.1", 0, ssl=ctx)
        port = server.sockets[0].getsockname()[1]
        replies = []
        await asyncio.to_thread(_tls_client_one_segment, port, chunks, replies)
        for _ in range(200):
            if len(events) == 2:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert events[0][:2] == ("eof", True) if sys.version_info >= (3, 11) else ("closed", True)
    if sys.version_info >= (3, 11):
        assert events[0][2] < len(chunks)  # records were read out in batches
    # (3.10's sslproto hands each record's plaintext to data_received on its own.)
    assert events[1] == ("lost", None)
    assert (_CountingSSLObject.reads > 0) == subclass


_side = contextvars.ContextVar("side", default=None)


@pytest.mark.parametrize("closer", ["client", "server"])
@pytest.mark.parametrize("buffered", [False, True], ids=["Protocol", "BufferedProtocol"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_protocol_callbacks_run_in_the_context_the_protocol_was_made_in(
    loop, tls, buffered, closer
):
    # A variable the protocol factory sets is seen by every callback of the protocol,
    # on both sides, with and without TLS: asyncio's transports schedule and run them
    # in copies of the context they were made in (connection_lost and resume_writing
    # included, whichever side ends the connection). Small socket buffers make the
    # server's write pause it.
    payload = random.Random(3).randbytes(1 << 20)
    seen = []

    class Recorder(asyncio.BufferedProtocol if buffered else asyncio.Protocol):
        def __init__(self, side, done):
            _side.set(side)
            self.side, self.done, self.got = side, done, bytearray()
            self.buf = bytearray(65536)

        def _record(self, name):
            seen.append((self.side, name, _side.get()))

        def connection_made(self, transport):
            self._record("connection_made")
            self.transport = transport
            if self.side == "server":
                sock = transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
                transport.set_write_buffer_limits(high=16384)
                # In pieces: TLS pauses the protocol once its transport is paused.
                for i in range(0, len(payload), 65536):
                    transport.write(payload[i : i + 65536])

        def _received(self, data):
            self.got += data
            if self.side == "client" and len(self.got) == len(payload):
                self.transport.write(b"done")
                if closer == "client":
                    self.transport.close()
            elif self.side == "server" and self.got == b"done" and closer == "server":
                self.transport.close()

        def data_received(self, data):
            self._record("data_received")
            self._received(data)

        def get_buffer(self, sizehint):
            self._record("get_buffer")
            return self.buf

        def buffer_updated(self, nbytes):
            self._record("buffer_updated")
            self._received(self.buf[:nbytes])

        def eof_received(self):
            self._record("eof_received")

        def pause_writing(self):
            self._record("pause_writing")

        def resume_writing(self):
            self._record("resume_writing")

        def connection_lost(self, exc):
            self._record("connection_lost")
            self.done.set_result(None)

    async def main():
        server_done, client_done = loop.create_future(), loop.create_future()
        server = await loop.create_server(
            lambda: Recorder("server", server_done),
            "127.0.0.1",
            0,
            ssl=server_context() if tls else None,
        )
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.setblocking(False)
        await loop.sock_connect(sock, server.sockets[0].getsockname())
        await loop.create_connection(
            lambda: Recorder("client", client_done),
            sock=sock,
            ssl=client_context() if tls else None,
            server_hostname="localhost" if tls else None,
        )
        await asyncio.wait_for(asyncio.gather(server_done, client_done), 10)
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())
    assert [entry for entry in seen if entry[0] != entry[2]] == []
    received = "buffer_updated" if buffered else "data_received"
    for side in ("client", "server"):
        names = {name for who, name, _ in seen if who == side}
        assert {"connection_made", received, "connection_lost"} <= names, side
    peer = "server" if closer == "client" else "client"
    # 3.10's sslproto closes on the peer's close_notify without calling eof_received.
    eof_expected = not (tls and sys.version_info < (3, 11))
    assert ("eof_received" in {n for who, n, _ in seen if who == peer}) is eof_expected
    assert {"pause_writing", "resume_writing"} <= {n for w, n, _ in seen if w == "server"}


@pytest.mark.skipif(sys.version_info >= (3, 11), reason="3.11+ asyncio takes the argument")
@pytest.mark.parametrize(
    "method", ["create_connection", "create_server", "create_unix_connection", "create_unix_server"]
)
def test_ssl_shutdown_timeout_none_is_refused_before_3_11(loop, method, tmp_path):
    # 3.10's loop methods have no such parameter: passing it at all is a TypeError.
    where = (str(tmp_path / "sock"),) if "unix" in method else ("127.0.0.1", 0)
    with pytest.raises(TypeError, match="ssl_shutdown_timeout"):
        loop.run_until_complete(
            getattr(loop, method)(asyncio.Protocol, *where, ssl_shutdown_timeout=None)
        )
