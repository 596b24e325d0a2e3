"""TLS records read and written through libssl natively (src/libssl.rs): which
connections take that path, that what a peer's bad records raise is exactly what
asyncio raises, and that the whole TLS suite passes with the path switched off."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import ferroloop
import pytest
from ferroloop import _ferroloop

from tests.test_tls import _echo, client_context, server_context

certs = pytest.importorskip("test.test_asyncio.utils")
CERT = certs.SIGNED_CERTFILE

# ferroloop's own SSLProtocol (and so the native path) is used where asyncio's
# sslproto is the one it follows; elsewhere asyncio's classes run as they are.
OWN_SSLPROTO = (3, 11) <= sys.version_info < (3, 14)
ROOT = Path(__file__).resolve().parents[1]


def tls_server_then(lsock, after_handshake):
    """Accepts one connection on a blocking stdlib TLS socket, says hello, reads five
    bytes, then writes `after_handshake` raw to the TCP socket under the TLS layer
    (None: closes TCP without close_notify)."""
    conn, _ = lsock.accept()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(CERT)
    with ctx.wrap_socket(conn, server_side=True) as tls:
        tls.sendall(b"hello")
        tls.recv(5)
        if after_handshake is None:
            socket.socket.shutdown(tls, socket.SHUT_RDWR)  # no close_notify
            return
        os.write(tls.fileno(), after_handshake)
        try:
            tls.recv(10)
        except (OSError, ssl.SSLError):
            pass


async def outcome_of(after_handshake):
    """What the client's reader gets once the peer sent `after_handshake`."""
    lsock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=tls_server_then, args=(lsock, after_handshake))
    thread.start()
    try:
        reader, writer = await asyncio.open_connection(
            *lsock.getsockname(), ssl=client_context(), server_hostname="localhost"
        )
        path = getattr(writer.transport._ssl_protocol, "_ferroloop_tls_path", None)
        assert await reader.readexactly(5) == b"hello"
        writer.write(b"12345")
        try:
            got = ("data", await asyncio.wait_for(reader.read(100), 30))
        except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
            got = (type(exc), str(exc), getattr(exc, "library", None), getattr(exc, "reason", None))
        writer.close()
        return got, path
    finally:
        await asyncio.to_thread(thread.join, 30)
        lsock.close()


PEER_SENDS = {
    "a record that fails to decrypt": b"\x17\x03\x03\x00\x20" + b"\x00" * 32,
    "plaintext HTTP": b"GET / HTTP/1.1\r\n\r\n",
    "a fatal alert in clear": b"\x15\x03\x03\x00\x02\x02\x28",
    "a TCP close without close_notify": None,
}


