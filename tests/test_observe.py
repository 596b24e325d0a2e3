"""loop.stats(), loop.connections() and their Prometheus and OpenTelemetry exports
(ferroloop only: asyncio has no such calls). Counters are checked against scripted
workloads exactly."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import ssl
import sys
import threading
import time

import ferroloop
import pytest
from ferroloop import metrics


@pytest.fixture
def loop():
    loop = ferroloop.new_event_loop()
    yield loop
    loop.close()


def deltas(before, after, *keys):
    return {key: after[key] - before[key] for key in keys}


def test_callbacks_and_timers_counted_exactly(loop):
    n_callbacks, n_timers, n_cancelled = 1000, 100, 30
    ran = []
    for i in range(n_callbacks - 1):
        loop.call_soon(ran.append, i)
    timers = [loop.call_later(0, ran.append, -1) for _ in range(n_timers)]
    for timer in timers[:n_cancelled]:
        timer.cancel()
    before = loop.stats()

    def last():
        # Stops once every timer had its turn (they are due now).
        if sum(1 for r in ran if r == -1) < n_timers - n_cancelled:
            loop.call_soon(last)
        else:
            loop.stop()

    loop.call_soon(last)
    loop.run_forever()
    after = loop.stats()
    extra_rounds = after["callbacks"] - before["callbacks"] - n_callbacks - (n_timers - n_cancelled)
    assert ran.count(-1) == n_timers - n_cancelled
    # The stopping callback re-queued itself once per extra round it waited.
    assert extra_rounds >= 0
    assert extra_rounds == after["turns"] - before["turns"] - 1
    assert deltas(before, after, "timers_fired", "timers_cancelled") == {
        "timers_fired": n_timers - n_cancelled,
        "timers_cancelled": 0,  # cancelled before `before`
    }
    assert after["timers_scheduled"] == n_timers
    assert before["timers_cancelled"] == n_cancelled
    assert after["histograms"]["timer_lateness_seconds"]["count"] == n_timers - n_cancelled


def test_stream_bytes_counted_exactly_and_kept_after_close(loop):
    to_peer, from_peer = os.urandom(300_000), os.urandom(123_457)
    a, b = socket.socketpair()

    class Proto(asyncio.Protocol):
        def __init__(self):
            self.got = bytearray()
            self.done = loop.create_future()

        def data_received(self, data):
            self.got += data
            if len(self.got) == len(from_peer):
                self.done.set_result(None)

    def peer():
        received = bytearray()
        while len(received) < len(to_peer):
            received += b.recv(65536)
        b.sendall(from_peer)
        return bytes(received)

    async def main():
        before = loop.stats()
        transport, proto = await loop.connect_accepted_socket(Proto, a)
        peer_done = loop.run_in_executor(None, peer)
        transport.write(to_peer)
        received = await peer_done
        await proto.done
        assert received == to_peer and bytes(proto.got) == from_peer
        (row,) = [r for r in loop.connections() if r["fd"] == a.fileno()]
        assert (row["bytes_read"], row["bytes_written"]) == (len(from_peer), len(to_peer))
        assert row["kind"] == "unix" and row["reading"] and row["age"] >= 0
        transport.close()
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        after = loop.stats()
        assert deltas(before, after, "bytes_read", "bytes_written") == {
            "bytes_read": len(from_peer),
            "bytes_written": len(to_peer),
        }

    loop.run_until_complete(main())
    b.close()


async def until(predicate):
    while not predicate():
        await asyncio.sleep(0.001)


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self):
        self.received = []

    def datagram_received(self, data, addr):
        self.received.append(data)


def test_udp_bytes_counted_exactly(loop):
    sizes_out, sizes_in = [1, 100, 1200, 0, 65_000 // 4], [7, 1400, 3, 512]

    async def main():
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peer.setblocking(False)
        before = loop.stats()
        tr, proto = await loop.create_datagram_endpoint(Datagrams, local_addr=("127.0.0.1", 0))
        try:
            sent = [os.urandom(n) for n in sizes_out if n or sys.version_info >= (3, 13)]
            for data in sent:  # an empty datagram is sent from 3.13 on
                tr.sendto(data, peer.getsockname())
            got = []
            while len(got) < len(sent):
                try:
                    got.append(peer.recv(70_000))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            assert got == sent
            incoming = [os.urandom(n) for n in sizes_in]
            for data in incoming:
                peer.sendto(data, tr.get_extra_info("sockname"))
            await until(lambda: len(proto.received) == len(incoming))
            assert proto.received == incoming
            (row,) = [r for r in loop.connections() if r["fd"] == tr.get_extra_info("socket").fileno()]
            assert row["kind"] == "udp"
            assert (row["bytes_read"], row["bytes_written"]) == (sum(sizes_in), sum(sizes_out))
        finally:
            tr.close()
            peer.close()
        await asyncio.sleep(0)
        assert deltas(before, loop.stats(), "bytes_read", "bytes_written") == {
            "bytes_read": sum(sizes_in), "bytes_written": sum(sizes_out)}

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_queued_datagrams_are_counted_when_sent(loop, tmp_path):
    async def main():
        path = str(tmp_path / "receiver")
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind(path)
        receiver.setblocking(False)
        tr, _ = await loop.create_datagram_endpoint(Datagrams, remote_addr=path,
                                                    family=socket.AF_UNIX)
        try:
            # A receiver that does not read fills up: the rest wait in the buffer.
            n, size = 2000, 1000
            before = loop.stats()["bytes_written"]
            for i in range(n):
                tr.sendto(b"%06d" % i + b"." * (size - 6))
            assert tr.get_write_buffer_size() > 0
            (row,) = [r for r in loop.connections() if r["kind"] == "unix-datagram"]
            queued = n * size - row["bytes_written"]
            assert queued > 0 and loop.stats()["bytes_written"] - before == row["bytes_written"]
            got = []
            while len(got) < n:
                try:
                    got.append(receiver.recv(2000))
                except BlockingIOError:
                    await asyncio.sleep(0.001)
            assert [d[:6] for d in got] == [b"%06d" % i for i in range(n)]
            await until(lambda: tr.get_write_buffer_size() == 0)
            (row,) = [r for r in loop.connections() if r["kind"] == "unix-datagram"]
            assert row["bytes_written"] == n * size
            assert loop.stats()["bytes_written"] - before == n * size
        finally:
            tr.close()
            receiver.close()

    loop.run_until_complete(asyncio.wait_for(main(), 30))


def test_timing_is_off_until_asked_and_then_counts_every_turn(loop):
    loop.run_until_complete(asyncio.sleep(0))
    stats = loop.stats()
    assert stats["timing"] is False
    assert "time_polling" not in stats and "turn_seconds" not in stats["histograms"]
    assert "slowest_callbacks" not in stats
    loop.set_stats_timing(True)
    before = loop.stats()
    loop.run_until_complete(asyncio.sleep(0.05))
    after = loop.stats()
    turns = after["turns"] - before["turns"]
    hist = after["histograms"]["turn_seconds"]
    assert hist["count"] == turns
    assert after["time_polling"] >= 0.04  # the sleep was spent in the poller
    assert after["histograms"]["callback_seconds"]["count"] >= 1
    assert sum(count for _, count in hist["buckets"]) == hist["count"]
    bounds = [bound for bound, _ in hist["buckets"]]
    assert bounds == sorted(bounds)
    assert all(math.log2(bound * 1e9).is_integer() for bound in bounds if bound != math.inf)


BLOCK = 0.2  # seconds each slow run blocks: far above any other run of the test


def blocking_callback():
    time.sleep(BLOCK)


class SlowStream(asyncio.Protocol):
    def __init__(self):
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data):
        time.sleep(BLOCK)
        self.done.set_result(None)


class SlowDatagrams(SlowStream, asyncio.DatagramProtocol):
    def datagram_received(self, data, addr):
        time.sleep(BLOCK)
        self.done.set_result(None)


def test_the_slowest_callbacks_are_kept_with_their_names(loop):
    loop.set_stats_timing(True)

    async def blocking_coroutine():
        time.sleep(BLOCK)  # noqa: ASYNC251 - blocking the loop is the point

    async def main():
        a, b = socket.socketpair()
        stream, stream_protocol = await loop.connect_accepted_socket(SlowStream, a)
        udp, udp_protocol = await loop.create_datagram_endpoint(
            SlowDatagrams, local_addr=("127.0.0.1", 0))
        loop.stats()  # the runs so far are let go
        loop.call_soon(blocking_callback)
        await loop.create_task(blocking_coroutine(), name="slowpoke")
        b.send(b"x")
        await stream_protocol.done
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
            peer.sendto(b"y", udp.get_extra_info("sockname"))
            await udp_protocol.done
        # The exports leave them to stats().
        assert "ferroloop_callback_seconds" in metrics.prometheus_text(loop)
        runs = loop.stats()["slowest_callbacks"]
        again = loop.stats()["slowest_callbacks"]
        stream.close()
        udp.close()
        b.close()
        return runs, again

    runs, again = loop.run_until_complete(main())
    assert 4 <= len(runs) <= 10
    seconds = [run["seconds"] for run in runs]
    assert seconds == sorted(seconds, reverse=True)
    slow = {run["callback"] for run in runs if run["seconds"] >= BLOCK}
    assert len(slow) == 4, runs
    (callback,) = [name for name in slow if name.startswith("blocking_callback() at ")]
    assert f"{__file__}:" in callback
    coroutine = "test_the_slowest_callbacks_are_kept_with_their_names.<locals>.blocking_coroutine"
    assert f"task 'slowpoke' step: {coroutine}()" in slow
    assert f"{__name__}.SlowStream.data_received" in slow
    assert f"{__name__}.SlowDatagrams.datagram_received" in slow
    # Each run is reported once: the second call has only what ran in between.
    assert all(run["seconds"] < BLOCK for run in again)


def test_accepts_and_exceptions_counted(loop):
    async def main():
        server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
        for _ in range(5):
            _, writer = await asyncio.open_connection(*server.sockets[0].getsockname())
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()

    before = loop.stats()
    loop.set_exception_handler(lambda lp, ctx: None)
    loop.run_until_complete(main())
    loop.call_exception_handler({"message": "one"})
    after = loop.stats()
    assert deltas(before, after, "connections_accepted", "exceptions_reported") == {
        "connections_accepted": 5,
        "exceptions_reported": 1,
    }


def test_connections_lists_every_kind(loop, tmp_path):
    certs = pytest.importorskip("test.test_asyncio.utils")

    # The server sides' writers are kept: from 3.12 a collected StreamWriter closes its
    # transport.
    kept = []

    async def main():
        sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        sctx.load_cert_chain(certs.SIGNED_CERTFILE)
        cctx = ssl.create_default_context(cafile=certs.SIGNING_CA)
        tls_server = await asyncio.start_server(lambda r, w: kept.append(w), "127.0.0.1", 0, ssl=sctx)
        _, tls_writer = await asyncio.open_connection(
            *tls_server.sockets[0].getsockname(), ssl=cctx, server_hostname="localhost"
        )
        path = str(tmp_path / "s.sock")
        unix_server = await asyncio.start_unix_server(lambda r, w: kept.append(w), path)
        _, unix_writer = await asyncio.open_unix_connection(path)
        udp, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import sys; sys.stdin.read()", stdin=asyncio.subprocess.PIPE
        )
        kinds = {}
        for row in loop.connections():
            kinds.setdefault(row["kind"], []).append(row)
        assert set(kinds) >= {"tcp", "unix", "udp", "pipe", "subprocess"}
        (tls_row,) = [r for r in kinds["tcp"] if r["tls"] and r["peer"] == tls_writer.get_extra_info("sockname")]
        assert tls_row["tls"]["version"] == tls_writer.get_extra_info("ssl_object").version()
        assert tls_row["tls"]["cipher"] == tls_writer.get_extra_info("cipher")[0]
        assert [r["pid"] for r in kinds["subprocess"]] == [proc.pid]
        assert kinds["udp"][0]["local"] == udp.get_extra_info("sockname")
        proc.stdin.close()
        await proc.wait()
        for writer in (tls_writer, unix_writer, *kept):
            writer.close()
        udp.close()
        tls_server.close()
        unix_server.close()
        await tls_server.wait_closed()
        await unix_server.wait_closed()

    loop.run_until_complete(asyncio.wait_for(main(), 60))


def test_prometheus_text_parses_and_the_collector_registers(loop):
    parser = pytest.importorskip("prometheus_client.parser")
    from prometheus_client import CollectorRegistry, generate_latest

    loop.set_stats_timing(True)
    loop.run_until_complete(asyncio.sleep(0.01))
    text = metrics.prometheus_text(loop)
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    assert families["ferroloop_turns"].type == "counter"
    assert families["ferroloop_turn_seconds"].type == "histogram"
    turns = [s.value for s in families["ferroloop_turns"].samples if s.name == "ferroloop_turns_total"]
    assert turns == [loop.stats()["turns"]]
    registry = CollectorRegistry()
    registry.register(metrics.PrometheusCollector(loop))
    exposed = generate_latest(registry).decode()
    assert "ferroloop_callbacks_total" in exposed
    assert 'ferroloop_turn_seconds_bucket{le="+Inf"}' in exposed


def test_a_snapshot_from_another_thread_is_taken_on_the_loop(loop):
    got = {}

    async def main():
        thread = threading.Thread(target=lambda: got.update(metrics.snapshot(loop)))
        thread.start()
        while thread.is_alive():
            await asyncio.sleep(0.01)

    loop.run_until_complete(main())
    assert got["turns"] > 0


def test_opentelemetry_reads_the_stats(loop):
    sdk = pytest.importorskip("opentelemetry.sdk.metrics")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = sdk.MeterProvider(metric_readers=[reader])
    metrics.instrument_opentelemetry(loop, provider.get_meter("test"))
    loop.run_until_complete(asyncio.sleep(0))
    data = reader.get_metrics_data()
    provider.shutdown()
    points = {
        m.name: m.data.data_points[0].value
        for rm in data.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert points["ferroloop.turns"] == loop.stats()["turns"]
    assert "ferroloop.timers_pending" in points


def test_the_environment_switches_timing_on():
    import subprocess

    script = "import ferroloop; print(ferroloop.new_event_loop().stats()['timing'])"
    for value, expected in (("1", "True"), ("", "False")):
        proc = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
            env={**os.environ, "FERROLOOP_STATS_TIMING": value}, check=False,
        )
        assert proc.stdout.strip() == expected, proc.stderr


def test_bytes_only_grow_and_count_what_sendfile_sends(loop, tmp_path):
    blob = os.urandom(3_000_000)
    path = tmp_path / "blob"
    path.write_bytes(blob)
    a, b = socket.socketpair()
    seen = []

    def reader():
        got = 0
        while got < len(blob):
            got += len(b.recv(1 << 20))
            seen.append(loop.call_soon_threadsafe)  # only to count progress
        return got

    async def main():
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        before = loop.stats()["bytes_written"]
        readings = []

        async def watch():
            while True:
                readings.append(loop.stats()["bytes_written"])
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        peer = loop.run_in_executor(None, reader)
        with open(path, "rb") as file:
            sent = await loop.sendfile(transport, file)
        assert await peer == len(blob) == sent
        watcher.cancel()
        after = loop.stats()["bytes_written"]
        assert after - before == len(blob)
        assert readings == sorted(readings) and readings[0] >= before
        transport.close()

    loop.run_until_complete(asyncio.wait_for(main(), 60))
    b.close()


def test_histogram_bounds_are_inclusive_as_prometheus_le(loop):
    parser = pytest.importorskip("prometheus_client.parser")
    loop.call_soon(lambda: None)
    loop.call_soon(loop.stop)
    before = loop.stats()["histograms"]["ready_depth"]
    loop.run_forever()  # one turn with a queue of exactly 2
    after = loop.stats()["histograms"]["ready_depth"]
    counts = dict(after["buckets"])
    previous = dict(before["buckets"])
    assert counts.get(2.0, 0) - previous.get(2.0, 0) == 1  # 2 <= le 2
    text = metrics.prometheus_text(loop)
    family = {f.name: f for f in parser.text_string_to_metric_families(text)}["ferroloop_ready_depth"]
    le2 = [s.value for s in family.samples if s.labels.get("le") == "2.0"]
    assert le2 and le2[0] >= 1
