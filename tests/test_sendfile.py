"""loop.sendfile and loop.sock_sendfile: zero-copy where possible, asyncio's fallback,
its errors and its file-position updates."""

from __future__ import annotations

import asyncio
import socket

import pytest

DATA = bytes(range(256)) * 4000  # 1,024,000 bytes


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "payload.bin"
    path.write_bytes(DATA)
    return path


async def _collect(reader, out: bytearray, done: asyncio.Future):
    while chunk := await reader.read(65536):
        out += chunk
    done.set_result(bytes(out))


async def _close(writer, server):
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()


def test_sendfile_over_a_transport_with_offset_and_count(loop, data_file):
    async def main():
        received = bytearray()
        done = loop.create_future()

        async def handler(reader, writer):
            await _collect(reader, received, done)
            writer.close()

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"head:")
        sent = await loop.sendfile(writer.transport, f, offset=1000, count=500_000)
        assert sent == 500_000
        assert f.tell() == 501_000
        writer.write(b":tail")  # writing works again after sendfile
        writer.write_eof()
        assert await done == b"head:" + DATA[1000:501_000] + b":tail"
        await _close(writer, server)

    with open(data_file, "rb") as f:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_sendfile_from_an_accepted_connection(loop, data_file):
    # The server side of an accepted connection (whose socket object ferroloop makes
    # only when asked) sends the file, then writes and closes as usual.
    async def main():
        done = loop.create_future()

        async def handler(reader, writer):
            sent = await loop.sendfile(writer.transport, f)
            writer.write(b":tail")
            writer.close()
            done.set_result(sent)

        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.read() == DATA + b":tail"
        assert await done == len(DATA)
        await _close(writer, server)

    with open(data_file, "rb") as f:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_sock_sendfile_whole_file_and_fallback_for_non_files(loop, data_file):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)

        async def drain_b(n):
            got = bytearray()
            while len(got) < n:
                got += await loop.sock_recv(b, 1 << 20)
            return bytes(got)

        reader = asyncio.ensure_future(drain_b(len(DATA)))
        assert await loop.sock_sendfile(a, f) == len(DATA)
        assert await reader == DATA
        assert f.tell() == len(DATA)

        import io

        buf = io.BytesIO(b"not a real file" * 100)
        reader = asyncio.ensure_future(drain_b(1500))
        assert await loop.sock_sendfile(a, buf) == 1500  # fallback: read + sock_sendall
        assert await reader == b"not a real file" * 100
        with pytest.raises(asyncio.SendfileNotAvailableError):
            await loop.sock_sendfile(a, io.BytesIO(b"x"), fallback=False)
        a.close()
        b.close()

    with open(data_file, "rb") as f:
        loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_sendfile_rejects_bad_arguments(loop, data_file):
    async def main(f, text):
        a, b = socket.socketpair()
        a.setblocking(False)
        with pytest.raises(ValueError):
            await loop.sock_sendfile(a, f, offset=-1)
        with pytest.raises(ValueError):
            await loop.sock_sendfile(a, f, count=0)
        with pytest.raises(TypeError):
            await loop.sock_sendfile(a, f, count="1")
        with pytest.raises(ValueError):
            await loop.sock_sendfile(a, text)  # text mode
        a.close()
        b.close()

    with open(data_file, "rb") as f, open(data_file) as text:
        loop.run_until_complete(main(f, text))
