"""loop.sendfile over a TLS transport: asyncio's fallback semantics (bytes sent, file
position, ordering with writes around it, a peer that goes away), which ferroloop keeps
while reading and encrypting the file natively (`Loop._sendfile_fallback`)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import socket
import ssl
import struct
import sys
from asyncio import base_events
from unittest import mock

import pytest
from ferroloop import _ferroloop

from tests.conftest import open_fds

certs = pytest.importorskip("test.test_asyncio.utils")

# Several blocks of the native path (256 KiB), with a tail shorter than one.
DATA = os.urandom(3 * 1024 * 1024 + 12345)
NATIVE = (3, 11) <= sys.version_info < (3, 14) and _ferroloop.native_tls_unavailable() is None


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(DATA)
    return path


def contexts():
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.SIGNED_CERTFILE)
    client = ssl.create_default_context(cafile=certs.SIGNING_CA)
    return server, client


async def tls_pair(handler):
    """A TLS server running `handler` and a client connected to it."""
    server_ctx, client_ctx = contexts()
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    reader, writer = await asyncio.open_connection(
        *server.sockets[0].getsockname(), ssl=client_ctx, server_hostname="localhost"
    )
    return server, reader, writer


async def close(writer, server):
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


def received_from(loop, send):
    """What a TLS client receives from a server that runs `await send(transport)` and
    closes."""
    async def main():
        async def handler(reader, writer):
            await send(writer.transport)
            writer.close()

        server, reader, writer = await tls_pair(handler)
        got = await reader.read()
        await close(writer, server)
        return got

    return loop.run_until_complete(asyncio.wait_for(main(), 60))


def no_executor(loop, loop_name):
    """On ferroloop's native path the file is not read in the executor (asyncio's
    fallback reads it there): a read there fails the test."""
    if loop_name == "ferroloop" and NATIVE:
        return mock.patch.object(loop, "run_in_executor", side_effect=AssertionError("executor used"))
    return mock.patch.object(loop, "run_in_executor", wraps=loop.run_in_executor)


async def send_and_receive(loop, data_file, offset, count, start_at):
    """The server sends `head:`, the file by sendfile, `:tail`; the client gets it all.
    What came, sendfile's result and the file position after it."""
    expected_len = {}
    outcome = {}

    async def handler(reader, writer):
        with open(data_file, "rb") as f:
            f.seek(start_at)
            writer.write(b"head:")
            outcome["sent"] = await loop.sendfile(writer.transport, f, offset=offset, count=count)
            outcome["tell"] = f.tell()
        writer.write(b":tail")
        await writer.drain()
        # The protocol is the stream's again: it reads what the client says.
        outcome["said"] = await reader.readexactly(3)
        writer.close()

    server, reader, writer = await tls_pair(handler)
    start = offset if offset else start_at
    expected_len["n"] = min(count or len(DATA), len(DATA) - start)
    got = await reader.readexactly(5 + expected_len["n"] + 5)
    writer.write(b"bye")
    assert await reader.read() == b""
    await close(writer, server)
    return got, outcome


@pytest.mark.parametrize(
    ("offset", "count", "start_at"),
    [
        (0, None, 0),
        (1000, 500_000, 0),
        (12345, None, 777),
        (0, 1, 0),
        (5, len(DATA) * 2, 0),
        (0, None, 100),  # asyncio reads on from the file's position when offset is 0
        (0, 256 * 1024, 0),
    ],
)
def test_sendfile_sends_what_asyncio_sends(loop, loop_name, data_file, offset, count, start_at):
    with no_executor(loop, loop_name):
        got, outcome = loop.run_until_complete(
            asyncio.wait_for(send_and_receive(loop, data_file, offset, count, start_at), 60)
        )
    start = offset if offset else start_at
    body = DATA[start:][: count or len(DATA)]
    assert got[:5] == b"head:" and got[-5:] == b":tail"
    assert hashlib.sha256(got[5:-5]).hexdigest() == hashlib.sha256(body).hexdigest()
    assert outcome["sent"] == len(body)
    # asyncio's fallback leaves the position at offset + bytes sent (even when it read
    # from a position other than 0 with offset 0).
    assert outcome["tell"] == offset + len(body)
    assert outcome["said"] == b"bye"


