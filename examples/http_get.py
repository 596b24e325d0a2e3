"""An HTTP/1.0 GET client with the streams API: prints the status line, then the body.

    python -m ferroloop examples/http_get.py http://HOST[:PORT]/PATH
"""

import asyncio
import sys
import urllib.parse


async def fetch(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        sys.exit(f"not an http(s) URL: {url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    reader, writer = await asyncio.open_connection(
        parts.hostname, port, ssl=parts.scheme == "https"
    )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    writer.write(f"GET {path} HTTP/1.0\r\nHost: {parts.hostname}\r\n\r\n".encode("latin-1"))
    status = (await reader.readline()).decode("latin-1").rstrip()
    print(status)
    while (await reader.readline()) not in (b"\r\n", b"\n", b""):
        pass  # headers
    body = await reader.read()
    sys.stdout.write(body.decode("utf-8", "replace"))
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} URL")
    asyncio.run(fetch(sys.argv[1]))
