"""The classic echo client, with the streams API: sends each argument as a line and
prints what comes back.

    python -m ferroloop examples/echo_client.py HOST PORT MESSAGE...
"""

import asyncio
import sys


async def main(host: str, port: int, messages: list[str]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    for message in messages:
        writer.write(message.encode() + b"\n")
        await writer.drain()
        line = await reader.readline()
        print(f"echoed: {line.decode().rstrip()}")
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} HOST PORT MESSAGE...")
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:]))
