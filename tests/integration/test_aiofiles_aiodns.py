"""aiofiles and aiodns, which the classic asyncio tutorials recommend."""

from __future__ import annotations

import asyncio
import socket

import pytest

aiofiles = pytest.importorskip("aiofiles")
aiodns = pytest.importorskip("aiodns")


def test_aiofiles_read_write(loop, tmp_path):
    path = tmp_path / "data.txt"

    async def main():
        async with aiofiles.open(path, "w") as f:
            for i in range(1000):
                await f.write(f"line {i}\n")
        async with aiofiles.open(path) as f:
            lines = [line async for line in f]
        assert lines == [f"line {i}\n" for i in range(1000)]
        async with aiofiles.open(path, "rb") as f:
            await f.seek(5)
            assert await f.read(1) == b"0"

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_aiodns_resolves_from_hosts_file(loop):
    async def main():
        resolver = aiodns.DNSResolver()
        result = await resolver.getaddrinfo("localhost", family=socket.AF_INET, port=80)
        assert (b"127.0.0.1", 80) in [node.addr[:2] for node in result.nodes]
        with pytest.raises(aiodns.error.DNSError):
            await resolver.getaddrinfo("no-such-host.invalid", family=socket.AF_INET)

    loop.run_until_complete(asyncio.wait_for(main(), 30))
