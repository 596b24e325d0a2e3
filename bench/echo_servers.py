"""The echo servers the echo benchmark drives, one process per (loop, kind).

    python bench/echo_servers.py LOOP KIND   # prints the port, serves until SIGTERM

LOOP: asyncio | uvloop | ferroloop | rloop | rsloop.
KIND: streams | readline | protocol | buffered | sock | http (httptools, keep-alive;
the request path is the body size to answer with, as bench/loadgen sends it) | tls
(the streams echo over TLS, with the certificate bench/_tls.py gives it) | tls-handshake
(the same server, which the load generator reconnects to for every request) | churn
(the streams echo, which the load generator reconnects to for every request).
"""

from __future__ import annotations

import asyncio
import resource
import signal
import socket
import sys
from typing import ClassVar

from _loops import new_loop
from _tls import server_context


async def streams_handler(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def readline_handler(reader, writer):
    while line := await reader.readline():
        writer.write(line)
        await writer.drain()
    writer.close()


def http_response(size: int) -> bytes:
    body = bytes(ord("a") + i % 26 for i in range(size))
    head = f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nContent-Type: application/octet-stream\r\n\r\n"
    return head.encode() + body


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive with httptools' parser: one fixed response per request."""

    responses: ClassVar[dict[bytes, bytes]] = {}

    def connection_made(self, transport):
        import httptools

        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url = url

    def on_message_complete(self):
        response = self.responses.get(self.url)
        if response is None:
            response = self.responses[self.url] = http_response(int(self.url[1:]))
        self.transport.write(response)


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


def closes_after_eof(port: int) -> bool:
    """Whether the server closes a connection after one echo and the client's half-close
    (`churn` waits for that close; rloop 0.5 never reads the EOF and leaves the
    connection in CLOSE-WAIT)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"x")
        if conn.recv(1) != b"x":
            return False
        conn.shutdown(socket.SHUT_WR)
        try:
            return conn.recv(1) == b""
        except TimeoutError:
            return False


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
        if kind in ("streams", "churn", "tls", "tls-handshake"):
            tls = server_context() if kind in ("tls", "tls-handshake") else None
            server = await asyncio.start_server(streams_handler, "127.0.0.1", 0, backlog=1024, ssl=tls)
        elif kind == "readline":
            server = await asyncio.start_server(
                readline_handler, "127.0.0.1", 0, backlog=1024, limit=1 << 20
            )
        else:
            factory = {"protocol": EchoProtocol, "buffered": EchoBufferedProtocol}.get(
                kind, HttpProtocol
            )
            server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        if kind == "churn" and not await loop.run_in_executor(None, closes_after_eof, port):
            # Said on the server's last line, without a port: the harness leaves it out.
            print("the server does not close a connection after the client's EOF", file=sys.stderr)
            server.close()
            return
    print(port, flush=True)
    await stop
    if kind == "sock":
        task.cancel()
        listener.close()
    else:
        server.close()


if __name__ == "__main__":
    loop_name, kind = sys.argv[1], sys.argv[2]
    # C10K: as many fds as the hard limit allows.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop = new_loop(loop_name)
    try:
        loop.run_until_complete(main(kind))
    finally:
        loop.close()
