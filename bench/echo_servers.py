"""The echo servers the echo benchmark drives, one process per (loop, kind).

    python bench/echo_servers.py LOOP KIND   # prints the port, serves until SIGTERM

LOOP: asyncio | uvloop | ferroloop. KIND: streams | protocol | buffered | sock.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "ferroloop":
        import ferroloop

        return ferroloop.new_event_loop()
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def streams_handler(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class EchoBufferedProtocol(asyncio.BufferedProtocol):
    def connection_made(self, transport):
        self.transport = transport
        self.buffer = bytearray(256 * 1024)
        self.view = memoryview(self.buffer)

    def get_buffer(self, sizehint):
        return self.view

    def buffer_updated(self, nbytes):
        self.transport.write(self.view[:nbytes])


async def sock_echo(loop, conn):
    with conn:
        while data := await loop.sock_recv(conn, 65536):
            await loop.sock_sendall(conn, data)


async def serve_sock(loop, listener):
    while True:
        conn, _ = await loop.sock_accept(listener)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.create_task(sock_echo(loop, conn))


async def main(kind: str) -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
    if kind == "sock":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        task = loop.create_task(serve_sock(loop, listener))
    else:
        if kind == "streams":
            server = await asyncio.start_server(streams_handler, "127.0.0.1", 0, backlog=1024)
        else:
            factory = EchoProtocol if kind == "protocol" else EchoBufferedProtocol
            server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
    print(port, flush=True)
    await stop
    if kind == "sock":
        task.cancel()
        listener.close()
    else:
        server.close()


if __name__ == "__main__":
    loop_name, kind = sys.argv[1], sys.argv[2]
    loop = new_loop(loop_name)
    try:
        loop.run_until_complete(main(kind))
    finally:
        loop.close()