def test_sendfile_of_an_empty_file_and_of_a_non_file(loop, tmp_path):
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")

    results = []

    async def send(transport):
        with open(empty, "rb") as f:
            results.append((await loop.sendfile(transport, f), f.tell()))
        buffer = io.BytesIO(DATA[:100_000])
        results.append((await loop.sendfile(transport, buffer, offset=10), buffer.tell()))

    got = received_from(loop, send)
    assert got == DATA[10:100_000]
    assert results == [(0, 0), (99_990, 100_000)]


def test_sendfile_of_a_compressed_file_sends_what_it_reads(loop, tmp_path):
    """A gzip file's fileno() is the compressed file below it: what is sent is what the
    file object reads, not the bytes behind its fd."""
    path = tmp_path / "payload.gz"
    with gzip.open(path, "wb") as f:
        f.write(DATA[:600_000])

    results = []

    async def send(transport):
        with gzip.open(path, "rb") as f:
            results.append((await loop.sendfile(transport, f), f.tell()))

    got = received_from(loop, send)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(DATA[:600_000]).hexdigest()
    assert results == [(600_000, 600_000)]


def test_repeated_sendfiles_leave_no_fd_behind(loop, data_file):
    async def send(transport):
        with open(data_file, "rb") as f:
            for _ in range(3):
                await loop.sendfile(transport, f, offset=1, count=300_000)

    received_from(loop, send)  # warm-up: lazy imports, executor
    before = open_fds()
    for _ in range(5):
        got = received_from(loop, send)
        assert got == DATA[1:300_001] * 3
    assert open_fds() == before


