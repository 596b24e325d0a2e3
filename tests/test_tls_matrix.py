"""The TLS matrix (issue 18): every `ssl.SSLContext` setting, `get_extra_info`, bad
certificates and bad peers, data under flow control, half-close, `start_tls` and many
connections, over TLS on stock asyncio and ferroloop from one body, with certificates
from trustme.

An exception a client's handshake ends with is compared with the one the `ssl` module
gives for the same two contexts handshaking over memory BIOs, without any loop: both
loops must raise exactly that. asyncio's server refuses a handshake without sending the
alert OpenSSL made, so a refusal is checked twice: from the loop's server (the client
sees the connection end) and from the ssl module's blocking server (the client raises
the alert). Peers whose behaviour is under test (no close_notify, garbage, a silent
server) run in a thread on blocking sockets, so they do not depend on the loop.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
import hashlib
import os
import random
import re
import socket
import ssl
import sys
import threading

import pytest
import trustme

from tests.conftest import open_fds


class PKI:
    """A CA the clients trust, its server and client certificates, and the bad ones."""

    def __init__(self, directory):
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.other_name = self.ca.issue_cert("other.example")
        self.client = self.ca.issue_cert("client.example", common_name="client")
        self.untrusted_ca = trustme.CA()
        self.untrusted = self.untrusted_ca.issue_cert("localhost")
        self.untrusted_client = self.untrusted_ca.issue_cert("client.example")
        now = datetime.datetime.now(datetime.timezone.utc)
        self.expired = self.ca.issue_cert(
            "localhost",
            not_before=now - datetime.timedelta(days=2),
            not_after=now - datetime.timedelta(days=1),
        )
        self.ca_file = str(directory / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def server_context(self, cert=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (cert or self.server).configure_cert(ctx)
        return ctx

    def client_context(self, cert=None):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ca.configure_trust(ctx)
        if cert is not None:
            cert.configure_cert(ctx)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


def describe(exc):
    """What a caller can see of an exception: its type and every attribute the ssl
    module sets. The `(_ssl.c:N)` suffix names a line of CPython's C source, not the
    error, and is left out."""
    return (
        type(exc),
        exc.args[0] if exc.args else None,
        re.sub(r" \(_ssl\.c:\d+\)$", "", str(exc)),
        getattr(exc, "reason", None),
        getattr(exc, "library", None),
        getattr(exc, "verify_code", None),
        getattr(exc, "verify_message", None),
    )


def reference_handshake(client_ctx, server_ctx, server_hostname="localhost"):
    """The client's exception (or None) when the two contexts handshake over memory
    BIOs, as the ssl module alone gives it: from its handshake, or, where only the
    server's failed (TLS 1.3 completes the client's first), from its first read."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname=server_hostname)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    ends = {"client": (client, c_out, s_in), "server": (server, s_out, c_in)}
    done, failed = set(), {}
    for _ in range(10):  # a handshake takes at most three flights each way
        for name, (obj, out, peer_in) in ends.items():
            if name not in done and name not in failed:
                try:
                    obj.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError as exc:
                    failed[name] = exc
            peer_in.write(out.read())
        if "client" in failed:
            return failed["client"]
    assert len(done) + len(failed) == 2, (done, failed)
    if "server" in failed:
        try:
            client.read(1)
        except ssl.SSLError as exc:
            return exc
    return None


async def _echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    writer.close()


async def serve(ctx, handler=_echo, **kwargs):
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx, **kwargs)
    return server, server.sockets[0].getsockname()[1]


async def stop(server):
    server.close()
    await server.wait_closed()


async def connect(port, ctx, server_hostname="localhost"):
    return await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=server_hostname
    )


async def ping(reader, writer, body=b"ping"):
    writer.write(body)
    assert await reader.readexactly(len(body)) == body


async def close(writer):
    writer.close()
    await writer.wait_closed()


def recording_handler(seen):
    """An echo handler that first keeps what the server side's transport reports."""

    async def handler(reader, writer):
        info = writer.get_extra_info
        seen.append({key: info(key) for key in ("ssl_object", "peercert", "sslcontext")})
        await _echo(reader, writer)

    return handler


def run(loop, coro, timeout=30):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


class Collector(asyncio.Protocol):
    """Keeps what arrives; a test awaits the next `n` bytes with `take(n)`."""

    def __init__(self):
        self.data = bytearray()
        self.lost = asyncio.get_running_loop().create_future()
        self._wakeup = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data
        self._wake()

    def connection_lost(self, exc):
        self.lost.set_result(exc)
        self._wake()

    def _wake(self):
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def take(self, n):
        while len(self.data) < n:
            assert not self.lost.done(), bytes(self.data)
            self._wakeup = asyncio.get_running_loop().create_future()
            await self._wakeup
        taken = bytes(self.data[:n])
        del self.data[:n]
        return taken


class ThreadPeer:
    """A blocking peer on its own thread, for the behaviours under test on the other
    end: it accepts one connection and runs `script(conn)` on it."""

    def __init__(self, script):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.result = self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            conn, _ = self.listener.accept()
            conn.settimeout(20)
            with conn:
                self.result = self.script(conn)
        except BaseException as exc:  # noqa: BLE001 - raised in the test by outcome()
            self.error = exc

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, exc_type, *_):
        self.listener.close()
        self.thread.join(20)
        if exc_type is None:
            assert not self.thread.is_alive()

    async def outcome(self):
        """What the script returned, once it has (without blocking the loop)."""
        await asyncio.to_thread(self.thread.join, 20)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error
        return self.result


