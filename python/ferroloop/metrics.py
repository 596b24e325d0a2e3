"""`loop.stats()` where users already look: Prometheus and OpenTelemetry.

- `prometheus_text(loop)`: the Prometheus text exposition format (0.0.4), no
  dependency. Serve it from any HTTP handler.
- `PrometheusCollector(loop)`: a collector for `prometheus_client`'s registry
  (`prometheus_client.REGISTRY.register(PrometheusCollector(loop))`), when that package
  is installed.
- `instrument_opentelemetry(loop, meter=None)`: observable instruments on an
  OpenTelemetry meter (`opentelemetry-api`), read at each collection.

Both packages are optional: this module imports them only when those calls are made.
Stats are read on the loop's thread by `loop.stats()`; a collector running on another
thread (prometheus_client's HTTP server, an OpenTelemetry reader) asks the loop for them
with `call_soon_threadsafe` and waits up to `timeout` seconds, so it never touches the
loop's state while a turn runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

# (stats key, metric name, type, help)
_COUNTERS = [
    ("turns", "turns", "Loop turns run."),
    ("callbacks", "callbacks", "Handles and scheduled calls run."),
    ("io_events", "io_events", "Transport readiness events and sock_* retries handled."),
    ("timers_scheduled", "timers_scheduled", "Timers scheduled (call_later, call_at)."),
    ("timers_fired", "timers_fired", "Timers that ran."),
    ("timers_cancelled", "timers_cancelled", "Scheduled timers cancelled."),
    ("bytes_read", "bytes_read", "Bytes received by transports (streams and datagrams)."),
    ("bytes_written", "bytes_written", "Bytes sent by transports (streams and datagrams)."),
    ("connections_accepted", "connections_accepted", "Connections accepted by servers."),
    ("exceptions_reported", "exceptions_reported", "Calls of the exception handler."),
    ("time_polling", "polling_seconds", "Seconds spent waiting in the poller (timing on)."),
    ("time_running", "running_seconds", "Seconds spent running callbacks (timing on)."),
]
_GAUGES = [
    ("fds_watched", "fds_watched", "File descriptors with add_reader/add_writer callbacks."),
    ("transports_registered", "transports", "Native transports registered with the loop."),
    ("ready", "ready", "Callbacks queued to run."),
    ("timers_pending", "timers_pending", "Timers scheduled and not yet run."),
    ("pipes_open", "pipes_open", "Pipe transports open."),
    ("subprocesses", "subprocesses", "Subprocesses watched."),
]
_HISTOGRAMS = [
    ("ready_depth", "ready_depth", "Callbacks queued at the start of each turn's run."),
    ("timer_lateness_seconds", "timer_lateness_seconds", "How late timers ran."),
    ("turn_seconds", "turn_seconds", "Length of each turn (timing on)."),
    ("callback_seconds", "callback_seconds", "Length of each callback (timing on)."),
]


def snapshot(loop: asyncio.AbstractEventLoop, timeout: float = 5.0) -> dict[str, Any]:
    """`loop.stats()`, taken on the loop's thread when called from another one while
    the loop runs (`TimeoutError` if it does not answer within `timeout`: a stalled
    loop). Otherwise read here: the counters are copied out of the loop in one step."""
    # The slowest callbacks are left for `loop.stats()` and `top`: the exports have no
    # place for them.
    def take():
        return loop._snapshot(take_slowest=False)  # type: ignore[attr-defined]

    if not loop.is_running() or _on_loop_thread(loop):
        return take()
    try:
        return call_on_loop(loop, take).result(timeout)
    except concurrent.futures.TimeoutError:  # not the builtin one before 3.11
        raise TimeoutError from None


def call_on_loop(loop: asyncio.AbstractEventLoop, fn) -> concurrent.futures.Future:
    """`fn()` run on the loop's thread (`call_soon_threadsafe`); its result or exception
    in the future returned."""
    done: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            done.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            done.set_exception(exc)

    loop.call_soon_threadsafe(run)
    return done


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    thread_id = getattr(loop, "_thread_id", None)
    return thread_id == threading.get_ident()


def prometheus_text(loop: asyncio.AbstractEventLoop, prefix: str = "ferroloop_") -> str:
    """The loop's stats in Prometheus' text exposition format."""
    stats = snapshot(loop)
    lines: list[str] = []
    for _key, name, kind, help_text, value in _families(stats):
        # The text format names a counter's family as its sample: with `_total`.
        metric = prefix + name + ("_total" if kind == "counter" else "")
        lines.append(f"# HELP {metric} {help_text}")
        lines.append(f"# TYPE {metric} {kind}")
        if kind == "histogram":
            cumulative = 0
            for bound, count in value["buckets"]:
                cumulative += count
                lines.append(f'{metric}_bucket{{le="{_le(bound)}"}} {cumulative}')
            if not value["buckets"] or value["buckets"][-1][0] != float("inf"):
                lines.append(f'{metric}_bucket{{le="+Inf"}} {value["count"]}')
            lines.append(f"{metric}_sum {_number(value['sum'])}")
            lines.append(f"{metric}_count {value['count']}")
        else:
            lines.append(f"{metric} {_number(value)}")
    return "\n".join(lines) + "\n"


def _families(stats: dict[str, Any]) -> Iterator[tuple[str, str, str, str, Any]]:
    for key, name, help_text in _COUNTERS:
        if key in stats:
            yield key, name, "counter", help_text, stats[key]
    for key, name, help_text in _GAUGES:
        if key in stats:
            yield key, name, "gauge", help_text, stats[key]
    histograms = stats.get("histograms", {})
    for key, name, help_text in _HISTOGRAMS:
        if key in histograms:
            yield key, name, "histogram", help_text, histograms[key]


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Cached:
    """The last snapshot of a loop, reused for `ttl` seconds (one collection reads many
    instruments) and when the loop does not answer (a stalled loop's scrape shows the
    last figures instead of failing)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, ttl: float = 0.5, timeout: float = 1.0):
        self._loop = loop
        self._ttl = ttl
        self._timeout = timeout
        self._stats: dict[str, Any] | None = None
        self._taken = 0.0
        self._lock = threading.Lock()

    def get(self) -> dict[str, Any] | None:
        with self._lock:
            now = time.monotonic()
            if self._stats is None or now - self._taken > self._ttl:
                try:
                    self._stats = snapshot(self._loop, self._timeout)
                    self._taken = now
                except TimeoutError:
                    pass
            return self._stats


