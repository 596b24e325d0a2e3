"""No blocking call in the loop thread that asyncio does not make: each program runs
under blockbuster (a detector of blocking calls in async code, which allows asyncio's
own call sites) on asyncio and on ferroloop."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import subprocess
import sys
import uuid

import ferroloop
import pytest

from tests.test_servers import _echo_once
from tests.test_tls import _echo

try:
    from blockbuster import blockbuster_ctx
except ImportError:  # pragma: no cover - the test extra installs it
    pytest.skip("blockbuster is not installed (pip install .[test])", allow_module_level=True)

certs = pytest.importorskip("test.test_asyncio.utils")

PAYLOAD_SIZE = 256 * 1024


class _Pong(asyncio.Protocol):
    """Sends a byte once connected; `echoed` resolves when the echo comes back, so the
    server has surely accepted the connection before the program closes it (3.13.0's
    Server fails in __del__ of a connection accepted after wait_closed())."""

    def __init__(self):
        self.echoed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        transport.write(b"x")

    def data_received(self, data):
        if not self.echoed.done():
            self.echoed.set_result(data)


async def tcp(loop, tmp_path):
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    assert await _echo_once(*await asyncio.open_connection("127.0.0.1", port)) == b"ping"
    tr, pong = await loop.create_connection(_Pong, "localhost", port)
    await pong.echoed
    tr.close()
    server.close()
    await server.wait_closed()


async def unix_path(loop, tmp_path):
    path = str(tmp_path / "s.sock")
    server = await asyncio.start_unix_server(_echo, path)
    assert await _echo_once(*await asyncio.open_unix_connection(path)) == b"ping"
    tr, pong = await loop.create_unix_connection(_Pong, path)
    await pong.echoed
    tr.close()
    server.close()
    await server.wait_closed()


async def unix_abstract(loop, tmp_path):
    name = f"\0ferroloop-test-{uuid.uuid4().hex}"
    server = await asyncio.start_unix_server(_echo, name)
    reader, writer = await asyncio.open_unix_connection(name)
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


async def datagram(loop, tmp_path):
    received = loop.create_future()

    class Receive(asyncio.DatagramProtocol):
        def datagram_received(self, data, addr):
            received.set_result(data)

    server, _ = await loop.create_datagram_endpoint(Receive, local_addr=("127.0.0.1", 0))
    client, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=server.get_extra_info("sockname")
    )
    client.sendto(b"hi")
    assert await received == b"hi"
    client.close()
    server.close()


async def subprocess_exec(loop, tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.read())",
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    assert await proc.communicate(b"data") == (b"data", None)
    assert proc.returncode == 0


async def sendfile(loop, tmp_path):
    size = PAYLOAD_SIZE
    got = bytearray()
    done = loop.create_future()
    lost = []

    class Collect(asyncio.Protocol):
        def connection_made(self, transport):
            self.lost = loop.create_future()
            lost.append(self.lost)

        def data_received(self, data):
            got.extend(data)
            if len(got) == 2 * size:
                done.set_result(None)

        def connection_lost(self, exc):
            self.lost.set_result(None)

    server = await loop.create_server(Collect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    tr, _ = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    with open(tmp_path / "payload", "rb") as f:
        assert await loop.sendfile(tr, f) == size
        f.seek(0)
        assert await loop.sock_sendfile(sock, f) == size
    await done
    tr.close()
    sock.close()
    # The server's side of both connections is gone before the server closes (3.13.0's
    # Server fails in __del__ of a transport that outlives wait_closed()).
    await asyncio.gather(*lost)
    server.close()
    await server.wait_closed()


async def start_tls(loop, tmp_path, contexts):
    server_ctx, client_ctx = contexts

    async def upgrade(reader, writer, ctx, **kwargs):
        # loop.start_tls (StreamWriter.start_tls is 3.11+), then the streams use its
        # transport.
        tr = await loop.start_tls(writer.transport, writer.transport.get_protocol(), ctx,
                                  **kwargs)
        writer._transport = tr
        reader._transport = tr

    async def handler(reader, writer):
        await upgrade(reader, writer, server_ctx, server_side=True)
        await _echo(reader, writer)

    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await upgrade(reader, writer, client_ctx, server_hostname="localhost")
    assert writer.get_extra_info("ssl_object") is not None
    assert await _echo_once(reader, writer) == b"ping"
    server.close()
    await server.wait_closed()


async def resolve_and_executor(loop, tmp_path):
    infos = await loop.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)
    assert infos
    assert await loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST) is not None
    assert await loop.run_in_executor(None, sum, [1, 2]) == 3
    assert await asyncio.to_thread(len, "abc") == 3


PROGRAMS = [tcp, unix_path, unix_abstract, datagram, subprocess_exec, sendfile,
            resolve_and_executor]


@pytest.fixture
def tls_contexts():
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.SIGNED_CERTFILE)
    client_ctx = ssl.create_default_context(cafile=certs.SIGNING_CA)
    return server_ctx, client_ctx


@pytest.fixture
def payload_file(tmp_path):
    (tmp_path / "payload").write_bytes(os.urandom(PAYLOAD_SIZE))


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.__name__ for p in PROGRAMS])
def test_no_blocking_call_in_the_loop(loop, tmp_path, payload_file, program):
    with blockbuster_ctx():
        loop.run_until_complete(asyncio.wait_for(program(loop, tmp_path), 30))


def test_no_blocking_call_in_start_tls(loop, tmp_path, tls_contexts):
    with blockbuster_ctx():
        loop.run_until_complete(asyncio.wait_for(start_tls(loop, tmp_path, tls_contexts), 30))


def test_no_blocking_call_over_a_stale_unix_socket_file(loop, loop_name, tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # a dead server's socket file stays behind

    async def main():
        server = await loop.create_unix_server(asyncio.Protocol, path)
        server.close()
        await server.wait_closed()

    if loop_name == "asyncio":
        pytest.skip("asyncio removes a stale socket file with os.remove, which blockbuster flags")
    with blockbuster_ctx():
        loop.run_until_complete(main())
    # The server's own socket file is removed when it closes from 3.13 (cleanup_socket).
    assert os.path.exists(path) == (sys.version_info < (3, 13))


@pytest.mark.parametrize("runner", ["run", "close"])
def test_no_blocking_call_in_run_and_loop_close(loop_name, runner):
    async def main():
        await asyncio.get_running_loop().run_in_executor(None, sum, [1])

        async def agen():
            yield 1

        gen = agen()
        await gen.__anext__()  # left open: the runner finalizes it
        return 1

    with blockbuster_ctx():
        if runner == "run":
            run = asyncio.run if loop_name == "asyncio" else ferroloop.run
            assert run(main()) == 1
        else:
            loop = asyncio.new_event_loop() if loop_name == "asyncio" else ferroloop.new_event_loop()
            try:
                assert loop.run_until_complete(main()) == 1
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()