# Every SSLContext setting applies.


@pytest.mark.parametrize("client_cert", ["none", "trusted", "untrusted"])
@pytest.mark.parametrize("verify_mode", ["CERT_NONE", "CERT_OPTIONAL", "CERT_REQUIRED"])
def test_server_verify_mode_and_client_certificates(loop, pki, verify_mode, client_cert):
    server_ctx = pki.server_context()
    server_ctx.verify_mode = getattr(ssl, verify_mode)
    server_ctx.load_verify_locations(cadata=pki.ca.cert_pem.bytes().decode())
    cert = {"none": None, "trusted": pki.client, "untrusted": pki.untrusted_client}[client_cert]
    refused = (verify_mode == "CERT_REQUIRED" and client_cert == "none") or (
        verify_mode != "CERT_NONE" and client_cert == "untrusted"
    )
    seen = []

    async def main():
        server, port = await serve(server_ctx, recording_handler(seen))
        reader, writer = await connect(port, pki.client_context(cert))
        if refused:
            # TLS 1.3: the client's handshake completes before the server has checked
            # its certificate. asyncio's server closes without sending its alert: the
            # client reads the end of the stream.
            got = await reader.read(1)
        else:
            await ping(reader, writer)
            got = None
        await close(writer)
        await stop(server)
        return got

    got = run(loop, main())
    if refused:
        assert (got, seen) == (b"", [])
        return
    peercert = seen[0]["peercert"]
    if verify_mode == "CERT_NONE" or cert is None:
        assert peercert is None
        assert seen[0]["ssl_object"].getpeercert(binary_form=True) is None
    else:
        assert dict(x[0] for x in peercert["subject"])["commonName"] == "client"
        assert peercert["subjectAltName"] == (("DNS", "client.example"),)


@pytest.mark.parametrize("source", ["cafile", "cadata-pem", "cadata-der"])
def test_trusted_ca_from_a_file_or_cadata(loop, pki, source):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    pem = pki.ca.cert_pem.bytes().decode()
    if source == "cafile":
        ctx.load_verify_locations(cafile=pki.ca_file)
    elif source == "cadata-pem":
        ctx.load_verify_locations(cadata=pem)
    else:
        ctx.load_verify_locations(cadata=ssl.PEM_cert_to_DER_cert(pem))

    async def main():
        server, port = await serve(pki.server_context())
        reader, writer = await connect(port, ctx)
        await ping(reader, writer)
        peercert = writer.get_extra_info("peercert")
        await close(writer)
        await stop(server)
        return peercert

    peercert = run(loop, main())
    assert peercert["subjectAltName"] == (("DNS", "localhost"), ("IP Address", "127.0.0.1"))


@pytest.mark.parametrize("verify_mode", ["CERT_NONE", "CERT_REQUIRED"])
def test_check_hostname_off_accepts_another_name(loop, pki, verify_mode):
    # check_hostname False: a name the certificate does not carry is accepted; with
    # CERT_NONE the certificate is not verified at all and getpeercert() is {}.
    ctx = pki.client_context()
    ctx.check_hostname = False
    ctx.verify_mode = getattr(ssl, verify_mode)

    async def main():
        server, port = await serve(pki.server_context())
        reader, writer = await connect(port, ctx, server_hostname="wrong.example")
        await ping(reader, writer)
        sslobj = writer.get_extra_info("ssl_object")
        got = writer.get_extra_info("peercert"), sslobj.getpeercert(binary_form=True)
        await close(writer)
        await stop(server)
        return got

    peercert, der = run(loop, main())
    assert der == ssl.PEM_cert_to_DER_cert(pki.server.cert_chain_pems[0].bytes().decode())
    if verify_mode == "CERT_NONE":
        assert peercert == {}
    else:
        assert peercert["subjectAltName"][0] == ("DNS", "localhost")


@pytest.mark.parametrize(
    "host, server_hostname, sni, checked",
    [
        ("localhost", None, "localhost", "localhost"),
        ("127.0.0.1", None, None, "127.0.0.1"),  # an IP address is not sent as SNI
        ("127.0.0.1", "", None, None),  # "" turns the hostname check off
    ],
    ids=["name", "address", "empty"],
)
def test_server_hostname_taken_from_the_host(loop, pki, host, server_hostname, sni, checked):
    # With "", asyncio checks no name at all: the server's certificate is for
    # other.example there.
    cert = pki.other_name if server_hostname == "" else None
    server_ctx = pki.server_context(cert)
    names = []
    server_ctx.sni_callback = lambda sslobj, name, ctx: names.append(name)
    kwargs = {} if server_hostname is None else {"server_hostname": server_hostname}

    async def main():
        server, port = await serve(server_ctx)
        reader, writer = await asyncio.open_connection(
            host, port, ssl=pki.client_context(), **kwargs
        )
        await ping(reader, writer)
        got = writer.get_extra_info("ssl_object").server_hostname
        await close(writer)
        await stop(server)
        return got

    assert run(loop, main()) == checked
    assert names == [sni]


