"""redis-py's asyncio client against a real redis-server, on asyncio and ferroloop."""

from __future__ import annotations

import asyncio

import pytest

redis = pytest.importorskip("redis.asyncio")


def test_redis_keys_pipelines_and_pubsub(loop, redis_port):
    prefix = f"ferro:{id(loop)}:"

    async def main():
        client = redis.Redis(host="127.0.0.1", port=redis_port)
        async with client.pipeline(transaction=False) as pipe:
            for i in range(10_000):
                pipe.set(f"{prefix}{i}", i)
            assert all(await pipe.execute())
        values = await client.mget([f"{prefix}{i}" for i in range(10_000)])
        assert [int(v) for v in values] == list(range(10_000))
        assert await asyncio.gather(*(client.get(f"{prefix}{i}") for i in range(100))) == [
            str(i).encode() for i in range(100)
        ]

        async with client.pipeline(transaction=True) as pipe:
            pipe.incr(f"{prefix}counter").incr(f"{prefix}counter").get(f"{prefix}counter")
            assert await pipe.execute() == [1, 2, b"2"]

        pubsub = client.pubsub()
        await pubsub.subscribe(f"{prefix}chan")
        assert (await pubsub.get_message(timeout=5))["type"] == "subscribe"
        for i in range(20):
            await client.publish(f"{prefix}chan", f"msg {i}")
        got = []
        while len(got) < 20:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message:
                got.append(message["data"])
        assert got == [f"msg {i}".encode() for i in range(20)]
        await pubsub.unsubscribe()
        await pubsub.aclose()
        deleted = 0
        async for key in client.scan_iter(match=f"{prefix}*", count=1000):
            deleted += await client.delete(key)
        assert deleted == 10_001
        await client.aclose()

    loop.run_until_complete(asyncio.wait_for(main(), 120))
