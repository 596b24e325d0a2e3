"""The TLS handshake and shutdown steps (src/tls/handshake.rs): that they run on the
native path for a stock context, that a failing handshake raises exactly what asyncio
raises on either side, that the context's own features still apply, and that a peer
going away mid-handshake or never answering close_notify ends as in asyncio."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import threading

import ferroloop
import pytest
from ferroloop import _ferroloop

from tests.test_tls import client_context, server_context

certs = pytest.importorskip("test.test_asyncio.utils")
CERT, CA = certs.SIGNED_CERTFILE, certs.SIGNING_CA  # CN=localhost, signed by CA

OWN_SSLPROTO = (3, 11) <= sys.version_info < (3, 14)
NATIVE = OWN_SSLPROTO and _ferroloop.native_tls_unavailable() is None


class Calls:
    """Counts the calls of `ssl.SSLObject.do_handshake` and `.unwrap`, the methods
    asyncio's `_do_handshake` and `_do_shutdown` go through."""

    def __init__(self, monkeypatch):
        self.counts = {"do_handshake": 0, "unwrap": 0}
        for name in self.counts:
            original = getattr(ssl.SSLObject, name)
            monkeypatch.setattr(ssl.SSLObject, name, self.counted(name, original))

    def counted(self, name, original):
        def method(sslobj):
            self.counts[name] += 1
            return original(sslobj)

        return method


async def echo_once(server_ctx, client_ctx, **client_kwargs):
    """One connection: a 1 KiB echo, closed by the client and waited for on both
    sides. What the client's SSL object selected (ALPN)."""
    closed = asyncio.get_running_loop().create_future()

    async def serve(reader, writer):
        writer.write(await reader.readexactly(1024))
        await writer.drain()
        await reader.read()  # the client's close_notify
        writer.close()
        await writer.wait_closed()
        closed.set_result(None)

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    reader, writer = await asyncio.open_connection(
        *server.sockets[0].getsockname(), ssl=client_ctx, **client_kwargs
    )
    payload = os.urandom(1024)
    writer.write(payload)
    assert await reader.readexactly(1024) == payload
    alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    writer.close()
    await writer.wait_closed()
    await closed
    server.close()
    await server.wait_closed()
    return alpn


def test_handshake_and_shutdown_run_natively_for_a_stock_context(loop, loop_name, monkeypatch):
    calls = Calls(monkeypatch)
    loop.run_until_complete(
        asyncio.wait_for(echo_once(server_context(), client_context(), server_hostname="localhost"), 30)
    )
    if loop_name == "ferroloop" and NATIVE:
        assert calls.counts == {"do_handshake": 0, "unwrap": 0}
    else:
        # Both sides' handshakes; the client's close_notify at least.
        assert calls.counts["do_handshake"] >= 2
        assert calls.counts["unwrap"] >= 1


def test_sni_alpn_client_certificates_and_session_tickets_on_the_native_steps(
    loop, loop_name, monkeypatch
):
    calls = Calls(monkeypatch)
    names = []
    sctx = server_context()
    sctx.set_alpn_protocols(["h2", "http/1.1"])
    sctx.verify_mode = ssl.CERT_REQUIRED
    sctx.load_verify_locations(CA)
    sctx.sni_callback = lambda sslobj, name, ctx: names.append(name)
    cctx = client_context()
    cctx.set_alpn_protocols(["http/1.1"])
    cctx.load_cert_chain(CERT)
    selected = loop.run_until_complete(
        asyncio.wait_for(echo_once(sctx, cctx, server_hostname="localhost"), 30)
    )
    assert selected == "http/1.1"
    assert names == ["localhost"]
    assert sctx.session_stats()["accept_good"] == 1
    if loop_name == "ferroloop" and NATIVE:
        assert calls.counts["do_handshake"] == 0