@pytest.mark.parametrize("case", ["wrong-hostname", "untrusted-ca", "expired", "no-ca-loaded"])
def test_bad_certificate_is_the_verification_error_ssl_gives(loop, pki, case):
    server_cert = {"untrusted-ca": pki.untrusted, "expired": pki.expired}.get(case)
    server_ctx = pki.server_context(server_cert)
    client_ctx = pki.client_context()
    if case == "no-ca-loaded":
        client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    hostname = "wrong.example" if case == "wrong-hostname" else "localhost"
    expected = reference_handshake(client_ctx, server_ctx, hostname)
    # X509_V_ERR_HOSTNAME_MISMATCH, _UNABLE_TO_GET_ISSUER_CERT_LOCALLY, _CERT_HAS_EXPIRED
    codes = {"wrong-hostname": 62, "untrusted-ca": 20, "expired": 10, "no-ca-loaded": 20}
    assert (type(expected), expected.verify_code) == (ssl.SSLCertVerificationError, codes[case])
    seen = []

    async def main():
        server, port = await serve(server_ctx, recording_handler(seen))
        with pytest.raises(ssl.SSLCertVerificationError) as caught:
            await connect(port, client_ctx, server_hostname=hostname)
        await stop(server)
        return caught.value

    error = run(loop, main())
    assert describe(error) == describe(expected)
    assert seen == []


def handshake_refused_by_the_server(loop, client_ctx, server_ctx, server_kind):
    """Connects with `client_ctx` to a server that must refuse the handshake, and checks
    what the client raises: against the ssl module's blocking server, which sends its
    alert, the exception the reference handshake gives; against the loop's server,
    which closes without sending it (as asyncio's does), ConnectionResetError."""
    expected = reference_handshake(client_ctx, server_ctx)
    assert isinstance(expected, ssl.SSLError)
    seen = []

    def blocking_server(conn):
        with pytest.raises(ssl.SSLError):
            server_ctx.wrap_socket(conn, server_side=True)

    async def main():
        if server_kind == "ssl-module":
            with ThreadPeer(blocking_server) as peer:
                with pytest.raises(ssl.SSLError) as caught:
                    await connect(peer.port, client_ctx)
                await peer.outcome()
            return caught.value
        server, port = await serve(server_ctx, recording_handler(seen))
        with pytest.raises(ConnectionResetError) as caught:
            await connect(port, client_ctx)
        await stop(server)
        return caught.value

    error = run(loop, main())
    if server_kind == "ssl-module":
        assert describe(error) == describe(expected)
    else:
        assert (type(error), error.args, seen) == (ConnectionResetError, (), [])


def test_alert_from_a_server_refusing_the_client_is_raised_on_read(loop, pki):
    # A server that does send its alert (the ssl module's blocking socket): the client
    # handshake completes (TLS 1.3), and its first read raises the alert.
    server_ctx = pki.server_context()
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cadata=pki.ca.cert_pem.bytes().decode())

    def script(conn):
        with pytest.raises(ssl.SSLError) as caught:
            server_ctx.wrap_socket(conn, server_side=True)
        return caught.value.reason

    async def main():
        with ThreadPeer(script) as peer:
            reader, writer = await connect(peer.port, pki.client_context())
            with pytest.raises(ssl.SSLError) as caught:
                await reader.read(1)
            writer.close()
            return caught.value, await peer.outcome()

    error, server_reason = run(loop, main())
    assert server_reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"
    assert (type(error), error.reason) == (ssl.SSLError, "TLSV13_ALERT_CERTIFICATE_REQUIRED")
    assert describe(error) == describe(reference_handshake(pki.client_context(), server_ctx))


def test_sni_callback_sees_the_name_and_switches_the_certificate(loop, pki):
    other_ctx = pki.server_context(pki.other_name)
    server_ctx = pki.server_context()
    names = []

    def sni(sslobj, name, ctx):
        names.append((name, ctx is server_ctx, sslobj.server_side))
        if name == "other.example":
            sslobj.context = other_ctx

    server_ctx.sni_callback = sni
    seen = []

    async def main():
        server, port = await serve(server_ctx, recording_handler(seen))
        sans = []
        for hostname in ("other.example", "localhost"):
            reader, writer = await connect(port, pki.client_context(), hostname)
            await ping(reader, writer)
            sans.append(writer.get_extra_info("peercert")["subjectAltName"])
            await close(writer)
        await stop(server)
        return sans

    sans = run(loop, main())
    assert sans == [
        (("DNS", "other.example"),),
        (("DNS", "localhost"), ("IP Address", "127.0.0.1")),
    ]
    assert names == [("other.example", True, True), ("localhost", True, True)]
    assert seen[0]["ssl_object"].context is other_ctx
    assert seen[1]["ssl_object"].context is server_ctx
    assert seen[0]["sslcontext"] is server_ctx  # the context passed, not the switched one
    assert seen[0]["ssl_object"].server_hostname is None  # as for any server side


@pytest.mark.parametrize("server_kind", ["ssl-module", "loop"])
@pytest.mark.parametrize("outcome", ["raises", "unrecognized_name", "handshake_failure"])
def test_sni_callback_failing_fails_the_handshake(loop, pki, monkeypatch, outcome, server_kind):
    def sni(sslobj, name, ctx):
        if outcome == "raises":
            raise ValueError(f"no certificate for {name}")
        return getattr(ssl, "ALERT_DESCRIPTION_" + outcome.upper())

    server_ctx = pki.server_context()
    server_ctx.sni_callback = sni
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    handshake_refused_by_the_server(loop, pki.client_context(), server_ctx, server_kind)
    # The exception raised in the callback is reported as unraisable, once for the
    # reference handshake and once for the server's.
    errors = [(type(u.exc_value), str(u.exc_value)) for u in unraisable]
    raised = [(ValueError, "no certificate for localhost")] * 2
    assert errors == (raised if outcome == "raises" else [])