@pytest.mark.parametrize("what", sorted(PEER_SENDS))
def test_a_bad_peer_gets_exactly_what_asyncio_raises(what):
    expected, _ = asyncio.run(outcome_of(PEER_SENDS[what]))
    got, path = ferroloop.run(outcome_of(PEER_SENDS[what]))
    assert got == expected
    if OWN_SSLPROTO and _ferroloop.native_tls_unavailable() is None:
        assert path == "libssl"


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_the_path_is_libssl_unless_switched_off():
    script = (
        "import asyncio, ssl, ferroloop\n"
        "from ferroloop import _ferroloop\n"
        "from test.test_asyncio import utils as u\n"
        "async def main():\n"
        "    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n"
        "    sctx.load_cert_chain(u.SIGNED_CERTFILE)\n"
        "    seen = []\n"
        "    async def serve(r, w):\n"
        "        seen.append(w.transport._ssl_protocol._ferroloop_tls_path)\n"
        "        w.write(await r.read(100)); await w.drain(); w.close()\n"
        "    srv = await asyncio.start_server(serve, '127.0.0.1', 0, ssl=sctx)\n"
        "    cctx = ssl.create_default_context(cafile=u.SIGNING_CA)\n"
        "    r, w = await asyncio.open_connection(*srv.sockets[0].getsockname(),\n"
        "                                         ssl=cctx, server_hostname='localhost')\n"
        "    seen.append(w.transport._ssl_protocol._ferroloop_tls_path)\n"
        "    w.write(b'ping'); echoed = await r.read(100); w.close()\n"
        "    srv.close(); await srv.wait_closed()\n"
        "    print(_ferroloop.native_tls_unavailable(), seen, echoed)\n"
        "ferroloop.run(main())\n"
    )

    def run(**env):
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **env},
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    assert run() == "None ['libssl', 'libssl'] b'ping'"
    off = "_ssl: FERROLOOP_NATIVE_TLS=0"
    assert run(FERROLOOP_NATIVE_TLS="0") == f"FERROLOOP_NATIVE_TLS=0 ['{off}', '{off}'] b'ping'"


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_an_sslobject_subclass_stays_on_ssl_methods(loop, loop_name, caplog):
    class Object(ssl.SSLObject):
        pass

    caplog.set_level(logging.DEBUG, logger="ferroloop")

    async def main():
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(CERT)
        sctx.sslobject_class = Object

        async def serve(reader, writer):
            writer.write(await reader.read(100))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=sctx)
        reader, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(), ssl=client_context(), server_hostname="localhost"
        )
        writer.write(b"ping")
        assert await reader.read(100) == b"ping"
        writer.close()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 30))
    # The connection's own reason (a process-wide one, FERROLOOP_NATIVE_TLS=0, may be
    # logged too).
    fallbacks = [r.getMessage() for r in caplog.records if "is not ssl.SSLObject" in r.getMessage()]
    if loop_name == "ferroloop":
        # The server's subclass only: the client's stock object takes the native path.
        assert fallbacks == [
            "TLS records through _ssl's methods, not libssl directly: Object is not ssl.SSLObject"
        ]
    else:
        assert fallbacks == []


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_the_tls_suite_passes_with_the_native_path_switched_off():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
         "tests/test_tls.py", "tests/test_tls_sendfile.py", "tests/test_tls_buffered.py"],
        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT,
        env={**os.environ, "FERROLOOP_NATIVE_TLS": "0"},
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def send_records_cut(port, payloads, cuts):
    """A client speaking TLS over memory BIOs on a plain socket: one record per payload,
    their ciphertext sent cut into pieces of the sizes `cuts` cycles through (records
    split across reads, several in one read), then the echo read back until complete."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(30)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")

    def receive():
        data = sock.recv(65536)
        assert data, "the server closed the connection"
        incoming.write(data)

    with sock:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                receive()
        sock.sendall(outgoing.read())
        for payload in payloads:
            tls.write(payload)
        wire = outgoing.read()
        at, i = 0, 0
        while at < len(wire):
            sock.sendall(wire[at : at + cuts[i % len(cuts)]])
            at += cuts[i % len(cuts)]
            i += 1
        expected = b"".join(payloads)
        got = bytearray()
        while len(got) < len(expected):
            receive()
            while True:
                try:
                    got += tls.read(65536)
                except ssl.SSLWantReadError:
                    break
        return bytes(got)


class BufferedEcho(asyncio.BufferedProtocol):
    """Echoes through a 100-byte buffer, so a read fills it and asks for another."""

    def connection_made(self, transport):
        self.transport = transport
        self.buf = memoryview(bytearray(100))

    def get_buffer(self, sizehint):
        # A memoryview: asyncio fills the rest of a buffer through `buf[offset:]`,
        # which of a bytearray is a copy.
        return self.buf

    def buffer_updated(self, nbytes):
        self.transport.write(bytes(self.buf[:nbytes]))


@pytest.mark.parametrize("app", ["streams", "buffered"])
def test_records_cut_anywhere_echo_whole(loop, app):
    # Record by record the reads stop when the TLS object and its BIO are drained;
    # records cut across reads or bunched in one must still all come out, in order.
    payloads = [bytes([i % 251]) * size for i, size in enumerate([1, 5, 700, 1, 16384, 33, 4000, 2])]
    cuts = [1, 7, 300, 5000, 2, 16000, 90]

    async def main():
        sctx = server_context()

        if app == "streams":
            server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=sctx)
        else:
            server = await asyncio.get_running_loop().create_server(BufferedEcho, "127.0.0.1", 0, ssl=sctx)
        try:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.to_thread(send_records_cut, port, payloads, cuts)
        finally:
            server.close()

    assert loop.run_until_complete(asyncio.wait_for(main(), 60)) == b"".join(payloads)


def test_a_patched_transport_write_gets_the_records(loop):
    # A patch on the transport instance (as mock.patch.object puts it) is called with
    # the records, as asyncio's SSLProtocol calls it: no path sends them past `write`.
    async def main():
        sctx = server_context()

        server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=sctx)
        reader, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(), ssl=client_context(), server_hostname="localhost"
        )
        transport = writer.transport._ssl_protocol._transport
        sent = []
        real_write = transport.write

        def write(data):
            sent.append(bytes(data))
            real_write(data)

        with mock.patch.object(transport, "write", write):
            writer.write(b"ping" * 1000)
            echoed = await reader.readexactly(4000)
        writer.write(b"pong")
        echoed += await reader.readexactly(4)
        writer.close()
        server.close()
        return echoed, sent

    echoed, sent = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert echoed == b"ping" * 1000 + b"pong"
    # One application-data record (type 23) of at least the 4000 bytes written, and
    # nothing through the patch once it is removed.
    assert len(sent) == 1
    assert sent[0][0] == 23 and len(sent[0]) > 4000