def test_a_keylog_file_is_written_and_keeps_asyncios_steps(loop, loop_name, monkeypatch, tmp_path):
    calls = Calls(monkeypatch)
    keylog = tmp_path / "keys.log"
    cctx = client_context()
    cctx.keylog_filename = str(keylog)
    loop.run_until_complete(
        asyncio.wait_for(echo_once(server_context(), cctx, server_hostname="localhost"), 30)
    )
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_text()
    # The client's steps are asyncio's (a keylog write error is raised by `_ssl`'s own
    # method); the server's context has no keylog file.
    assert calls.counts["do_handshake"] >= 1


def outcome(exc):
    return (
        type(exc),
        str(exc),
        getattr(exc, "library", None),
        getattr(exc, "reason", None),
        getattr(exc, "verify_code", None),
        getattr(exc, "verify_message", None),
    )


async def server_handshake_error(server_ctx):
    """A TLS server whose failed handshakes are reported to the test (asyncio reports
    them to the exception handler in debug mode only) and the future of the first."""
    loop = asyncio.get_running_loop()
    loop.set_debug(True)
    got = loop.create_future()

    def handler(loop, context):
        if "exception" in context and not got.done():
            got.set_result(context["exception"])

    loop.set_exception_handler(handler)

    async def serve(reader, writer):
        await reader.read()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    return server, got


async def failed_handshake(side, server_ctx, client_ctx, server_hostname="localhost"):
    """The exception of the TLS handshake on `side` ("client" or "server")."""
    server, got = await server_handshake_error(server_ctx)
    try:
        _, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(), ssl=client_ctx, server_hostname=server_hostname
        )
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        client_exc = exc
    else:
        client_exc = None
        writer.close()
    exc = client_exc if side == "client" else await asyncio.wait_for(got, 30)
    server.close()
    return outcome(exc) if exc is not None else None


def untrusting_client():
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA: the server's is unknown


def tls12_only_client():
    ctx = client_context()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def tls13_only_server():
    ctx = server_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def cert_requiring_server():
    ctx = server_context()
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(CA)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # the refusal inside the handshake
    return ctx


HANDSHAKE_FAILURES = {
    "the client does not trust the certificate": ("client", server_context, untrusting_client, "localhost"),
    "the name does not match": ("client", server_context, client_context, "example.org"),
    "the server refuses the protocol version": ("server", tls13_only_server, tls12_only_client, "localhost"),
    "the server gets no client certificate": ("server", cert_requiring_server, client_context, "localhost"),
}


@pytest.mark.parametrize("what", sorted(HANDSHAKE_FAILURES))
def test_a_failed_handshake_raises_exactly_what_asyncio_raises(what, monkeypatch):
    side, server_ctx, client_ctx, name = HANDSHAKE_FAILURES[what]

    def run(runner):
        return runner(
            asyncio.wait_for(failed_handshake(side, server_ctx(), client_ctx(), name), 60)
        )

    expected = run(asyncio.run)
    assert expected is not None and issubclass(expected[0], ssl.SSLError)
    calls = Calls(monkeypatch)
    assert run(ferroloop.run) == expected
    if NATIVE:
        # Made by the native step, repeated through `_ssl`'s own method.
        assert calls.counts["do_handshake"] == 0
    if what == "the client does not trust the certificate":
        assert expected[0] is ssl.SSLCertVerificationError and expected[4] == 20