@pytest.mark.parametrize(
    "server_alpn, client_alpn, selected",
    [
        (["h2", "http/1.1"], ["http/1.1", "h2"], "h2"),
        (["h2", "http/1.1"], ["spdy/3", "http/1.1"], "http/1.1"),
        (["h2"], ["http/1.1"], None),
        (None, ["h2"], None),
        (["h2"], None, None),
    ],
)
def test_alpn_negotiation_both_ends(loop, pki, server_alpn, client_alpn, selected):
    server_ctx, client_ctx = pki.server_context(), pki.client_context()
    if server_alpn:
        server_ctx.set_alpn_protocols(server_alpn)
    if client_alpn:
        client_ctx.set_alpn_protocols(client_alpn)
    seen = []

    async def main():
        server, port = await serve(server_ctx, recording_handler(seen))
        reader, writer = await connect(port, client_ctx)
        await ping(reader, writer)
        got = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        await close(writer)
        await stop(server)
        return got

    assert run(loop, main()) == selected
    assert seen[0]["ssl_object"].selected_alpn_protocol() == selected


@pytest.mark.parametrize(
    "client_range, server_range",
    [(("TLSv1_3", "TLSv1_3"), ("TLSv1_2", "TLSv1_2")), (("TLSv1_2", "TLSv1_2"), ("TLSv1_3", None))],
    ids=["client-1.3-only", "client-1.2-max"],
)
@pytest.mark.parametrize("server_kind", ["ssl-module", "loop"])
def test_protocol_version_mismatch_fails_the_handshake(
    loop, pki, client_range, server_range, server_kind
):
    client_ctx, server_ctx = pki.client_context(), pki.server_context()
    for ctx, (low, high) in ((client_ctx, client_range), (server_ctx, server_range)):
        ctx.minimum_version = getattr(ssl.TLSVersion, low)
        if high:
            ctx.maximum_version = getattr(ssl.TLSVersion, high)
    handshake_refused_by_the_server(loop, client_ctx, server_ctx, server_kind)


@pytest.mark.parametrize(
    "cipher, bits",
    [("ECDHE-ECDSA-AES128-GCM-SHA256", 128), ("ECDHE-ECDSA-CHACHA20-POLY1305", 256)],
)
def test_tls12_versions_and_ciphers_set_apply(loop, pki, cipher, bits):
    server_ctx, client_ctx = pki.server_context(), pki.client_context()
    server_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    client_ctx.set_ciphers(cipher)
    seen = []

    async def main():
        server, port = await serve(server_ctx, recording_handler(seen))
        reader, writer = await connect(port, client_ctx)
        await ping(reader, writer)
        got = writer.get_extra_info("cipher"), writer.get_extra_info("ssl_object").version()
        await close(writer)
        await stop(server)
        return got

    assert run(loop, main()) == ((cipher, "TLSv1.2", bits), "TLSv1.2")
    assert seen[0]["ssl_object"].cipher() == (cipher, "TLSv1.2", bits)


@pytest.mark.parametrize("server_kind", ["ssl-module", "loop"])
def test_no_shared_cipher_fails_the_handshake(loop, pki, server_kind):
    server_ctx, client_ctx = pki.server_context(), pki.client_context()
    server_ctx.maximum_version = client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    server_ctx.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
    client_ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    handshake_refused_by_the_server(loop, client_ctx, server_ctx, server_kind)


class _ResumingContext(ssl.SSLContext):
    """A client context that offers the session it was given: asyncio has no session
    argument, but `wrap_bio` (which asyncio calls) takes one."""

    session = None

    def wrap_bio(self, incoming, outgoing, server_side=False, server_hostname=None, session=None):
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.session
        )


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-tickets"])
def test_session_tickets_and_resumption(loop, pki, version, tickets):
    server_ctx = pki.server_context()
    server_ctx.maximum_version = getattr(ssl.TLSVersion, version)
    if not tickets:
        server_ctx.options |= ssl.OP_NO_TICKET
        server_ctx.num_tickets = 0
    client_ctx = _ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    pki.ca.configure_trust(client_ctx)

    async def main():
        server, port = await serve(server_ctx)
        sessions = []
        for _ in range(2):
            reader, writer = await connect(port, client_ctx)
            await ping(reader, writer)  # TLS 1.3 tickets come after the handshake
            sslobj = writer.get_extra_info("ssl_object")
            sessions.append((sslobj.session, sslobj.session_reused))
            client_ctx.session = sslobj.session
            await close(writer)
        await stop(server)
        return sessions

    (first, first_reused), (second, second_reused) = run(loop, main())
    assert first_reused is False
    assert first.has_ticket is tickets
    stats = server_ctx.session_stats()
    # TLS 1.2 resumes from the server's session cache without a ticket; TLS 1.3 only
    # with one.
    resumed = tickets or version == "TLSv1_2"
    assert second_reused is resumed
    assert (stats["hits"], stats["accept"]) == (int(resumed), 2)
    if version == "TLSv1_2" and resumed:
        assert second.id == first.id  # TLS 1.3 makes a new session when it resumes


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
def test_keylog_filename_gets_the_connection_secrets(loop, pki, tmp_path, version):
    server_ctx, client_ctx = pki.server_context(), pki.client_context()
    server_ctx.maximum_version = getattr(ssl.TLSVersion, version)
    client_ctx.keylog_filename = str(tmp_path / "client.keys")
    server_ctx.keylog_filename = str(tmp_path / "server.keys")

    async def main():
        server, port = await serve(server_ctx)
        reader, writer = await connect(port, client_ctx)
        await ping(reader, writer)
        await close(writer)
        await stop(server)

    run(loop, main())
    logs = {}
    for side in ("client", "server"):
        lines = (tmp_path / f"{side}.keys").read_text().splitlines()
        assert lines[0].startswith("# TLS secrets log file")
        logs[side] = sorted(line.split() for line in lines[1:])
    labels = {
        "TLSv1_2": ["CLIENT_RANDOM"],
        "TLSv1_3": [
            "CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0", "EXPORTER_SECRET",
            "SERVER_HANDSHAKE_TRAFFIC_SECRET", "SERVER_TRAFFIC_SECRET_0",
        ],
    }[version]
    assert [label for label, _, _ in logs["client"]] == labels
    assert len({client_random for _, client_random, _ in logs["client"]}) == 1  # one connection
    assert logs["server"] == logs["client"]


