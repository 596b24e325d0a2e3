"""Accepting connections, on asyncio and ferroloop: peer addresses as `socket.accept()`
gives them for every family, TCP_NODELAY as asyncio sets it, a queue longer than the
batch all served, and no fd left open whether the protocol or transport is made or
not; and ferroloop's native batch accept on its own (its bound, its errors)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import ssl
import sys
import warnings

import ferroloop._serve
import pytest
from ferroloop._ferroloop import accept_connections

from tests.conftest import open_fds

certs = pytest.importorskip("test.test_asyncio.utils")


class Recorder(asyncio.Protocol):
    """Keeps each accepted transport; echoes what it receives, then closes."""

    def __init__(self, accepted):
        self.accepted = accepted

    def connection_made(self, transport):
        self.transport = transport
        self.accepted.append(transport)

    def data_received(self, data):
        self.transport.write(data)
        self.transport.close()


def peername_seen(loop, server_sock, client):
    """The `peername` of the server side of `client`'s connection (already queued)."""
    accepted = []

    async def main():
        server = await loop.create_server(lambda: Recorder(accepted), sock=server_sock)
        while not accepted:
            await asyncio.sleep(0.01)
        peer = accepted[0].get_extra_info("peername")
        accepted[0].close()
        server.close()
        await server.wait_closed()
        return peer

    return loop.run_until_complete(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_inet_peername_is_the_clients_address(loop, family):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    listener = socket.socket(family, socket.SOCK_STREAM)
    try:
        listener.bind((host, 0))
    except OSError:
        listener.close()
        pytest.skip(f"no {host}")
    listener.listen(8)
    with socket.create_connection(listener.getsockname()[:2]) as client:
        peer = peername_seen(loop, listener, client)
        assert peer == client.getsockname()
        assert len(peer) == (2 if family == socket.AF_INET else 4)


@pytest.mark.parametrize("client_name", ["path", "unnamed", "abstract"])
def test_unix_peername_as_socket_accept_gives_it(loop, tmp_path, client_name):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "server.sock"))
    listener.listen(8)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        if client_name == "path":
            client.bind(str(tmp_path / "client-é.sock"))
        elif client_name == "abstract":
            client.bind(b"\0ferroloop-test-accept-%d" % os.getpid())
        client.connect(str(tmp_path / "server.sock"))
        expected = {
            "path": str(tmp_path / "client-é.sock"),
            "unnamed": "",
            "abstract": b"\0ferroloop-test-accept-%d" % os.getpid(),
        }[client_name]
        assert client.getsockname() == expected
        assert peername_seen(loop, listener, client) == expected


@pytest.mark.parametrize("proto", [socket.IPPROTO_TCP, 0])
def test_tcp_nodelay_as_asyncio_sets_it(loop, proto):
    # asyncio sets TCP_NODELAY on an accepted connection only if the listening socket
    # says IPPROTO_TCP (create_server's do; `socket.socket()` says 0).
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    async def main():
        server = await loop.create_server(lambda: Recorder(accepted), sock=listener)
        with socket.create_connection(listener.getsockname()):
            while not accepted:
                await asyncio.sleep(0.01)
            sock = accepted[0].get_extra_info("socket")
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            accepted[0].close()
        server.close()
        await server.wait_closed()
        return nodelay

    nodelay = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert bool(nodelay) == (proto == socket.IPPROTO_TCP)


@pytest.mark.parametrize("proto", [0, socket.IPPROTO_TCP])
def test_sockname_and_socket_after_a_close_nobody_asked_them_before(loop, proto):
    # Closed before anything asked for its socket, ferroloop's connection closes its fd
    # natively; afterwards get_extra_info still gives what asyncio's does: the local
    # address, and a closed socket of the listener's family, type and protocol.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, proto)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    address = listener.getsockname()
    accepted = []

    async def main():
        lost = loop.create_future()

        class Closing(Recorder):
            def connection_lost(self, exc):
                lost.set_result(None)

        server = await loop.create_server(lambda: Closing(accepted), sock=listener)
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"x")
        assert await reader.read() == b"x"
        writer.close()
        server.close()
        await server.wait_closed()
        await lost
        tr = accepted[0]
        return tr.get_extra_info("sockname"), tr.get_extra_info("socket")

    sockname, sock = loop.run_until_complete(asyncio.wait_for(main(), 30))
    assert sockname == address
    assert sock.fileno() == -1
    assert (sock.family, sock.type, sock.proto) == (socket.AF_INET, socket.SOCK_STREAM, proto)


