"""Servers and connections: create_server options, Unix servers and connections,
the Server object, connect_accepted_socket and create_connection's errors."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import socket
import sys

import pytest

from tests.conftest import open_fds


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def _echo_once(reader, writer, payload=b"ping") -> bytes:
    writer.write(payload)
    data = await reader.readexactly(len(payload))
    writer.close()
    await writer.wait_closed()
    return data


def test_create_server_on_all_interfaces_and_a_host_list(loop):
    async def main():
        server = await loop.create_server(Echo, host=None, port=0, family=socket.AF_INET)
        port = server.sockets[0].getsockname()[1]
        assert server.is_serving()
        assert server.get_loop() is loop
        assert await _echo_once(*await asyncio.open_connection("127.0.0.1", port)) == b"ping"
        server.close()
        await server.wait_closed()
        assert not server.is_serving()

        server = await loop.create_server(Echo, host=["127.0.0.1", "localhost"], port=0,
                                          family=socket.AF_INET, reuse_address=True)
        assert len(server.sockets) >= 1
        for sock in server.sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_create_server_address_in_use_is_oserror_eaddrinuse(loop):
    async def main():
        first = await loop.create_server(Echo, "127.0.0.1", 0)
        port = first.sockets[0].getsockname()[1]
        with pytest.raises(OSError) as info:
            await loop.create_server(Echo, "127.0.0.1", port, reuse_address=False)
        assert info.value.errno == errno.EADDRINUSE
        first.close()
        await first.wait_closed()

    loop.run_until_complete(main())


def test_start_serving_false_then_serve_forever_cancelled(loop):
    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0, start_serving=False)
        assert not server.is_serving()
        port = server.sockets[0].getsockname()[1]
        task = asyncio.ensure_future(server.serve_forever())
        await asyncio.sleep(0.01)
        assert server.is_serving()
        assert await _echo_once(*await asyncio.open_connection("127.0.0.1", port)) == b"ping"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_server_async_context_manager_and_keep_alive(loop):
    async def main():
        kwargs = {"keep_alive": True} if loop_supports_keep_alive(loop) else {}
        async with await loop.create_server(Echo, "127.0.0.1", 0, **kwargs) as server:
            port = server.sockets[0].getsockname()[1]
            if kwargs:
                keep = server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                assert keep != 0
            assert await _echo_once(*await asyncio.open_connection("127.0.0.1", port)) == b"ping"
        assert not server.is_serving()

    loop.run_until_complete(main())


def loop_supports_keep_alive(loop) -> bool:
    import inspect

    return "keep_alive" in inspect.signature(loop.create_server).parameters


def test_close_clients_and_abort_clients(loop):
    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        if not hasattr(server, "close_clients"):
            server.close()
            pytest.skip("this Python's asyncio.Server has no close_clients (3.13+)")
        port = server.sockets[0].getsockname()[1]
        other = await loop.create_server(Echo, "127.0.0.1", 0)
        other_reader, other_writer = await asyncio.open_connection(
            "127.0.0.1", other.sockets[0].getsockname()[1]
        )
        pairs = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for reader, writer in pairs:
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
        server.close()
        server.close_clients()
        for reader, _ in pairs:
            assert await reader.read() == b""
        pairs = []
        await server.wait_closed()
        # Another server's connections are not its clients.
        other_writer.write(b"still here")
        assert await other_reader.readexactly(10) == b"still here"
        other_writer.close()
        other.close()
        await other.wait_closed()

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"y")
        assert await reader.readexactly(1) == b"y"
        server.close()
        server.abort_clients()
        assert await reader.read() == b""
        writer.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_accepted_connections_socket_made_on_demand_and_every_fd_released(new_loop):
    # ferroloop's transport of an accepted connection owns its fd and makes a socket
    # object only when asked. That object must be the fd's, non-blocking, and the same
    # each time; and whether a connection is closed by the peer, by the server or not at
    # all before the loop closes, asked for its socket or not, no fd stays open.
    import gc
    import warnings

    gc.collect()  # earlier tests' unclosed sockets must not close during this one
    before = open_fds()
    loop = new_loop()
    accepted = []

    class Accepted(asyncio.Protocol):
        def connection_made(self, transport):
            accepted.append(transport)

    async def main():
        server = await loop.create_server(Accepted, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = [await loop.create_connection(asyncio.Protocol, "127.0.0.1", port) for _ in range(6)]
        while len(accepted) < 6:
            await asyncio.sleep(0.01)
        for tr in accepted[::2]:
            sock = tr.get_extra_info("socket")
            assert sock is tr.get_extra_info("socket")
            assert sock.fileno() >= 0 and sock.gettimeout() == 0
            assert (sock.family, sock.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert sock.getpeername() == tr.get_extra_info("peername")
        # By the peer: 0 and 1; by the server: 2 and 3; 4 and 5 stay open.
        for tr, _ in clients[:2]:
            tr.close()
        for tr in accepted[2:4]:
            tr.close()
        while not all(tr.is_closing() for tr in accepted[:4]):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.01)
        assert accepted[0].get_extra_info("socket").fileno() == -1
        for tr, _ in clients[2:]:
            tr.close()
        server.close()
        await asyncio.sleep(0.01)

    loop.run_until_complete(main())
    loop.close()
    accepted.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    assert open_fds() == before


def test_unix_server_and_connection_with_stale_socket_file(loop, tmp_path):
    path = str(tmp_path / "srv.sock")
    # A stale socket file left behind by a dead server.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    assert os.path.exists(path)

    async def main():
        server = await loop.create_unix_server(Echo, path)
        assert server.sockets[0].getsockname() == path
        reader, writer = await asyncio.open_unix_connection(path)
        assert writer.get_extra_info("peername") == path
        assert await _echo_once(reader, writer, b"unix") == b"unix"
        echoed = loop.create_future()

        class Client(asyncio.Protocol):
            def data_received(self, data):
                echoed.set_result(data)

        tr, _ = await loop.create_unix_connection(Client, path)
        assert isinstance(tr, asyncio.Transport)
        # Served before it closes: the server's side exists, so wait_closed() (which
        # from 3.12 waits for it) does not return before it does.
        tr.write(b"x")
        assert await echoed == b"x"
        tr.close()
        with pytest.raises(ValueError):
            await loop.create_unix_connection(asyncio.Protocol, path, sock=socket.socket())
        with pytest.raises(ValueError):
            await loop.create_unix_connection(asyncio.Protocol)
        with pytest.raises(ValueError):
            await loop.create_unix_server(Echo, sock=socket.socket())
        with pytest.raises(TypeError):
            await loop.create_unix_server(Echo, path + "2", ssl=True)
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())
    # A closed server removes its socket file from 3.13 on (cleanup_socket=True, the
    # default); before, the file stays.
    assert os.path.exists(path) == (sys.version_info < (3, 13))


@pytest.mark.skipif(sys.version_info < (3, 13), reason="cleanup_socket is new in 3.13")
def test_unix_server_cleanup_socket_removes_only_its_own_file(loop, tmp_path):
    kept, replaced = str(tmp_path / "kept.sock"), str(tmp_path / "replaced.sock")

    async def main():
        server = await loop.create_unix_server(Echo, kept, cleanup_socket=False)
        server.close()
        await server.wait_closed()
        assert os.path.exists(kept)
        server = await loop.create_unix_server(Echo, replaced)
        os.unlink(replaced)
        with open(replaced, "w") as other:  # someone else's file now
            other.write("not the server's")
        server.close()
        await server.wait_closed()
        with open(replaced) as other:
            assert other.read() == "not the server's"

    loop.run_until_complete(main())


def test_unix_server_in_the_abstract_namespace(loop):
    name = f"\0ferroloop-test-{os.getpid()}"

    async def main():
        server = await loop.create_unix_server(Echo, name)
        reader, writer = await asyncio.open_unix_connection(name)
        assert await _echo_once(reader, writer, b"abstract") == b"abstract"
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_connect_accepted_socket_and_create_connection_with_sock(loop):
    async def main():
        a, b = socket.socketpair()
        tr, _proto = await loop.connect_accepted_socket(Echo, a)
        b.setblocking(False)
        await loop.sock_sendall(b, b"accepted")
        assert await loop.sock_recv(b, 100) == b"accepted"
        tr.close()
        b.close()

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        sock = socket.create_connection(("127.0.0.1", port))
        tr, _ = await loop.create_connection(asyncio.Protocol, sock=sock)
        assert tr.get_extra_info("socket").fileno() == sock.fileno()
        tr.close()
        await asyncio.sleep(0.01)
        assert sock.fileno() == -1  # the transport owned it and closed it
        with pytest.raises(ValueError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, sock=socket.socket())
        with pytest.raises(ValueError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port, server_hostname="x")
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_create_connection_refused_and_local_addr(loop):
    async def main():
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there now
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)

        server = await loop.create_server(Echo, "127.0.0.1", 0)
        sport = server.sockets[0].getsockname()[1]
        tr, _ = await loop.create_connection(
            asyncio.Protocol, "127.0.0.1", sport, local_addr=("127.0.0.1", 0)
        )
        assert tr.get_extra_info("sockname")[0] == "127.0.0.1"
        tr.close()
        server.close()
        await server.wait_closed()

    loop.run_until_complete(main())


def test_create_connection_all_errors_reports_every_address(loop):
    if loop_supports_all_errors(loop) is False:
        pytest.skip("this Python's asyncio has no create_connection(all_errors=) (3.12+)")

    async def main():
        ports = []
        for _ in range(2):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
            probe.close()
        infos = [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", p)) for p in ports
        ]

        async def fake_getaddrinfo(*args, **kwargs):
            return infos

        loop.getaddrinfo = fake_getaddrinfo
        with pytest.raises(ExceptionGroup) as info:  # noqa: F821
            await loop.create_connection(asyncio.Protocol, "example.test", 1, all_errors=True)
        assert len(info.value.exceptions) == 2
        assert all(isinstance(e, ConnectionRefusedError) for e in info.value.exceptions)
        with pytest.raises(OSError) as info:
            await loop.create_connection(asyncio.Protocol, "example.test", 1)
        assert not isinstance(info.value, ExceptionGroup)  # noqa: F821

    loop.run_until_complete(main())


def loop_supports_all_errors(loop) -> bool:
    import inspect

    # ferroloop's signature has it on every version but refuses it before 3.11.
    has = "all_errors" in inspect.signature(loop.create_connection).parameters
    return has and sys.version_info >= (3, 11)


# Stock asyncio's happy eyeballs left cycles through the failed attempts' errors until
# CPython gh-124858 (3.12.7, 3.13.1; 3.11 and older keep them).
_STOCK_HAPPY_EYEBALLS_CYCLES = sys.version_info < (3, 12, 7) or (
    (3, 13) <= sys.version_info < (3, 13, 1)
)


@pytest.mark.parametrize("connects", [False, True], ids=["all-fail", "last-connects"])
@pytest.mark.parametrize("mode", ["sequential", "interleave", "happy_eyeballs", "all_errors"])
def test_create_connection_leaves_no_reference_cycle(loop, loop_name, mode, connects):
    """A create_connection that goes through failed attempts leaves no garbage for the
    cyclic collector: the errors' tracebacks hold the frames they went through, so no
    frame may keep a list of those errors (asyncio drops each such list)."""
    if loop_name == "asyncio":
        if mode == "happy_eyeballs" and _STOCK_HAPPY_EYEBALLS_CYCLES:
            pytest.skip("this Python's asyncio leaves cycles with happy eyeballs (gh-124858)")
        if connects:
            # Its create_connection keeps the failed attempts' list in its frame.
            pytest.skip("asyncio leaves a cycle when an attempt connects after failures")
    if mode == "all_errors" and not loop_supports_all_errors(loop):
        pytest.skip("this Python's asyncio has no create_connection(all_errors=) (3.12+)")
    kwargs = {
        "sequential": {},
        "interleave": {"interleave": 1},
        "happy_eyeballs": {"happy_eyeballs_delay": 0.05},
        "all_errors": {"all_errors": True},
    }[mode]
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    closed_port = probe.getsockname()[1]
    probe.close()  # nothing listens on that port, on any of the addresses below
    infos = [
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", closed_port)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", closed_port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", closed_port)),
    ]
    server = None
    if connects:
        server = loop.run_until_complete(loop.create_server(Echo, "127.0.0.1", 0))
        infos.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", server.sockets[0].getsockname()))

    async def fake_getaddrinfo(*args, **kwargs):
        return list(infos)

    loop.getaddrinfo = fake_getaddrinfo

    async def attempt():
        # What happened, as plain data: the error itself must be gone before collecting.
        try:
            tr, _ = await loop.create_connection(asyncio.Protocol, "example.test", 1, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the error is what the test looks at
            # No local may hold the group's errors: their tracebacks reach this frame
            # (from 3.12 a finished frame keeps its caller), which would be the test's
            # own cycle.
            return type(exc), [type(e) for e in getattr(exc, "exceptions", ())]
        peer = tr.get_extra_info("peername")
        tr.close()
        await asyncio.sleep(0)
        return peer

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        outcome = loop.run_until_complete(attempt())
        gc.collect()
        garbage = sorted({type(o).__name__ for o in gc.garbage})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    if connects:
        assert outcome == server.sockets[0].getsockname()
        server.close()
        loop.run_until_complete(server.wait_closed())
    elif mode == "all_errors" and sys.version_info >= (3, 11):
        assert outcome == (ExceptionGroup, [ConnectionRefusedError] * 3)  # noqa: F821
    else:
        assert issubclass(outcome[0], OSError)
    assert garbage == []



@pytest.mark.skipif(sys.version_info >= (3, 11), reason="3.11+ ferroloop takes all_errors")
def test_create_connection_all_errors_is_refused_before_3_11(loop):
    # 3.10's asyncio has no such parameter (and no ExceptionGroup): passing it at all is
    # a TypeError.
    with pytest.raises(TypeError, match="all_errors"):
        loop.run_until_complete(
            loop.create_connection(asyncio.Protocol, "127.0.0.1", 1, all_errors=False)
        )
