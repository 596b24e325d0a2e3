"""A BufferedProtocol over TLS: the plaintext lands in the protocol's own buffer
(`get_buffer`/`buffer_updated`), byte for byte, whatever the buffer's size, and a
failing `get_buffer` or an unwritable buffer ends the connection as asyncio ends it.
ferroloop decrypts the records straight into the buffer's memory (`tls.rs`,
`do_read_buffered`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys
from unittest import mock

import pytest
from ferroloop import _ferroloop, _sslproto

certs = pytest.importorskip("test.test_asyncio.utils")

DATA = os.urandom(3 * 1024 * 1024 + 777)
NATIVE = (3, 11) <= sys.version_info < (3, 14) and _ferroloop.native_tls_unavailable() is None

# Before 3.11 asyncio's older sslproto (which ferroloop runs as it is there) ends the
# stream without eof_received here, and reports a failing get_buffer otherwise.
pytestmark = pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio's sslproto of 3.11+")


def contexts():
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(certs.SIGNED_CERTFILE)
    client = ssl.create_default_context(cafile=certs.SIGNING_CA)
    return server, client


class Collect(asyncio.BufferedProtocol):
    """Gathers what comes through a buffer of `size` bytes (a memoryview, whose slices
    asyncio's buffered read writes through) until end of stream."""

    def __init__(self, size, done):
        self.view = memoryview(bytearray(size))
        self.received = bytearray()
        self.done = done
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        self.received += self.view[:nbytes]

    def eof_received(self):
        self.done.set_result(bytes(self.received))

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before end of stream"))


async def receive_through(loop, make_protocol, payload=DATA):
    """A TLS server sends `payload` and closes; the client's protocol is
    `make_protocol(done)`. The protocol's future's outcome, and the client's TLS path."""
    server_ctx, client_ctx = contexts()

    async def handler(reader, writer):
        writer.write(payload)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    done = loop.create_future()
    transport, _ = await loop.create_connection(
        lambda: make_protocol(done), *server.sockets[0].getsockname(),
        ssl=client_ctx, server_hostname="localhost",
    )
    path = getattr(transport._ssl_protocol, "_ferroloop_tls_path", None)
    try:
        return await asyncio.wait_for(done, 30), path
    finally:
        transport.close()
        server.close()
        await server.wait_closed()


def python_reads_refused(loop_name):
    """On ferroloop's native path asyncio's `_do_read__buffered` does not run: a call
    fails the test."""
    if loop_name == "ferroloop" and NATIVE:
        return mock.patch.object(
            _sslproto.SSLProtocol, "_do_read__buffered", side_effect=AssertionError("Python read")
        )
    return contextlib.nullcontext()


# A buffer of a few bytes takes one loop iteration per fill: a shorter payload there.
@pytest.mark.parametrize(
    ("size", "length"),
    [(256 * 1024, len(DATA)), (65536, len(DATA)), (16384, len(DATA)), (1000, 300_000), (7, 40_000), (1, 20_000)],
)
def test_a_buffered_protocol_receives_every_byte(loop, loop_name, size, length):
    payload = DATA[:length]
    with python_reads_refused(loop_name):
        got, path = loop.run_until_complete(
            receive_through(loop, lambda done: Collect(size, done), payload)
        )
    assert got == payload
    if loop_name == "ferroloop" and NATIVE:
        assert path == "libssl"


class Failing(Collect):
    """`get_buffer` raises on its first call, or returns what `buffer` makes."""

    def __init__(self, done, buffer=None):
        super().__init__(1024, done)
        self.buffer = buffer
        self.lost = None
        self.raised = ValueError("no buffer today")

    def get_buffer(self, sizehint):
        if self.buffer is None:
            raise self.raised
        return self.buffer()

    def connection_lost(self, exc):
        self.lost = exc
        super().connection_lost(exc)


@pytest.mark.parametrize(
    ("buffer", "expected"),
    [
        (None, ValueError),  # get_buffer raises
        (lambda: b"x" * 100, TypeError),  # a read-only buffer
    ],
)
def test_a_bad_get_buffer_ends_the_connection_as_asyncio_does(loop, buffer, expected):
    contexts_seen = []
    loop.set_exception_handler(lambda _loop, context: contexts_seen.append(context))
    protocols = []

    def make(done):
        protocols.append(Failing(done, buffer))
        return protocols[0]

    with pytest.raises(expected) as caught:
        loop.run_until_complete(receive_through(loop, make))
    protocol = protocols[0]
    assert protocol.lost is caught.value
    if buffer is None:
        assert caught.value is protocol.raised
    assert [(c["message"], c["exception"]) for c in contexts_seen] == [
        ("Fatal error on SSL protocol", caught.value)
    ]