def client_hello():
    """The first flight of a TLS client, as bytes."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    sslobj = client_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        sslobj.do_handshake()
    return outgoing.read()


PEER_DOES_MID_HANDSHAKE = {
    "closes after half a ClientHello": lambda hello: hello[: len(hello) // 2],
    "closes after a whole ClientHello": lambda hello: hello,
    "sends plaintext HTTP": lambda hello: b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("what", sorted(PEER_DOES_MID_HANDSHAKE))
def test_a_peer_going_away_mid_handshake_ends_as_in_asyncio(what):
    sent = PEER_DOES_MID_HANDSHAKE[what](client_hello())

    async def main():
        server, got = await server_handshake_error(server_context())
        _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        writer.write(sent)
        await writer.drain()
        writer.write_eof()
        result = outcome(await asyncio.wait_for(got, 30))
        writer.close()
        server.close()
        return result

    expected = asyncio.run(main())
    assert issubclass(expected[0], OSError)
    assert ferroloop.run(main()) == expected


@pytest.mark.skipif(sys.version_info < (3, 11), reason="no ssl_shutdown_timeout before 3.11")
def test_a_peer_that_never_answers_close_notify_is_aborted_at_the_shutdown_timeout(loop):
    listener = socket.create_server(("127.0.0.1", 0))
    release = threading.Event()
    got_close_notify = []

    def silent_peer():
        conn, _ = listener.accept()
        tls = server_context().wrap_socket(conn, server_side=True)
        # The client's close_notify arrives under TLS, unanswered: read it raw.
        got_close_notify.append(socket.socket.recv(tls, 100))
        release.wait(30)
        tls.close()

    thread = threading.Thread(target=silent_peer, daemon=True)
    thread.start()

    async def main():
        lost = loop.create_future()

        class Client(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.set_result(exc)

        tr, _ = await loop.create_connection(
            Client, *listener.getsockname(), ssl=client_context(), server_hostname="localhost",
            ssl_shutdown_timeout=0.2,
        )
        tr.close()
        return await asyncio.wait_for(lost, 30)

    try:
        exc = loop.run_until_complete(main())
    finally:
        release.set()
        thread.join(30)
        listener.close()
    assert type(exc) is TimeoutError and str(exc) == "SSL shutdown timed out"
    # A close_notify alert record went out before the timeout.
    # One record went out before the timeout, a 2-byte alert (TLS 1.3 encrypts it:
    # type, tag and the inner content type make 19 bytes).
    assert got_close_notify and got_close_notify[0][:5] in (
        b"\x17\x03\x03\x00\x13", b"\x15\x03\x03\x00\x02"
    )


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_switched_off_the_steps_are_asyncios():
    script = (
        "import asyncio, ssl, ferroloop\n"
        "from tests.test_tls_handshake import echo_once, server_context, client_context\n"
        "counts = {'do_handshake': 0, 'unwrap': 0}\n"
        "for name in counts:\n"
        "    def wrap(original, name=name):\n"
        "        def method(self):\n"
        "            counts[name] += 1\n"
        "            return original(self)\n"
        "        return method\n"
        "    setattr(ssl.SSLObject, name, wrap(getattr(ssl.SSLObject, name)))\n"
        "ferroloop.run(echo_once(server_context(), client_context(), server_hostname='localhost'))\n"
        "print(counts['do_handshake'] >= 2, counts['unwrap'] >= 1)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        check=False, cwd=root, env={**os.environ, "FERROLOOP_NATIVE_TLS": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True"]


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_the_get_buffer_buffer_is_made_on_first_use(loop, loop_name):
    async def main():
        server = await asyncio.start_server(
            lambda r, w: w.close(), "127.0.0.1", 0, ssl=server_context()
        )
        _, writer = await asyncio.open_connection(
            *server.sockets[0].getsockname(), ssl=client_context(), server_hostname="localhost"
        )
        proto = writer.transport._ssl_protocol
        before = len(proto._ssl_buffer)
        view = proto.get_buffer(-1)
        sizes = before, len(view), len(proto._ssl_buffer), proto.max_size
        writer.close()
        server.close()
        return sizes

    before, view, after, max_size = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert max_size == 256 * 1024
    assert view == after == max_size
    # ferroloop's transport never calls get_buffer: its SSLProtocol leaves the 256 KiB
    # buffer asyncio makes for every connection to get_buffer's first call.
    assert before == (0 if loop_name == "ferroloop" and OWN_SSLPROTO else max_size)


@pytest.mark.skipif(not OWN_SSLPROTO, reason="asyncio's own sslproto runs on this version")
def test_start_tls_takes_the_native_path_on_both_sides(loop, loop_name, monkeypatch):
    calls = Calls(monkeypatch)

    async def main():
        paths = []

        async def serve(reader, writer):
            await writer.start_tls(server_context())
            paths.append(getattr(writer.transport._ssl_protocol, "_ferroloop_tls_path", None))
            writer.write(await reader.readexactly(4))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
        await writer.start_tls(client_context(), server_hostname="localhost")
        paths.append(getattr(writer.transport._ssl_protocol, "_ferroloop_tls_path", None))
        writer.write(b"ping")
        echoed = await reader.readexactly(4)
        writer.close()
        server.close()
        await server.wait_closed()
        return echoed, paths

    echoed, paths = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert echoed == b"ping"
    if loop_name == "ferroloop" and NATIVE:
        assert paths == ["libssl", "libssl"]
        assert calls.counts["do_handshake"] == 0
    else:
        assert calls.counts["do_handshake"] >= 2


@pytest.mark.skipif(
    sys.version_info < (3, 11), reason="3.10's sslproto does not wait for the peer's close_notify"
)
def test_a_peer_answering_close_notify_ends_the_shutdown_cleanly(loop):
    listener = socket.create_server(("127.0.0.1", 0))
    after_unwrap = []

    def answering_peer():
        conn, _ = listener.accept()
        tls = server_context().wrap_socket(conn, server_side=True)
        tls.sendall(b"hello")
        plain = tls.unwrap()  # reads the client's close_notify, answers with ours
        after_unwrap.append(plain.recv(100))  # then the client's TCP close: b""
        plain.close()

    thread = threading.Thread(target=answering_peer, daemon=True)
    thread.start()

    async def main():
        lost = loop.create_future()
        received = bytearray()

        class Client(asyncio.Protocol):
            def data_received(self, data):
                received.extend(data)
                if received == b"hello":
                    transport.close()

            def connection_lost(self, exc):
                lost.set_result(exc)

        transport, _ = await loop.create_connection(
            Client, *listener.getsockname(), ssl=client_context(), server_hostname="localhost"
        )
        return await asyncio.wait_for(lost, 30), bytes(received)

    try:
        exc, received = loop.run_until_complete(main())
        thread.join(30)
    finally:
        listener.close()
    assert (exc, received) == (None, b"hello")
    assert after_unwrap == [b""]


@pytest.mark.parametrize("debug", [False, True], ids=["", "debug"])
def test_a_silent_client_is_aborted_at_the_handshake_timeout(loop, debug, caplog):
    # The accepted connection's handshake starts (connection_made, _start_handshake:
    # logged in debug mode) and the client never sends its hello: the handshake timeout
    # aborts the connection, and in debug mode the accept reports the error.
    loop.set_debug(debug)
    reported = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    caplog.set_level("DEBUG", logger="asyncio")

    async def main():
        server = await loop.create_server(
            asyncio.Protocol, "127.0.0.1", 0, ssl=server_context(), ssl_handshake_timeout=0.2
        )
        client = socket.create_connection(server.sockets[0].getsockname())
        client.setblocking(False)
        try:
            closed = await asyncio.wait_for(loop.sock_recv(client, 100), 60)
        finally:
            client.close()
        server.close()
        await server.wait_closed()
        return closed

    assert loop.run_until_complete(main()) == b""
    started = [r for r in caplog.records if r.getMessage().endswith("starts SSL handshake")]
    assert len(started) == (1 if debug else 0)
    errors = [
        c for c in reported
        if c["message"] == "Error on transport creation for incoming connection"
    ]
    if debug:
        assert len(errors) == 1
        assert type(errors[0]["exception"]) is ConnectionAbortedError
        assert "SSL handshake is taking longer than 0.2 seconds" in str(errors[0]["exception"])
    else:
        assert errors == []
