"""add_reader/add_writer, signals, name resolution and the sock_* calls."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from tests.conftest import open_fds


def test_add_reader_is_level_triggered_and_remove_returns_bool(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []

    def on_readable():
        calls.append(a.recv(1))  # one byte per call: the rest must still wake us
        if len(calls) == 3:
            assert loop.remove_reader(a) is True
            loop.stop()

    assert loop.add_reader(a, on_readable) is None
    b.send(b"xyz")
    loop.run_forever()
    assert calls == [b"x", b"y", b"z"]
    assert loop.remove_reader(a) is False
    assert loop.remove_writer(a.fileno()) is False
    a.close()
    b.close()


def test_add_writer_replaces_previous_callback(loop):
    a, b = socket.socketpair()
    calls = []
    loop.add_writer(a.fileno(), calls.append, "old")
    loop.add_writer(a.fileno(), lambda: (calls.append("new"), loop.remove_writer(a), loop.stop()))
    loop.run_forever()
    assert calls == ["new"]
    a.close()
    b.close()


def test_reader_and_writer_on_the_same_fd(loop):
    a, b = socket.socketpair()
    seen = set()

    def done(kind):
        seen.add(kind)
        (loop.remove_reader if kind == "r" else loop.remove_writer)(a)
        if seen == {"r", "w"}:
            loop.stop()

    loop.add_reader(a, done, "r")
    loop.add_writer(a, done, "w")
    b.send(b"!")
    loop.run_forever()
    assert seen == {"r", "w"}
    a.close()
    b.close()


@pytest.mark.parametrize("bad", [-1, "x", object(), 3.5])
def test_add_reader_invalid_fd(loop, bad):
    with pytest.raises(ValueError):
        loop.add_reader(bad, print)


def test_add_reader_regular_file_is_permission_error(loop, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"data")
    with open(path, "rb") as fh, pytest.raises(PermissionError):
        loop.add_reader(fh, print)


def test_signal_handler_runs_as_a_handle(loop):
    got = []
    loop.add_signal_handler(signal.SIGUSR1, lambda *a: (got.append(a), loop.stop()), "arg")
    loop.call_soon(os.kill, os.getpid(), signal.SIGUSR1)
    loop.run_forever()
    assert got == [("arg",)]
    assert loop.remove_signal_handler(signal.SIGUSR1) is True
    assert loop.remove_signal_handler(signal.SIGUSR1) is False
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_signal_handler_bad_input(loop):
    async def coro_fn():
        pass

    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR1, coro_fn)
    with pytest.raises(TypeError):
        loop.add_signal_handler("SIGUSR1", print)
    with pytest.raises(ValueError):
        loop.add_signal_handler(10_000, print)
    with pytest.raises(RuntimeError):
        loop.add_signal_handler(signal.SIGKILL, print)


def test_signal_handler_outside_main_thread_is_runtime_error(loop):
    import threading

    errors = []

    def other():
        try:
            loop.add_signal_handler(signal.SIGUSR2, print)
        except RuntimeError as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1


def test_sigint_interrupts_a_blocked_loop_with_keyboard_interrupt(loop):
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import threading

        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            loop.run_until_complete(asyncio.sleep(30))
        timer.join()
    finally:
        signal.signal(signal.SIGINT, old)


def test_getaddrinfo_numeric_and_named(loop):
    infos = loop.run_until_complete(loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM))
    assert infos[0][4] == ("127.0.0.1", 80)
    named = loop.run_until_complete(loop.getaddrinfo("localhost", "80", type=socket.SOCK_STREAM))
    assert named and all(info[1] == socket.SOCK_STREAM for info in named)
    with pytest.raises(socket.gaierror):
        loop.run_until_complete(loop.getaddrinfo("no-such-host.invalid", 80))
    host, port = loop.run_until_complete(
        loop.getnameinfo(("127.0.0.1", 80), socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
    )
    assert (host, port) == ("127.0.0.1", "80")


def _listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.setblocking(False)
    return srv


def test_sock_echo_round_trip(loop):
    payload = os.urandom(1 << 20)

    async def main():
        srv = _listener()
        cli = socket.socket()
        cli.setblocking(False)

        async def serve():
            conn, _ = await loop.sock_accept(srv)
            with conn:
                got = bytearray()
                while len(got) < len(payload):
                    chunk = await loop.sock_recv(conn, 65536)
                    assert chunk
                    got += chunk
                await loop.sock_sendall(conn, bytes(got))

        server = asyncio.ensure_future(serve())
        await loop.sock_connect(cli, srv.getsockname())
        await loop.sock_sendall(cli, payload)
        echoed = bytearray(len(payload))
        view = memoryview(echoed)
        n = 0
        while n < len(payload):
            n += await loop.sock_recv_into(cli, view[n:])
        await server
        cli.close()
        srv.close()
        return bytes(echoed)

    assert loop.run_until_complete(main()) == payload


def test_sock_recv_large_then_short_reads_and_eof(loop):
    # After a large read ferroloop reads straight into a bytes of the size asked for and
    # cuts it to what arrived: full, partial, tiny and empty (EOF) results must be exact.
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    big = os.urandom(100 * 1024)

    async def main():
        await loop.sock_sendall(b, big)
        got = bytearray()
        while len(got) < len(big):
            chunk = await loop.sock_recv(a, 65536)
            assert type(chunk) is bytes and 0 < len(chunk) <= 65536
            got += chunk
        assert bytes(got) == big
        b.send(b"tiny!")
        assert await loop.sock_recv(a, 65536) == b"tiny!"
        await loop.sock_sendall(b, big[:40000])
        first = await loop.sock_recv(a, 65536)
        rest = bytearray(first)
        while len(rest) < 40000:
            rest += await loop.sock_recv(a, 65536)
        assert bytes(rest) == big[:40000]
        b.shutdown(socket.SHUT_WR)
        assert await loop.sock_recv(a, 65536) == b""

    try:
        loop.run_until_complete(main())
    finally:
        a.close()
        b.close()


def test_sock_datagram_calls(loop):
    if not hasattr(loop, "sock_sendto"):
        pytest.skip("asyncio's sock_sendto/sock_recvfrom/sock_recvfrom_into are 3.11+")

    async def main():
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setblocking(False)
            s.bind(("127.0.0.1", 0))
        sent = await loop.sock_sendto(a, b"ping", b.getsockname())
        data, _ = await loop.sock_recvfrom(b, 100)
        buf = bytearray(10)
        await loop.sock_sendto(b, b"pong", a.getsockname())
        n, _ = await loop.sock_recvfrom_into(a, buf)
        a.close()
        b.close()
        return sent, data, bytes(buf[:n])

    sent, data, back = loop.run_until_complete(main())
    assert (sent, data, back) == (4, b"ping", b"pong")


def test_sock_recv_cancellation_leaves_socket_usable_and_leaks_nothing(loop):
    before = open_fds()

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        task = asyncio.ensure_future(loop.sock_recv(a, 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        b.send(b"after")
        data = await loop.sock_recv(a, 10)
        a.close()
        b.close()
        return data

    assert loop.run_until_complete(main()) == b"after"
    assert open_fds() == before


def test_sock_recv_cancelled_while_a_new_call_waits_does_not_steal_it(loop):
    # The cancelled call's clean-up runs after the new call parked itself on the same fd:
    # it must withdraw only its own operation, and its data must go to the new call.
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        first = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        first.cancel()
        second = asyncio.ensure_future(loop.sock_recv(a, 100))
        await asyncio.sleep(0)
        b.send(b"for the second")
        assert await asyncio.wait_for(second, 5) == b"for the second"
        assert first.cancelled()

        buf = bytearray(100)
        first = asyncio.ensure_future(loop.sock_recv_into(a, buf))
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        b.send(b"into")
        assert await asyncio.wait_for(loop.sock_recv_into(a, buf), 5) == 4
        assert bytes(buf[:4]) == b"into"

        # sendall larger than the socket buffer: completes once the peer reads.
        big = os.urandom(8 << 20)
        sending = asyncio.ensure_future(loop.sock_sendall(b, big))
        got = bytearray()
        while len(got) < len(big):
            got += await loop.sock_recv(a, 1 << 20)
        await asyncio.wait_for(sending, 5)
        assert bytes(got) == big
        a.close()
        b.close()

    loop.run_until_complete(main())


def _pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _recv_after_wait(loop, sock, peer, data):
    """A sock_recv that has to wait (nothing to read yet), then gets `data`."""
    waiting = asyncio.ensure_future(loop.sock_recv(sock, 100))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    peer.send(data)
    return await asyncio.wait_for(waiting, 5)


def test_sock_recv_sees_eof_that_came_with_the_last_data(loop):
    # The peer's last bytes and its FIN arrive while no read waits, and the loop polls
    # meanwhile (the fd is registered edge-triggered after the first wait). The read
    # that takes those bytes takes fewer than asked and consumes the FIN, so EOF is
    # pending with no new readiness to come: the next sock_recv must return b"" at
    # once, not wait for an event (a "short read means empty" shortcut hangs here).
    async def main():
        srv = _listener()
        cli = socket.socket()
        cli.setblocking(False)
        await loop.sock_connect(cli, srv.getsockname())
        peer, _ = srv.accept()
        try:
            assert await _recv_after_wait(loop, cli, peer, b"first") == b"first"
            peer.sendall(b"last")
            peer.close()
            await asyncio.sleep(0.1)
            assert await loop.sock_recv(cli, 1000) == b"last"
            assert await asyncio.wait_for(loop.sock_recv(cli, 1000), 5) == b""
            view = memoryview(bytearray(10))
            assert await asyncio.wait_for(loop.sock_recv_into(cli, view), 5) == 0
        finally:
            cli.close()
            srv.close()

    loop.run_until_complete(main())


def test_sock_recv_on_a_reused_fd_number_while_the_old_file_lives_on(loop):
    # The old socket's file stays open through a duplicate (as in a forked child) while
    # its fd number goes to a new socket: the new socket's calls must wait on the new
    # file, and the old file's readiness must not reach them.
    async def main():
        a, b = _pair()
        assert await _recv_after_wait(loop, a, b, b"first") == b"first"
        number = a.fileno()
        keep = os.dup(number)
        a.close()
        c, d = _pair()
        if c.fileno() != number:
            os.dup2(c.fileno(), number)
            c.close()
            c = socket.socket(fileno=number)
            c.setblocking(False)
        waiting = asyncio.ensure_future(loop.sock_recv(c, 100))
        await asyncio.sleep(0.01)
        b.send(b"stale")  # readiness of the old file only
        await asyncio.sleep(0.05)
        assert not waiting.done()
        d.send(b"fresh")
        assert await asyncio.wait_for(waiting, 5) == b"fresh"
        assert os.read(keep, 100) == b"stale"
        os.close(keep)
        for s in (b, c, d):
            s.close()

    before = open_fds()
    loop.run_until_complete(main())
    assert open_fds() == before


def test_add_reader_after_sock_calls_is_level_triggered(loop):
    async def main():
        a, b = _pair()
        assert await _recv_after_wait(loop, a, b, b"one") == b"one"
        got = []
        done = loop.create_future()

        def on_readable():
            got.append(a.recv(1))  # one byte per call: the rest must still wake us
            if len(got) == 3:
                loop.remove_reader(a)
                done.set_result(None)

        loop.add_reader(a, on_readable)
        b.send(b"xyz")
        await asyncio.wait_for(done, 5)
        assert got == [b"x", b"y", b"z"]
        assert await _recv_after_wait(loop, a, b, b"two") == b"two"
        # And back: a reader added while a sock call waits on the writer side.
        big = os.urandom(4 << 20)
        sending = asyncio.ensure_future(loop.sock_sendall(a, big))
        await asyncio.sleep(0.01)
        assert not sending.done()
        loop.add_reader(a, on_readable)
        b.send(b"!")
        received = bytearray()
        while len(received) < len(big):
            try:
                received += b.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        await asyncio.wait_for(sending, 5)
        assert bytes(received) == big
        assert got[3:] == [b"!"]
        loop.remove_reader(a)
        a.close()
        b.close()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_a_socket_taken_over_by_a_transport_after_sock_calls(loop):
    async def main():
        a, b = _pair()
        assert await _recv_after_wait(loop, a, b, b"before") == b"before"
        received = loop.create_future()

        class Proto(asyncio.Protocol):
            def data_received(self, data):
                received.set_result(data)

        tr, _ = await loop.connect_accepted_socket(Proto, a)
        b.send(b"to the transport")
        assert await asyncio.wait_for(received, 5) == b"to the transport"
        tr.close()
        await asyncio.sleep(0)
        b.close()

    loop.run_until_complete(main())


def test_sock_calls_keep_no_socket_alive(loop):
    import gc
    import warnings
    import weakref

    async def main():
        a, b = _pair()
        assert await _recv_after_wait(loop, a, b, b"x") == b"x"
        buf = bytearray(10)
        waiting = asyncio.ensure_future(loop.sock_recv_into(a, buf))
        await asyncio.sleep(0.01)
        b.send(b"y")
        assert await asyncio.wait_for(waiting, 5) == 1
        ref = weakref.ref(a)
        del a, waiting
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()
        assert ref() is None
        b.close()

    gc.collect()  # earlier tests' unclosed sockets must not close during this one
    before = open_fds()
    loop.run_until_complete(main())
    assert open_fds() == before


def test_sock_calls_refuse_a_transport_socket_and_bad_sizes(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        with pytest.raises(ValueError):
            await loop.sock_recv(a, -1)
        tr, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        with pytest.raises(RuntimeError):  # nothing to read: it would have to wait
            await loop.sock_recv(a, 10)
        tr.close()
        await asyncio.sleep(0)
        b.close()

    loop.run_until_complete(main())


def test_sock_connect_refused(loop):
    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    addr = port_holder.getsockname()
    port_holder.close()

    async def main():
        s = socket.socket()
        s.setblocking(False)
        try:
            await loop.sock_connect(s, addr)
        finally:
            s.close()

    with pytest.raises(ConnectionRefusedError):
        loop.run_until_complete(main())


def test_loop_close_releases_its_fds(new_loop):
    before = open_fds()
    for _ in range(50):
        lp = new_loop()
        lp.run_until_complete(asyncio.sleep(0))
        lp.close()
    assert open_fds() == before
