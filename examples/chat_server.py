"""A line-based chat server: the first line a client sends is its name; every later
line goes to all other clients as "name: line".

    python -m ferroloop examples/chat_server.py [--host HOST] [--port PORT]
"""

import argparse
import asyncio

clients: dict[asyncio.StreamWriter, str] = {}


async def broadcast(sender: asyncio.StreamWriter, text: str) -> None:
    for writer in list(clients):
        if writer is not sender:
            writer.write(text.encode() + b"\n")
    await asyncio.gather(
        *(w.drain() for w in list(clients) if w is not sender), return_exceptions=True
    )


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    name = (await reader.readline()).decode().strip() or "anonymous"
    clients[writer] = name
    writer.write(f"welcome, {name}\n".encode())
    await broadcast(writer, f"* {name} joined")
    try:
        while line := await reader.readline():
            await broadcast(writer, f"{name}: {line.decode().rstrip()}")
    finally:
        del clients[writer]
        await broadcast(writer, f"* {name} left")
        writer.close()


async def main(host: str, port: int) -> None:
    server = await asyncio.start_server(handle, host, port)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"serving on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    args = parser.parse_args()
    try:
        asyncio.run(main(args.host, args.port))
    except KeyboardInterrupt:
        pass