def test_get_extra_info_on_both_ends(loop, pki):
    server_ctx = pki.server_context()
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=pki.ca_file)
    client_ctx = pki.client_context(pki.client)
    keys = ["ssl_object", "peercert", "cipher", "compression", "sslcontext", "peername",
            "sockname", "socket"]
    seen = []

    def collect(writer):
        info = {key: writer.get_extra_info(key) for key in keys}
        info["default"] = writer.get_extra_info("no such key", 42)
        info["socket names"] = info["socket"].getsockname(), info["socket"].getpeername()
        return info

    async def handler(reader, writer):
        seen.append(collect(writer))
        await _echo(reader, writer)

    async def main():
        server, port = await serve(server_ctx, handler)
        reader, writer = await connect(port, client_ctx)
        await ping(reader, writer)
        got = collect(writer)
        got["port"] = port
        await close(writer)
        await stop(server)
        return got

    client = run(loop, main())
    server = seen[0]
    for info, ctx, side in ((client, client_ctx, "client"), (server, server_ctx, "server")):
        sslobj = info["ssl_object"]
        assert isinstance(sslobj, ssl.SSLObject)
        assert (sslobj.version(), sslobj.server_side) == ("TLSv1.3", side == "server")
        assert sslobj.context is ctx
        assert info["sslcontext"] is ctx
        assert info["peercert"] == sslobj.getpeercert()
        assert info["cipher"] == sslobj.cipher()
        assert len(info["cipher"]) == 3 and info["cipher"][1] == "TLSv1.3"
        assert info["compression"] is None is sslobj.compression()
        sock = info["socket"]
        assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
        assert info["socket names"] == (info["sockname"], info["peername"])
        assert info["default"] == 42
    assert client["sslcontext"] is not server["sslcontext"]
    assert client["peername"] == server["sockname"] == ("127.0.0.1", client["port"])
    assert server["peername"] == client["sockname"]
    assert client["ssl_object"].server_hostname == "localhost"
    assert client["peercert"]["subjectAltName"] == (
        ("DNS", "localhost"), ("IP Address", "127.0.0.1")
    )
    assert dict(x[0] for x in server["peercert"]["subject"])["commonName"] == "client"
    assert server["peercert"]["issuer"] == client["peercert"]["issuer"]


# Bad peers.

GARBAGE = {
    "http-request": b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
    "not-a-hello": b"\x16\x03\x01\x00\x09notahello",
    "zeros": bytes(64),
    "alert": b"\x15\x03\x03\x00\x02\x02\x28",
}