def test_a_queue_longer_than_the_batch_is_all_served(loop):
    # 60 connections wait in the kernel's queue before serving starts; the server takes
    # them in batches of `backlog` (4), one batch per readiness event.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(60)]
    accepted = []

    async def main():
        server = await loop.create_server(lambda: Recorder(accepted), sock=listener, backlog=4)
        replies = []
        for i, client in enumerate(clients):
            client.setblocking(False)
            await loop.sock_sendall(client, b"%d" % i)
        for client in clients:
            replies.append(await loop.sock_recv(client, 100))
        server.close()
        await server.wait_closed()
        return replies

    try:
        replies = loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        for client in clients:
            client.close()
    assert replies == [b"%d" % i for i in range(60)]
    assert len(accepted) == 60


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_no_fd_left_after_many_accepted_connections(new_loop, tls):
    # 200 connections accepted, echoed and closed; every fourth protocol factory call
    # fails, whose connection the server must close without a transport.
    count = 200 if not tls else 40
    server_ctx = client_ctx = None
    if tls:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(certs.SIGNED_CERTFILE)
        client_ctx = ssl.create_default_context(cafile=certs.SIGNING_CA)
    gc.collect()
    before = open_fds()
    loop = new_loop()
    calls = 0
    accepted = []

    def factory():
        nonlocal calls
        calls += 1
        if calls % 4 == 0:
            raise RuntimeError("no protocol")
        return Recorder(accepted)

    async def one(port, i):
        # A connection whose protocol failed is closed by the server: during the TLS
        # handshake (an error here) or after the TCP one (end of stream or a reset).
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost" if tls else None
            )
        except OSError:
            return None
        writer.write(b"%d" % i)
        try:
            reply = await reader.read()
        except OSError:
            reply = None
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return reply

    async def main():
        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        replies = []
        for i in range(count):
            replies.append(await one(port, i))
        server.close()
        await server.wait_closed()
        return replies

    replies = loop.run_until_complete(asyncio.wait_for(main(), 120))
    loop.close()
    # The connections whose protocol was made (3 of 4) were echoed.
    served = [r for r in replies if r]
    assert served == [b"%d" % i for i in range(count) if (i + 1) % 4 != 0]
    assert len(accepted) == count - count // 4
    accepted.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert open_fds() == before


def test_a_tls_connection_accepted_just_before_the_loop_closes_leaves_no_fd(
    new_loop, loop_name
):
    # The loop is closed right after the accept callback, before the handshake starts.
    # asyncio hands the connection to a task that never runs (its fd is closed when the
    # task is collected); ferroloop makes the transports in the callback, without a
    # task, and closes the connection with the loop.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.SIGNED_CERTFILE)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    client = socket.create_connection(listener.getsockname())
    try:
        gc.collect()
        before = open_fds()
        loop = new_loop()
        args = [asyncio.Protocol, listener, server_ctx, None, 100, 60.0]
        if sys.version_info >= (3, 11) or loop_name == "ferroloop":
            args.append(30.0)  # ssl_shutdown_timeout, which 3.10's asyncio has not
        loop._accept_connection(*args)
        assert len(asyncio.all_tasks(loop)) == (1 if loop_name == "asyncio" else 0)
        # Inside the filter: a recorded "never awaited" warning would keep the
        # coroutine, and with it the connection, alive.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loop.close()
            if loop_name == "ferroloop":
                assert open_fds() == before
            gc.collect()
        assert open_fds() == before
    finally:
        client.close()
        listener.close()


@pytest.mark.parametrize("debug", [False, True], ids=["", "debug"])
def test_a_tls_connection_in_its_handshake_is_closed_at_the_end_of_a_run(
    new_loop, debug
):
    # asyncio.run's end (its tasks cancelled, then the loop closed) with a connection
    # whose handshake waits for the client: the connection is closed, its fd released
    # without a garbage collection, and in debug mode the cancellation is reported as
    # asyncio's accept reports a failed transport creation.
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.SIGNED_CERTFILE)
    made = []
    gc.collect()
    before = open_fds()
    loop = new_loop()
    loop.set_debug(debug)
    reported = []
    loop.set_exception_handler(lambda _, context: reported.append(context))

    async def main():
        server = await loop.create_server(lambda: made.append(0) or asyncio.Protocol(),
                                          "127.0.0.1", 0, ssl=server_ctx)
        client = socket.create_connection(server.sockets[0].getsockname())
        while not made:
            await asyncio.sleep(0.01)
        # One more turn: the connection's handshake has started (connection_made).
        await asyncio.sleep(0)
        server.close()
        return client

    client = loop.run_until_complete(asyncio.wait_for(main(), 60))
    try:
        # asyncio.run's end: its pending tasks (asyncio's accept task here, none on
        # ferroloop) cancelled and awaited, then the close.
        pending = asyncio.all_tasks(loop)
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        assert client.recv(100) == b""  # closed by the server, without a reply
    finally:
        client.close()
    assert open_fds() == before
    creation_errors = [
        c for c in reported
        if c["message"] == "Error on transport creation for incoming connection"
    ]
    if debug:
        assert len(creation_errors) == 1
        assert isinstance(creation_errors[0]["exception"], asyncio.CancelledError)
        assert isinstance(creation_errors[0]["protocol"], asyncio.Protocol)
    else:
        assert creation_errors == []


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "tls"])
def test_the_python_accept_of_other_families_serves_the_same(loop, monkeypatch, tls):
    # A family accept_connections does not know goes through socket.accept(): made to
    # here for TCP, it must give the same peername, TCP_NODELAY and echo.
    monkeypatch.setattr(ferroloop._serve, "_NATIVE_FAMILIES", frozenset())
    server_ctx = client_ctx = None
    if tls:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.load_cert_chain(certs.SIGNED_CERTFILE)
        client_ctx = ssl.create_default_context(cafile=certs.SIGNING_CA)
    accepted = []
    seen = []

    class Checked(Recorder):
        def connection_made(self, transport):
            super().connection_made(transport)
            sock = transport.get_extra_info("socket")
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen.append((transport.get_extra_info("peername"), nodelay))

    async def main():
        server = await loop.create_server(
            lambda: Checked(accepted), "127.0.0.1", 0, ssl=server_ctx
        )
        port = server.sockets[0].getsockname()[1]
        replies = []
        for i in range(5):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost" if tls else None
            )
            # Before the server's close: 3.10's sslproto answers None after it.
            sockname = writer.get_extra_info("sockname")
            writer.write(b"%d" % i)
            replies.append(await reader.read())
            peer, nodelay = seen[-1]
            assert peer == sockname
            assert nodelay != 0
            writer.close()
        server.close()
        await server.wait_closed()
        return replies

    assert loop.run_until_complete(asyncio.wait_for(main(), 60)) == [b"%d" % i for i in range(5)]


