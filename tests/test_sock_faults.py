"""sock_* calls and add_reader driven the way a careless caller or a hostile peer
would: closed sockets, sizes from the network, empty buffers, odd fd numbers. Stock
asyncio is the reference for every result and exception type."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import subprocess
import sys

import pytest


def _stream_pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _tcp_pair():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _unix_pair(name):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(name)
        listener.listen()
        a = socket.socket(socket.AF_UNIX)
        a.connect(name)
        b, _ = listener.accept()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _datagram_pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setblocking(False)
    b.setblocking(False)
    return a, b


def _unconnected_datagram():
    a = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.bind(f"\0ferroloop-faults-{os.getpid()}-{id(a)}")
    a.setblocking(False)
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setblocking(False)
    return a, b


PAIRS = {
    "tcp": lambda tmp: _tcp_pair(),
    "unix-path": lambda tmp: _unix_pair(str(tmp / "s")),
    "unix-abstract": lambda tmp: _unix_pair(f"\0ferroloop-faults-{os.getpid()}"),
    "unix-datagram": lambda tmp: _datagram_pair(),
    "unix-datagram-unconnected": lambda tmp: _unconnected_datagram(),
}

WAITS = {
    "sock_recv": lambda loop, s: loop.sock_recv(s, 100),
    "sock_recv_into": lambda loop, s: loop.sock_recv_into(s, bytearray(100)),
    "sock_recvfrom": lambda loop, s: loop.sock_recvfrom(s, 100),
    # More than the socket buffers take, so that it waits.
    "sock_sendall": lambda loop, s: loop.sock_sendall(s, b"x" * (64 << 20)),
}


def _recording(loop):
    calls = []
    loop.set_exception_handler(lambda _loop, context: calls.append(context))
    return calls


def _skip_if_missing(loop, op):
    if not hasattr(loop, op):
        pytest.skip(f"this asyncio has no {op} (3.11+)")


@pytest.mark.parametrize("kind", sorted(PAIRS))
@pytest.mark.parametrize("op", sorted(WAITS))
@pytest.mark.parametrize("when", ["close-while-waiting", "close-after-cancel"])
def test_closing_a_socket_around_a_waiting_call_reports_nothing(loop, tmp_path, kind, op, when):
    """asyncio keeps the fd number it registered: closing the socket object while the
    call waits, or right after it was cancelled, never reaches the exception handler."""
    _skip_if_missing(loop, op)
    calls = _recording(loop)

    async def main():
        a, b = PAIRS[kind](tmp_path)
        if op == "sock_sendall" and a.type == socket.SOCK_DGRAM:
            a.close()
            b.close()
            return
        task = asyncio.ensure_future(WAITS[op](loop, a))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not task.done()
        if when == "close-while-waiting":
            a.close()
            await asyncio.sleep(0)
            task.cancel()
        else:
            task.cancel()
            a.close()
        with pytest.raises(asyncio.CancelledError):
            await task
        # A few turns for any callback left behind, and a new socket on the fd number.
        c, d = _stream_pair()
        d.send(b"ping")
        assert await loop.sock_recv(c, 100) == b"ping"
        for _ in range(3):
            await asyncio.sleep(0)
        for s in (b, c, d):
            s.close()

    loop.run_until_complete(main())
    assert calls == []


def test_zero_size_reads_return_at_once_and_leave_the_data(loop):
    async def main():
        a, b = _stream_pair()
        # Nothing to read: the first step of the coroutine finishes it, no waiting.
        with pytest.raises(StopIteration) as done:
            loop.sock_recv(a, 0).send(None)
        assert done.value.value == b""
        with pytest.raises(StopIteration) as done:
            loop.sock_recv_into(a, bytearray(0)).send(None)
        assert done.value.value == 0
        b.send(b"data")
        assert await loop.sock_recv(a, 0) == b""
        assert await loop.sock_recv_into(a, bytearray(0)) == 0
        assert await loop.sock_recv(a, 100) == b"data"
        a.close()
        b.close()

    loop.run_until_complete(main())


_HUGE_RECV = """
import asyncio, socket, sys
import ferroloop
loop = {"asyncio": asyncio.new_event_loop, "ferroloop": ferroloop.new_event_loop}[sys.argv[1]]()
a, b = socket.socketpair()
a.setblocking(False)
b.send(b"data")
calls = [lambda: loop.sock_recv(a, 2**40)]
if hasattr(loop, "sock_recvfrom"):  # asyncio: 3.11+
    calls.append(lambda: loop.sock_recvfrom(a, 2**40))
else:
    print("MemoryError")
for call in calls:
    try:
        loop.run_until_complete(call())
    except MemoryError:
        print("MemoryError")
print(loop.run_until_complete(loop.sock_recv(a, 100)))
"""


def test_huge_read_size_is_memory_error_not_an_abort(loop_name):
    """A size from the network is allocated with a fallible allocation; in a child
    process, so that an abort shows as a failure."""
    child = subprocess.run(
        [sys.executable, "-c", _HUGE_RECV, loop_name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.split() == ["MemoryError", "MemoryError", "b'data'"]


CLOSED_CALLS = {
    "sock_recv": lambda loop, s: loop.sock_recv(s, 10),
    "sock_recv_into": lambda loop, s: loop.sock_recv_into(s, bytearray(10)),
    "sock_recvfrom": lambda loop, s: loop.sock_recvfrom(s, 10),
    "sock_sendall": lambda loop, s: loop.sock_sendall(s, b"data"),
}


@pytest.mark.parametrize("op", sorted(CLOSED_CALLS))
def test_call_on_a_closed_socket_is_oserror_ebadf(loop, op):
    _skip_if_missing(loop, op)
    a, b = _stream_pair()
    a.close()
    with pytest.raises(OSError) as caught:
        loop.run_until_complete(CLOSED_CALLS[op](loop, a))
    assert type(caught.value) is OSError
    assert caught.value.errno == errno.EBADF
    b.close()


def test_sendall_of_a_non_contiguous_view_is_buffer_error(loop):
    a, b = _stream_pair()
    with pytest.raises(BufferError):
        loop.run_until_complete(loop.sock_sendall(a, memoryview(b"abcdef")[::2]))
    a.close()
    b.close()


@pytest.mark.parametrize("add", ["add_reader", "add_writer"])
def test_add_fd_callback_fd_numbers_beyond_c_int_and_negative(loop, add):
    for fd in (2**31, 2**40, 2**63, 2**100):
        with pytest.raises(OverflowError):
            getattr(loop, add)(fd, print)
    for fd in (-1, -(2**40), -(2**100)):
        with pytest.raises(ValueError):
            getattr(loop, add)(fd, print)


@pytest.mark.parametrize("remove", ["remove_reader", "remove_writer"])
def test_remove_fd_callback_fd_numbers_beyond_c_int_and_negative(loop, remove):
    for fd in (2**31, 2**40, 2**63, 2**100):
        assert getattr(loop, remove)(fd) is False
    for fd in (-1, -(2**100)):
        with pytest.raises(ValueError):
            getattr(loop, remove)(fd)
