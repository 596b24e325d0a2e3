"""asyncpg against a real PostgreSQL server, on asyncio and ferroloop."""

from __future__ import annotations

import asyncio

import pytest

asyncpg = pytest.importorskip("asyncpg")


def test_asyncpg_end_to_end(loop, postgres_port):
    dsn = f"postgresql://postgres@127.0.0.1:{postgres_port}/postgres"
    table = f"items_{id(loop)}"

    async def main():
        conn = await asyncpg.connect(dsn)
        await conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, name text, score float8)")
        rows = [(i, f"name-{i}", i / 7) for i in range(10_000)]
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2, $3)", rows)
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 10_000
        more = [(i, f"copied-{i}", 0.5) for i in range(10_000, 20_000)]
        await conn.copy_records_to_table(table, records=more)
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 20_000
        got = await conn.fetch(f"SELECT id, name, score FROM {table} WHERE id < 5 ORDER BY id")
        assert [tuple(r) for r in got] == rows[:5]

        with pytest.raises(ZeroDivisionError):
            async with conn.transaction():
                await conn.execute(f"DELETE FROM {table}")
                raise ZeroDivisionError
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 20_000

        pool = await asyncpg.create_pool(dsn, min_size=5, max_size=20)
        results = await asyncio.gather(
            *(pool.fetchval("SELECT $1::int * 2 FROM pg_sleep(0.01)", i) for i in range(20))
        )
        assert results == [i * 2 for i in range(20)]

        notes = asyncio.Queue()

        def on_notify(*args):
            notes.put_nowait(args[-1])

        listener = await pool.acquire()
        await listener.add_listener("ferro", on_notify)
        for i in range(10):
            await conn.execute(f"NOTIFY ferro, 'note {i}'")
        assert [await asyncio.wait_for(notes.get(), 10) for _ in range(10)] == [
            f"note {i}" for i in range(10)
        ]
        await listener.remove_listener("ferro", on_notify)
        await pool.release(listener)
        await pool.close()
        await conn.execute(f"DROP TABLE {table}")
        await conn.close()

    loop.run_until_complete(asyncio.wait_for(main(), 120))