def _send_and_read_to_the_end(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_garbage_instead_of_a_client_hello_closes_and_the_server_goes_on(loop, pki, garbage):
    seen = []

    async def main():
        loop.set_exception_handler(lambda loop, context: None)
        server, port = await serve(pki.server_context(), recording_handler(seen))
        # asyncio's server closes without sending the alert OpenSSL made.
        assert await asyncio.to_thread(_send_and_read_to_the_end, port, GARBAGE[garbage]) == b""
        reader, writer = await connect(port, pki.client_context())
        await ping(reader, writer)
        await close(writer)
        await stop(server)

    run(loop, main())
    assert len(seen) == 1


@pytest.mark.parametrize("debug", [False, True], ids=["", "debug"])
def test_failed_server_handshake_is_reported_only_in_debug_mode(loop, pki, debug):
    reports = []

    async def main():
        loop.set_debug(debug)
        loop.set_exception_handler(lambda loop, context: reports.append(context))
        server, port = await serve(pki.server_context())
        assert await asyncio.to_thread(_send_and_read_to_the_end, port, GARBAGE["zeros"]) == b""
        reader, writer = await connect(port, pki.client_context())
        await ping(reader, writer)
        await close(writer)
        await stop(server)

    run(loop, main())
    got = [(c["message"], type(c["exception"]), c["exception"].reason) for c in reports]
    expected = ("Error on transport creation for incoming connection", ssl.SSLError,
                "WRONG_VERSION_NUMBER")
    assert got == ([expected] if debug else [])


def _read_record(conn):
    """One whole TLS record from a blocking socket (a ClientHello is one)."""
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        chunk = conn.recv(65536)
        assert chunk
        data += chunk
    return data


def reference_client_reads(client_ctx, data):
    """The client's exception when `data` comes back for its ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    incoming.write(data)
    with pytest.raises(ssl.SSLError) as caught:
        client.do_handshake()
    return caught.value


@pytest.mark.parametrize("garbage", sorted(GARBAGE))
def test_garbage_instead_of_a_server_hello_is_the_ssl_error_ssl_gives(loop, pki, garbage):
    def script(conn):
        _read_record(conn)
        conn.sendall(GARBAGE[garbage])
        return conn.recv(65536)  # until the client gives up

    async def main():
        with ThreadPeer(script) as peer:
            with pytest.raises(ssl.SSLError) as caught:
                await connect(peer.port, pki.client_context())
            return caught.value, await peer.outcome()

    error, after = run(loop, main())
    expected = reference_client_reads(pki.client_context(), GARBAGE[garbage])
    assert describe(error) == describe(expected)
    assert after == b""  # asyncio's client sends no alert either


class BioServer:
    """The server end of a TLS connection over a blocking socket and memory BIOs, so
    that a test decides which bytes of which record are sent, and when the TCP
    connection closes."""

    def __init__(self, conn, ctx):
        self.conn = conn
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def handshake(self):
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.conn.sendall(self.outgoing.read())
                data = self.conn.recv(65536)
                assert data
                self.incoming.write(data)
        self.conn.sendall(self.outgoing.read())

    def records(self, data):
        self.tls.write(data)
        return self.outgoing.read()

    def close_notify(self):
        with pytest.raises(ssl.SSLWantReadError):
            self.tls.unwrap()
        return self.outgoing.read()


END_OF_STREAM = {
    # What the peer does after sending b"partial": close TCP without close_notify,
    # the same after half a record, and the clean end (close_notify) for comparison.
    "no-close-notify": lambda server: b"",
    "mid-record": lambda server: server.records(b"the rest")[:10],
    "close-notify": lambda server: server.close_notify(),
}


@pytest.mark.parametrize("end", sorted(END_OF_STREAM))
def test_peer_closing_mid_stream(loop, pki, end):
    def script(conn):
        server = BioServer(conn, pki.server_context())
        server.handshake()
        conn.sendall(server.records(b"partial") + END_OF_STREAM[end](server))

    async def main():
        lost = loop.create_future()

        class Client(asyncio.Protocol):
            def __init__(self):
                self.events = []

            def data_received(self, data):
                self.events.append(("data", data))

            def eof_received(self):
                self.events.append(("eof",))

            def connection_lost(self, exc):
                self.events.append(("lost", describe(exc) if exc else None))
                lost.set_result(None)

        with ThreadPeer(script) as peer:
            _, client = await loop.create_connection(
                Client, "127.0.0.1", peer.port, ssl=pki.client_context(),
                server_hostname="localhost",
            )
            await lost
            await peer.outcome()
        return client.events

    events = run(loop, main())
    if sys.version_info < (3, 11) and end == "close-notify":
        # 3.10's sslproto answers the close_notify by closing, without eof_received.
        assert events == [("data", b"partial"), ("lost", None)]
    else:
        assert events == [("data", b"partial"), ("eof",), ("lost", None)]


@pytest.mark.parametrize("end", sorted(END_OF_STREAM))
def test_peer_closing_mid_stream_seen_by_a_stream_reader(loop, pki, end):
    def script(conn):
        server = BioServer(conn, pki.server_context())
        server.handshake()
        conn.sendall(server.records(b"partial") + END_OF_STREAM[end](server))

    async def main():
        with ThreadPeer(script) as peer:
            reader, writer = await connect(peer.port, pki.client_context())
            with pytest.raises(asyncio.IncompleteReadError) as caught:
                await reader.readexactly(100)
            after = await reader.read()
            await close(writer)
            await peer.outcome()
        return caught.value, after

    error, after = run(loop, main())
    assert (error.partial, error.expected, after) == (b"partial", 100, b"")


def test_peer_closing_during_the_handshake_is_connection_reset(loop, pki):
    def script(conn):
        _read_record(conn)

    async def main():
        with ThreadPeer(script) as peer:
            with pytest.raises(ConnectionResetError) as caught:
                await connect(peer.port, pki.client_context())
            await peer.outcome()
            return caught.value

    error = run(loop, main())
    assert (type(error), error.args) == (ConnectionResetError, ())


def test_handshake_timeout_on_both_ends(loop, pki):
    async def main():
        loop.set_exception_handler(lambda loop, context: None)  # the server side's abort
        # Client: a server that accepts TCP (the backlog) and never answers.
        with (
            socket.create_server(("127.0.0.1", 0)) as silent,
            pytest.raises(ConnectionAbortedError) as caught,
        ):
            await asyncio.open_connection(
                "127.0.0.1", silent.getsockname()[1], ssl=pki.client_context(),
                server_hostname="localhost", ssl_handshake_timeout=0.2,
            )
        # Server: a client that connects and sends nothing is let go.
        server, port = await serve(pki.server_context(), ssl_handshake_timeout=0.2)
        received = await asyncio.to_thread(_send_and_read_to_the_end, port, b"")
        await stop(server)
        return caught.value, received

    error, received = run(loop, main())
    assert (type(error), error.args) == (
        ConnectionAbortedError,
        ("SSL handshake is taking longer than 0.2 seconds: aborting the connection",),
    )
    assert received == b""


# Data.


def test_3_mib_in_one_write_to_a_client_that_paused_reading(loop, pki):
    payload = random.Random(5).randbytes(3 << 20)

    async def main():
        paused = loop.create_future()
        drained = loop.create_future()

        class Client(Collector):
            def connection_made(self, transport):
                super().connection_made(transport)
                transport.pause_reading()
                paused.set_result(transport.is_reading())

        async def handler(reader, writer):
            await paused
            writer.write(payload)
            await writer.drain()
            drained.set_result(None)
            await _echo(reader, writer)

        server, port = await serve(pki.server_context(), handler)
        _, client = await loop.create_connection(
            Client, "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost"
        )
        assert await paused is False
        await asyncio.sleep(0.2)  # the payload is on its way: none of it may be delivered
        assert bytes(client.data) == b""
        client.transport.resume_reading()
        assert client.transport.is_reading()
        got = await client.take(len(payload))
        await drained
        client.transport.close()
        await client.lost
        await stop(server)
        return got

    got = run(loop, main())
    assert len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()


def test_10000_small_writes_each_way(loop, pki):
    rng = random.Random(6)
    chunks = [i.to_bytes(4, "big") + rng.randbytes(96) for i in range(10_000)]
    total = sum(map(len, chunks))

    async def handler(reader, writer):
        # Back in the same 100-byte pieces: many small writes on the server side too.
        data = await reader.readexactly(total)
        for i in range(0, total, 100):
            writer.write(data[i : i + 100])
        await writer.drain()
        await _echo(reader, writer)

    async def main():
        server, port = await serve(pki.server_context(), handler)
        reader, writer = await connect(port, pki.client_context())
        for chunk in chunks:
            writer.write(chunk)
        got = await reader.readexactly(total)
        await close(writer)
        await stop(server)
        return got

    assert run(loop, main()) == b"".join(chunks)


def test_buffered_protocol_client_gets_the_exact_bytes(loop, pki):
    payload = random.Random(8).randbytes(1 << 20)

    async def handler(reader, writer):
        writer.write(payload)
        await writer.drain()
        writer.close()  # with close_notify

    async def main():
        lost = loop.create_future()

        class Client(asyncio.BufferedProtocol):
            def __init__(self):
                self.buffer = bytearray(1000)
                self.got = bytearray()
                self.sizes = set()

            def get_buffer(self, sizehint):
                # A memoryview: asyncio's sslproto fills the rest of the buffer
                # through a slice of it, which a bytearray would copy.
                return memoryview(self.buffer)

            def buffer_updated(self, nbytes):
                self.sizes.add(nbytes)
                self.got += self.buffer[:nbytes]

            def connection_lost(self, exc):
                lost.set_result(exc)

        server, port = await serve(pki.server_context(), handler)
        _, client = await loop.create_connection(
            Client, "127.0.0.1", port, ssl=pki.client_context(), server_hostname="localhost"
        )
        assert await lost is None
        await stop(server)
        return client

    client = run(loop, main())
    assert client.got == payload
    assert 1 <= min(client.sizes) and max(client.sizes) == 1000


def test_half_close_is_refused_as_asyncio_refuses_it(loop, pki):
    def half_close(writer):
        try:
            writer.write_eof()
        except NotImplementedError as exc:
            return writer.can_write_eof(), writer.transport.can_write_eof(), exc.args
        return "write_eof did not raise"

    seen = []

    async def handler(reader, writer):
        seen.append(half_close(writer))
        await _echo(reader, writer)

    async def main():
        server, port = await serve(pki.server_context(), handler)
        reader, writer = await connect(port, pki.client_context())
        client = half_close(writer)
        await ping(reader, writer)  # the connection goes on
        await close(writer)
        await stop(server)
        return client

    assert run(loop, main()) == (False, False, ())
    assert seen == [(False, False, ())]


# Other ways in: start_tls on a live connection, Unix sockets, accepted sockets.


def _recv_line(conn):
    line = b""
    while not line.endswith(b"\n"):
        chunk = conn.recv(1)
        assert chunk, line
        line += chunk
    return line


def _recv_exactly(tls, n):
    data = b""
    while len(data) < n:
        chunk = tls.recv(n - len(data))
        assert chunk, len(data)
        data += chunk
    return data


def test_start_tls_on_a_live_client_connection(loop, pki):
    # Plaintext both ways, STARTTLS, TLS data both ways, then the client closes with
    # close_notify (the blocking server reads a ragged end as SSLEOFError) and the
    # server answers with its own.
    payload = random.Random(9).randbytes(200_000)

    def script(conn):
        conn.sendall(b"220 ready\n")
        assert _recv_line(conn) == b"STARTTLS\n"
        conn.sendall(b"220 go ahead\n")
        ctx = pki.server_context()
        with ctx.wrap_socket(conn, server_side=True, suppress_ragged_eofs=False) as tls:
            data = _recv_exactly(tls, len(payload))
            tls.sendall(hashlib.sha256(data).digest())
            end = tls.recv(1)
            tls.unwrap()
        return data == payload, end

    async def main():
        with ThreadPeer(script) as peer:
            transport, client = await loop.create_connection(Collector, "127.0.0.1", peer.port)
            assert await client.take(10) == b"220 ready\n"
            transport.write(b"STARTTLS\n")
            assert await client.take(13) == b"220 go ahead\n"
            tls = await loop.start_tls(
                transport, client, pki.client_context(), server_hostname="localhost"
            )
            assert tls.get_extra_info("ssl_object").version() == "TLSv1.3"
            tls.write(payload)
            digest = await client.take(32)
            tls.close()
            return digest, await client.lost, await peer.outcome()

    digest, lost, outcome = run(loop, main())
    assert (digest, lost, outcome) == (hashlib.sha256(payload).digest(), None, (True, b""))


def test_start_tls_on_a_live_server_connection(loop, pki):
    payload = random.Random(10).randbytes(200_000)
    client_ctx = pki.client_context()

    def script(conn):
        conn.sendall(b"HELLO\n")
        assert _recv_line(conn) == b"HI\n"
        conn.sendall(b"STARTTLS\n")
        assert _recv_line(conn) == b"GO\n"
        with client_ctx.wrap_socket(
            conn, server_hostname="localhost", suppress_ragged_eofs=False
        ) as tls:
            tls.sendall(payload)
            digest = _recv_exactly(tls, 32)
            end = tls.recv(1)  # b"" only after the server's close_notify
            tls.unwrap()
        return digest, end

    async def main():
        accepted = loop.create_future()

        def factory():
            protocol = Collector()
            accepted.set_result(protocol)
            return protocol

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        thread = asyncio.ensure_future(asyncio.to_thread(_connect_and_run, port, script))
        proto = await accepted
        assert await proto.take(6) == b"HELLO\n"
        proto.transport.write(b"HI\n")
        assert await proto.take(9) == b"STARTTLS\n"
        proto.transport.write(b"GO\n")
        tls = await loop.start_tls(proto.transport, proto, pki.server_context(), server_side=True)
        assert tls.get_extra_info("ssl_object").server_side is True
        data = await proto.take(len(payload))
        tls.write(hashlib.sha256(data).digest())
        tls.close()
        lost = await proto.lost
        outcome = await thread
        await stop(server)
        return data, lost, outcome

    data, lost, outcome = run(loop, main())
    assert (data == payload, lost) == (True, None)
    assert outcome == (hashlib.sha256(payload).digest(), b"")


def _connect_and_run(port, script):
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        return script(conn)


def test_tls_over_unix_sockets_and_accepted_sockets(loop, pki, tmp_path):
    path = str(tmp_path / "tls.sock")

    async def main():
        server = await asyncio.start_unix_server(_echo, path, ssl=pki.server_context())
        reader, writer = await asyncio.open_unix_connection(
            path, ssl=pki.client_context(), server_hostname="localhost"
        )
        await ping(reader, writer, b"over a unix socket")
        versions = [writer.get_extra_info("ssl_object").version()]
        await close(writer)
        await stop(server)

        ours, theirs = socket.socketpair()
        accepted = loop.connect_accepted_socket(Collector, ours, ssl=pki.server_context())
        connecting = asyncio.open_connection(
            sock=theirs, ssl=pki.client_context(), server_hostname="localhost"
        )
        (transport, protocol), (reader, writer) = await asyncio.gather(accepted, connecting)
        writer.write(b"to the accepted socket")
        assert await protocol.take(22) == b"to the accepted socket"
        transport.write(b"back")
        assert await reader.readexactly(4) == b"back"
        versions.append(transport.get_extra_info("ssl_object").version())
        transport.close()
        assert await reader.read() == b""
        await close(writer)
        await protocol.lost
        return versions

    assert run(loop, main()) == ["TLSv1.3", "TLSv1.3"]


# Many connections.


def _rss():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_1000_tls_connections_leak_no_fd_and_no_memory(loop, pki):
    # After a warm-up (the allocator's arenas, caches), 1,000 more connections opened
    # and closed leave the fd count as it was and the RSS within 10 MiB (it moves by
    # 0 to 1.5 MiB): the SSL object of each connection, if leaked, would cost about
    # 40 MiB.
    async def main():
        active = 0
        idle = asyncio.Event()

        async def handler(reader, writer):
            nonlocal active
            active += 1
            idle.clear()
            await _echo(reader, writer)
            await writer.wait_closed()
            active -= 1
            if active == 0:
                idle.set()

        server, port = await serve(pki.server_context(), handler)
        ctx = pki.client_context()

        async def one():
            reader, writer = await connect(port, ctx)
            await ping(reader, writer, b"x")
            await close(writer)

        async def connections(n):
            for _ in range(n // 50):
                await asyncio.gather(*(one() for _ in range(50)))
            await idle.wait()  # every server side closed too
            gc.collect()
            return open_fds(), _rss()

        fds_before, rss_before = await connections(200)
        fds_after, rss_after = await connections(1000)
        await stop(server)
        return fds_after - fds_before, rss_after - rss_before

    fds_grown, rss_grown = run(loop, main(), timeout=120)
    assert fds_grown == 0
    assert rss_grown < 10 << 20