class SocketLike:
    """A listening socket's wrapper that is no `socket.socket` (as gunicorn's are)."""

    def __init__(self, sock):
        self._sock = sock

    def __getattr__(self, name):
        return getattr(self._sock, name)


def test_a_socket_like_listener_is_served(loop):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    async def main():
        server = await loop.create_server(lambda: Recorder(accepted), sock=SocketLike(listener))
        reader, writer = await asyncio.open_connection(*listener.getsockname())
        writer.write(b"ping")
        reply = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return reply

    assert loop.run_until_complete(asyncio.wait_for(main(), 30)) == b"ping"
    assert len(accepted) == 1


class ClaimsTcp(SocketLike):
    """A socket-like wrapper of a Unix socket that claims to be TCP (so does what its
    accept() gives): TCP_NODELAY, set on an accepted connection as asyncio sets it,
    fails on it."""

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = socket.IPPROTO_TCP

    def accept(self):
        conn, addr = self._sock.accept()
        return ClaimsTcp(conn), addr


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets")
def test_a_connection_whose_tcp_nodelay_fails_is_reported_in_debug_mode(loop, tmp_path):
    # asyncio's transport cannot be made (its _set_nodelay raises): in debug mode the
    # loop reports it, and the connection is closed (asyncio's when collected); the
    # server goes on.
    path = str(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    reports = []
    loop.set_debug(True)
    loop.set_exception_handler(
        lambda _, context: reports.append((context["message"], type(context.get("exception"))))
    )

    async def main():
        server = await loop.create_server(asyncio.Protocol, sock=ClaimsTcp(listener))
        reader, writer = await asyncio.open_unix_connection(path)
        while not reports:
            await asyncio.sleep(0.01)
        gc.collect()
        try:
            end = await reader.read()
        except ConnectionResetError:
            end = b""
        writer.close()
        # Not wait_closed(): asyncio 3.12+ counted the failed transport as the server's
        # (it attaches before setting TCP_NODELAY) and would wait for it forever.
        server.close()
        return end

    assert loop.run_until_complete(asyncio.wait_for(main(), 30)) == b""
    assert reports == [("Error on transport creation for incoming connection", OSError)]


def test_native_accept_batch_bound_peernames_and_end():
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(32)
    listener.setblocking(False)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(10)]
    got = []
    try:
        for expected in (4, 4, 2, 0):
            accepted, error = accept_connections(listener.fileno(), 4, True)
            assert error is None
            assert len(accepted) == expected
            got += accepted
        names = sorted(c.getsockname() for c in clients)
        assert sorted(peer for _, peer in got) == names
        for fd, _ in got:
            assert os.get_blocking(fd) is False
            assert os.get_inheritable(fd) is False
            with socket.socket(fileno=fd) as conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        for c in clients:
            c.close()
        listener.close()


def test_native_accept_closes_a_connection_whose_tcp_nodelay_fails(tmp_path):
    # TCP_NODELAY asked on a Unix socket's connection: EOPNOTSUPP, the connection
    # closed at once and its error in its place in the batch.
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(8)
        listener.setblocking(False)
        before = open_fds()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            accepted, error = accept_connections(listener.fileno(), 4, True)
            assert error is None
            ((fd, exc),) = accepted
            assert fd == -1 and type(exc) is OSError and exc.errno == errno.EOPNOTSUPP
            assert open_fds() == before + 1
            client.settimeout(30)
            assert client.recv(1) == b""


def test_native_accept_errors_are_returned_as_the_oserror():
    # Not a listening socket: EINVAL, as the OSError accept() would raise.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        accepted, error = accept_connections(sock.fileno(), 4, False)
        assert accepted == []
        assert type(error) is OSError and error.errno == errno.EINVAL
    # Not a socket at all: ENOTSOCK.
    r, w = os.pipe()
    try:
        accepted, error = accept_connections(r, 4, False)
        assert accepted == [] and error.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)

