"""The classic echo server, with the streams API.

    python -m ferroloop examples/echo_server.py [--host HOST] [--port PORT]
"""

import argparse
import asyncio


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


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