class PrometheusCollector:
    """A `prometheus_client` collector of one loop's stats."""

    def __init__(self, loop: asyncio.AbstractEventLoop, prefix: str = "ferroloop_") -> None:
        self._loop = loop
        self._prefix = prefix
        self._cached = _Cached(loop, ttl=0.0)

    def collect(self):
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        if self._loop.is_closed():
            return
        stats = self._cached.get()
        if stats is None:
            return
        for _key, name, kind, help_text, value in _families(stats):
            metric = self._prefix + name
            if kind == "counter":
                yield CounterMetricFamily(metric, help_text, value=value)
            elif kind == "gauge":
                yield GaugeMetricFamily(metric, help_text, value=value)
            else:
                buckets, cumulative = [], 0
                for bound, count in value["buckets"]:
                    cumulative += count
                    buckets.append((_le(bound), cumulative))
                if not buckets or buckets[-1][0] != "+Inf":
                    buckets.append(("+Inf", value["count"]))
                yield HistogramMetricFamily(
                    metric, help_text, buckets=buckets, sum_value=value["sum"]
                )


def instrument_opentelemetry(loop: asyncio.AbstractEventLoop, meter: Any = None,
                             prefix: str = "ferroloop.") -> list[Any]:
    """Observable counters and gauges for the loop's stats on `meter` (by default
    `opentelemetry.metrics.get_meter("ferroloop")`); returns the instruments.
    Histograms are left to the Prometheus path: OpenTelemetry's API has no observable
    histogram."""
    from opentelemetry import metrics
    from opentelemetry.metrics import Observation

    meter = meter or metrics.get_meter("ferroloop")
    cached = _Cached(loop)

    def observe(key: str):
        def callback(_options):
            if loop.is_closed():
                return []
            stats = cached.get()
            return [Observation(stats[key])] if stats and key in stats else []

        return callback

    instruments = []
    for key, name, help_text in _COUNTERS:
        instruments.append(
            meter.create_observable_counter(prefix + name, [observe(key)], description=help_text)
        )
    for key, name, help_text in _GAUGES:
        instruments.append(
            meter.create_observable_gauge(prefix + name, [observe(key)], description=help_text)
        )
    return instruments


__all__ = ["PrometheusCollector", "instrument_opentelemetry", "prometheus_text", "snapshot"]