def test_a_write_patched_on_the_tcp_transport_sees_every_record(loop, data_file):
    # asyncio hands every record to the TCP transport's `write`; ferroloop's native
    # sendfile sends its records itself only when that `write` is the transport's own.
    records = []

    async def send(transport):
        tcp = transport._ssl_protocol._transport
        real_write = tcp.write

        def write(data):
            records.append(bytes(data))
            real_write(data)

        with open(data_file, "rb") as f, mock.patch.object(tcp, "write", write):
            assert await loop.sendfile(transport, f) == len(DATA)

    got = received_from(loop, send)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(DATA).hexdigest()
    # Application-data records (type 23) carrying at least the file: its bytes plus
    # each record's header and tag.
    ciphertext = b"".join(records)
    assert ciphertext[0] == 23
    assert len(ciphertext) > len(DATA) + 5 * (len(DATA) // 16384)


# 3.10's sslproto fails there with an AttributeError of its own (resume_reading on a
# transport already gone), on both loops.
@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio's sslproto of 3.11+")
def test_a_peer_that_goes_away_midway_fails_sendfile(loop, tmp_path):
    # Larger than the socket buffers of both ends together: sendfile is still sending
    # when the peer resets the connection.
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.writelines(DATA[: 1 << 20] for _ in range(48))

    async def main():
        failed = loop.create_future()

        async def handler(reader, writer):
            with open(big, "rb") as f:
                try:
                    await loop.sendfile(writer.transport, f)
                except Exception as exc:  # noqa: BLE001 - the exception is the result
                    failed.set_result((exc, f.tell()))
                else:
                    failed.set_result((None, f.tell()))
            writer.close()

        server, reader, writer = await tls_pair(handler)
        await reader.readexactly(1 << 20)
        sock = writer.get_extra_info("socket")
        # Unread data in the receive buffer and no linger: the close resets.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        exc, tell = await failed
        server.close()
        await server.wait_closed()
        return exc, tell

    exc, tell = loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert isinstance(exc, ConnectionError), repr(exc)
    assert (1 << 20) <= tell < 48 << 20


def test_sendfile_on_a_closing_transport_raises(loop, data_file):
    async def main():
        outcome = loop.create_future()

        async def handler(reader, writer):
            writer.close()
            with open(data_file, "rb") as f:
                try:
                    await loop.sendfile(writer.transport, f)
                except RuntimeError as exc:
                    outcome.set_result((str(exc), f.tell()))

        server, _, writer = await tls_pair(handler)
        got = await outcome
        await close(writer, server)
        return got

    message, tell = loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert message == "Transport is closing"
    assert tell == 0


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio's sslproto of 3.11+ (its BIOs)")
def test_sendfile_to_a_peer_that_does_not_read_buffers_little(loop, tmp_path):
    # The peer reads nothing until sendfile has paused and the loop has run on for a
    # while: what the sender holds then (the TCP transport's buffer and the TLS
    # object's outgoing BIO) stays near the water marks, not the file's size.
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.writelines(DATA[: 1 << 20] for _ in range(32))
    expected = hashlib.sha256(big.read_bytes()).hexdigest()

    async def main():
        paused = asyncio.Event()
        pause = base_events._SendfileFallbackProtocol.pause_writing

        def pause_writing(self):
            paused.set()
            pause(self)

        async def handler(reader, writer):
            with open(big, "rb") as f:
                sent = await loop.sendfile(writer.transport, f)
            writer.close()
            return sent

        senders = []

        def start(reader, writer):
            senders.append((writer.transport._ssl_protocol, asyncio.ensure_future(handler(reader, writer))))

        server, reader, writer = await tls_pair(start)
        with mock.patch.object(base_events._SendfileFallbackProtocol, "pause_writing", pause_writing):
            await paused.wait()
            for _ in range(100):
                await asyncio.sleep(0)
            ssl_protocol, sending = senders[0]
            held = ssl_protocol._transport.get_write_buffer_size() + ssl_protocol._outgoing.pending
            digest = hashlib.sha256()
            while chunk := await reader.read(1 << 20):
                digest.update(chunk)
        sent = await sending
        await close(writer, server)
        return held, sent, digest.hexdigest()

    held, sent, digest = loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert sent == 32 << 20
    assert digest == expected
    assert held < 2 << 20, held


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio's sslproto of 3.11+ (its BIOs)")
def test_a_sendfile_that_fills_the_socket_keeps_the_order_of_the_stream(loop, tmp_path):
    # The peer reads nothing until sendfile has paused: the socket filled part way
    # through a chunk. What the peer then reads is the write before, the whole file
    # and the write after, in that order. The file is larger than what the socket
    # buffers of both ends hold without the peer reading.
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        fh.writelines(DATA[: 1 << 20] for _ in range(32))
    body = big.read_bytes()

    async def main():
        paused = asyncio.Event()
        pause = base_events._SendfileFallbackProtocol.pause_writing
        outcome = {}

        def pause_writing(self):
            paused.set()
            pause(self)

        async def handler(reader, writer):
            writer.write(b"head:")
            with open(big, "rb") as f:
                outcome["sent"] = await loop.sendfile(writer.transport, f)
                outcome["tell"] = f.tell()
            writer.write(b":tail")
            await writer.drain()
            writer.close()

        server, reader, writer = await tls_pair(handler)
        with mock.patch.object(base_events._SendfileFallbackProtocol, "pause_writing", pause_writing):
            await paused.wait()
            got = await reader.read()
        await close(writer, server)
        return got, outcome

    got, outcome = loop.run_until_complete(asyncio.wait_for(main(), 60))
    assert got[:5] == b"head:" and got[-5:] == b":tail"
    assert hashlib.sha256(got[5:-5]).hexdigest() == hashlib.sha256(body).hexdigest()
    assert outcome == {"sent": len(body), "tell": len(body)}
