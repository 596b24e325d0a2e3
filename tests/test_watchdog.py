"""The blocked-loop watchdog (`loop.set_watchdog`, `ferroloop.run(..., watchdog=)`,
`python -m ferroloop --watchdog`, FERROLOOP_WATCHDOG): ferroloop only, asyncio has none.

A blocking callback waits for the watchdog's report (an event) rather than sleeping a
fixed time, so "reported while it blocks" holds however loaded the machine is; closing
the loop joins the watchdog thread, so every report has been made when the test looks.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import logging
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import ferroloop
import pytest
from ferroloop import WatchdogReport
from ferroloop._watchdog import parse_threshold

THRESHOLD = 0.1
BLOCK = 0.5
# How long a blocked callback waits for the report before giving up (a failure).
PATIENCE = 30.0


def wait_for_watchdog_thread() -> str:
    """The watchdog thread's id, once it has named itself."""
    deadline = time.monotonic() + PATIENCE
    while not watchdog_threads():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    (tid,) = watchdog_threads()
    return tid


def no_watchdog_thread() -> bool:
    """Whether every watchdog thread has gone. A joined thread can still be listed for
    a moment: the kernel wakes the joiner as the thread exits, before it leaves
    /proc/self/task."""
    deadline = time.monotonic() + PATIENCE
    while watchdog_threads():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def watchdog_threads() -> list[str]:
    tids = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip().startswith("ferroloop-watch"):
                    tids.append(tid)
        except FileNotFoundError:
            pass
    return tids


class Reports:
    """A watchdog callback that keeps the reports and signals the first stall."""

    def __init__(self) -> None:
        self.reports: list[WatchdogReport] = []
        self.stalled = threading.Event()

    def __call__(self, report: WatchdogReport) -> None:
        self.reports.append(report)
        if report.kind == "stalled":
            self.stalled.set()

    def block_until_reported(self, at_least: float = BLOCK) -> bool:
        """Blocks the loop (GIL released) until the stall is reported and at least
        `at_least` seconds have passed; returns whether it was reported meanwhile."""
        start = time.monotonic()
        seen = self.stalled.wait(PATIENCE)
        left = at_least - (time.monotonic() - start)
        if left > 0:
            time.sleep(left)
        return seen

    def kinds(self) -> list[str]:
        return [r.kind for r in self.reports]


@pytest.fixture
def watched():
    """A ferroloop loop with the watchdog on (THRESHOLD) reporting to a `Reports`."""
    loop = ferroloop.new_event_loop()
    reports = Reports()
    loop.set_watchdog(THRESHOLD, callback=reports)
    yield loop, reports
    loop.close()


def frame_names(report: WatchdogReport) -> list[str]:
    assert report.stack is not None
    return [frame.name for frame in report.stack]


def test_a_sleeping_callback_is_reported_while_it_blocks_then_its_recovery(watched):
    loop, reports = watched
    seen_while_blocked = []

    def sleeping_callback():
        seen_while_blocked.append(reports.block_until_reported())

    async def main():
        loop.call_soon(sleeping_callback)
        await asyncio.sleep(0.01)

    loop.run_until_complete(main())
    loop.close()
    assert seen_while_blocked == [True]
    assert reports.kinds() == ["stalled", "recovered"]
    stalled, recovered = reports.reports
    # From the callback the loop called to the wait it blocks in (threading's).
    names = frame_names(stalled)
    assert names[:2] == ["sleeping_callback", "block_until_reported"]
    assert names[-1] == "wait" and stalled.stack[-1].filename == threading.__file__
    assert "sleeping_callback" in stalled.handle
    assert stalled.threshold == THRESHOLD
    assert THRESHOLD <= stalled.duration_so_far < recovered.duration_so_far
    assert recovered.duration_so_far >= BLOCK
    assert stalled.thread_id == recovered.thread_id == threading.get_ident()
    assert stalled.task is None and stalled.coroutine_chain is None
    assert recovered.stack is None
    assert "sleeping_callback" in recovered.handle


def test_a_python_callback_spinning_on_cpu_is_reported_while_it_spins(watched):
    loop, reports = watched
    seen_while_spinning = []

    def spinning_callback():
        start = time.monotonic()
        deadline = start + PATIENCE
        while time.monotonic() < deadline:
            if reports.stalled.is_set() and time.monotonic() - start >= BLOCK:
                break
        seen_while_spinning.append(reports.stalled.is_set())

    loop.call_soon(spinning_callback)
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert seen_while_spinning == [True]
    assert reports.kinds() == ["stalled", "recovered"]
    stalled, recovered = reports.reports
    assert frame_names(stalled)[0] == "spinning_callback"
    assert recovered.duration_so_far >= BLOCK


def test_a_blocking_task_step_names_the_task_and_its_await_chain(watched):
    loop, reports = watched

    async def blocking_inner():
        await asyncio.sleep(0)
        reports.block_until_reported()

    async def middle():
        await blocking_inner()

    async def main():
        await asyncio.create_task(middle(), name="the-blocking-task")

    loop.run_until_complete(main())
    loop.close()
    assert reports.kinds() == ["stalled", "recovered"]
    stalled, recovered = reports.reports
    assert stalled.task == recovered.task == "the-blocking-task"
    assert "the-blocking-task" in stalled.handle
    # "name (file:line)", the name qualified from 3.11 on.
    names = [entry.split(" (")[0].rsplit(".", 1)[-1] for entry in stalled.coroutine_chain]
    assert names == ["middle", "blocking_inner"]
    assert frame_names(stalled)[:2] == ["middle", "blocking_inner"]
    assert recovered.duration_so_far >= BLOCK


def test_a_blocking_protocol_method_names_the_protocol_and_its_transport(watched):
    loop, reports = watched
    received = []

    class BlockingProtocol(asyncio.Protocol):
        def data_received(self, data):
            reports.block_until_reported()
            received.append(data)

    async def main():
        ours, theirs = socket.socketpair()
        with theirs:
            transport, _ = await loop.connect_accepted_socket(BlockingProtocol, ours)
            theirs.sendall(b"ping")
            while not received:
                await asyncio.sleep(0.01)
            transport.close()

    loop.run_until_complete(main())
    loop.close()
    assert received == [b"ping"]
    assert reports.kinds() == ["stalled", "recovered"]
    stalled, recovered = reports.reports
    assert frame_names(stalled)[:2] == ["data_received", "block_until_reported"]
    assert stalled.handle.startswith("the protocol <")
    assert "BlockingProtocol" in stalled.handle and "Transport" in stalled.handle
    assert recovered.duration_so_far >= BLOCK


def test_a_healthy_loop_is_not_reported_and_does_not_wake_the_watchdog():
    loop = ferroloop.new_event_loop()
    reports = Reports()
    # Generous: a quick callback must not be reported even on a loaded machine.
    loop.set_watchdog(0.5, callback=reports)
    tid = wait_for_watchdog_thread()

    def switches() -> int:
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches")

    ran = []
    before = switches()
    for _ in range(10):
        for i in range(10_000):
            loop.call_soon(ran.append, i)
        loop.call_soon(loop.stop)
        loop.run_forever()
    woken = switches() - before
    loop.close()
    assert len(ran) == 100_000
    assert reports.reports == []
    # Once per threshold at most, not once per callback.
    assert woken < 1000


def test_switching_off_and_closing_stop_the_thread():
    # Watchdog threads by name, not all threads: a thread another test left (an
    # executor's, shut down without waiting) may end meanwhile.
    assert no_watchdog_thread()
    loop = ferroloop.new_event_loop()
    assert no_watchdog_thread()
    loop.set_watchdog(THRESHOLD)
    tid = wait_for_watchdog_thread()
    loop.set_watchdog(0.2)  # a new threshold: the same thread
    assert watchdog_threads() == [tid]
    loop.set_watchdog(None)
    assert no_watchdog_thread()  # joined by set_watchdog
    loop.set_watchdog(THRESHOLD)
    wait_for_watchdog_thread()
    loop.set_watchdog(0)
    assert no_watchdog_thread()
    loop.set_watchdog(THRESHOLD)
    wait_for_watchdog_thread()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    assert no_watchdog_thread()
    with pytest.raises(RuntimeError, match="closed"):
        loop.set_watchdog(THRESHOLD)
    loop.set_watchdog(None)


def test_a_loop_collected_unclosed_stops_its_thread():
    loop = ferroloop.new_event_loop()
    # A cycle through the watchdog: loop -> reporter -> callback -> loop.
    loop.set_watchdog(THRESHOLD, callback=functools.partial(print, loop))
    wait_for_watchdog_thread()
    del loop
    with pytest.warns(ResourceWarning, match="unclosed event loop"):
        gc.collect()
    assert no_watchdog_thread()


def test_a_forked_child_starts_its_own_thread_and_never_joins_the_parents():
    loop = ferroloop.new_event_loop()
    loop.set_watchdog(10.0)
    wait_for_watchdog_thread()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # forking with threads
        pid = os.fork()
    if pid == 0:
        code = 1
        try:
            # Watchdog threads only: other libraries' fork hooks may start threads of
            # their own in the child (OpenTelemetry's SDK does).
            alone = watchdog_threads() == []
            loop.set_watchdog(THRESHOLD)  # the parent's thread is not here: a new one
            # The thread names itself once it runs, which a loaded machine may delay.
            wait_for_watchdog_thread()
            loop.close()
            gone = no_watchdog_thread()
            code = 0 if alone and gone else 3
            if code:
                os.write(2, f"child: alone={alone} gone={gone}\n".encode())
        finally:
            os._exit(code)
    try:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert len(watchdog_threads()) == 1
    finally:
        loop.close()  # a failure here must not leave the thread to the next test
    assert no_watchdog_thread()


def test_switched_off_while_stalled_reports_nothing_more(watched):
    loop, reports = watched

    def stop_watching():
        reports.block_until_reported(at_least=0)
        loop.set_watchdog(None)

    loop.call_soon(stop_watching)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert no_watchdog_thread()
    assert reports.kinds() == ["stalled"]


def test_a_callback_holding_the_gil_is_reported_late():
    """libc's usleep called through ctypes.PyDLL keeps the GIL: the watchdog notices the
    stall on time but can read nothing until the call returns, and says so."""
    usleep = ctypes.PyDLL(None).usleep
    loop = ferroloop.new_event_loop()
    reports = Reports()
    loop.set_watchdog(THRESHOLD, callback=reports)
    held = 0.7

    def holding_the_gil():
        usleep(int(held * 1e6))

    loop.call_soon(holding_the_gil)
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert reports.kinds() == ["stalled", "recovered"]
    stalled, recovered = reports.reports
    assert stalled.captured_late
    assert not recovered.captured_late
    # Nothing could be read before the call returned.
    assert stalled.duration_so_far >= held
    assert recovered.duration_so_far >= held
    # Read as the call let go of the GIL (still in the callback), or after it returned.
    assert stalled.stack is None or frame_names(stalled)[-1] == "holding_the_gil"
    assert "holding_the_gil" in stalled.handle
    assert "Captured late" in stalled.format()


def test_the_default_report_goes_to_the_ferroloop_logger(caplog):
    logged = threading.Event()

    class Signal(logging.Handler):
        def emit(self, record):
            logged.set()

    logger = logging.getLogger("ferroloop")
    signal_handler = Signal()
    logger.addHandler(signal_handler)

    def blocking_in_run():
        assert logged.wait(PATIENCE)
        time.sleep(BLOCK)

    async def main():
        asyncio.get_running_loop().call_soon(blocking_in_run)
        await asyncio.sleep(0.01)

    try:
        with caplog.at_level(logging.WARNING, logger="ferroloop"):
            ferroloop.run(main(), watchdog=THRESHOLD)
    finally:
        logger.removeHandler(signal_handler)
    records = [r for r in caplog.records if r.name == "ferroloop"]
    assert [r.levelno for r in records] == [logging.WARNING] * 2
    stalled, recovered = (r.getMessage() for r in records)
    assert stalled.startswith("event loop blocked for ")
    assert "(threshold 0.100 s) in <Handle " in stalled
    assert 'in blocking_in_run\n    assert logged.wait(PATIENCE)' in stalled
    assert recovered.startswith("event loop ran again after being blocked for ")
    assert records[0].watchdog_report.kind == "stalled"


def test_an_error_in_the_callback_is_logged_and_the_watchdog_carries_on(caplog):
    loop = ferroloop.new_event_loop()
    reports = Reports()

    def failing(report):
        reports(report)
        raise ZeroDivisionError("from the watchdog callback")

    loop.set_watchdog(THRESHOLD, callback=failing)
    for _ in range(2):
        reports.stalled.clear()
        loop.call_soon(reports.block_until_reported, 0.2)
        loop.call_soon(loop.stop)
        with caplog.at_level(logging.ERROR, logger="ferroloop"):
            loop.run_forever()
    loop.close()
    assert reports.kinds() == ["stalled", "recovered"] * 2
    errors = [r for r in caplog.records if r.name == "ferroloop"]
    assert len(errors) == 4
    assert all(r.exc_info[0] is ZeroDivisionError for r in errors)


@pytest.mark.parametrize(
    ("threshold", "error"),
    [
        ("0.1", TypeError),
        (True, TypeError),
        (1j, TypeError),
        (-0.1, ValueError),
        (float("nan"), ValueError),
        (float("inf"), ValueError),
    ],
)
def test_a_bad_threshold_is_refused(threshold, error):
    loop = ferroloop.new_event_loop()
    try:
        with pytest.raises(error):
            loop.set_watchdog(threshold)
        assert no_watchdog_thread()
        coro = asyncio.sleep(0)
        with pytest.raises(error):
            ferroloop.run(coro, watchdog=threshold)
        coro.close()
    finally:
        loop.close()


def test_a_callback_that_is_not_callable_is_refused():
    loop = ferroloop.new_event_loop()
    with pytest.raises(TypeError):
        loop.set_watchdog(THRESHOLD, callback="log it")
    assert no_watchdog_thread()
    loop.close()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("100ms", 0.1), ("0.1", 0.1), ("0.1s", 0.1), ("2", 2.0), (" 250ms ", 0.25), ("0", None)],
)
def test_threshold_texts(text, seconds):
    assert parse_threshold(text) == seconds


@pytest.mark.parametrize("text", ["", "fast", "-1", "1m", "0.1 ms s", "1e3"])
def test_bad_threshold_texts(text):
    with pytest.raises(ValueError):
        parse_threshold(text)


SCRIPT = textwrap.dedent(
    """
    import asyncio, time

    def block_the_loop():
        time.sleep(0.5)

    async def main():
        asyncio.get_running_loop().call_soon(block_the_loop)
        await asyncio.sleep(0.01)

    {run}
    """
)


def run_script(tmp_path, run: str, argv: list[str], env: dict[str, str]):
    script = tmp_path / "app.py"
    script.write_text(SCRIPT.format(run=run))
    environ = {k: v for k, v in os.environ.items() if k != "FERROLOOP_WATCHDOG"}
    environ.update(env)
    return subprocess.run(
        [sys.executable, *argv, str(script)],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
        timeout=120,
    )


def assert_reported(stderr: str) -> None:
    assert stderr.count("event loop blocked for ") == 1, stderr
    assert "in block_the_loop\n    time.sleep(0.5)" in stderr, stderr
    assert stderr.count("event loop ran again after being blocked for ") == 1, stderr


def test_the_environment_variable_switches_it_on(tmp_path):
    run = "import ferroloop; ferroloop.run(main())"
    done = run_script(tmp_path, run, [], {"FERROLOOP_WATCHDOG": "100ms"})
    assert done.returncode == 0, done.stderr
    assert_reported(done.stderr)
    done = run_script(tmp_path, run, [], {})
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_bad_environment_variable_warns_and_is_ignored(tmp_path):
    run = "import ferroloop; ferroloop.run(main())"
    done = run_script(tmp_path, run, [], {"FERROLOOP_WATCHDOG": "soon"})
    assert done.returncode == 0, done.stderr
    assert "RuntimeWarning: FERROLOOP_WATCHDOG ignored" in done.stderr
    assert "event loop blocked" not in done.stderr


@pytest.mark.parametrize("flag", [["--watchdog", "100ms"], ["--watchdog=0.1s"], ["--watchdog", "0.1"]])
def test_the_runner_flag_switches_it_on(tmp_path, flag):
    done = run_script(tmp_path, "asyncio.run(main())", ["-m", "ferroloop", *flag], {})
    assert done.returncode == 0, done.stderr
    assert_reported(done.stderr)


def test_the_runner_flag_overrides_the_environment(tmp_path):
    done = run_script(
        tmp_path,
        "asyncio.run(main())",
        ["-m", "ferroloop", "--watchdog", "0"],
        {"FERROLOOP_WATCHDOG": "100ms"},
    )
    assert done.returncode == 0 and "event loop blocked" not in done.stderr, done.stderr


@pytest.mark.parametrize(
    ("argv", "options", "rest"),
    [
        (["--watchdog", "100ms", "app.py", "--watchdog", "x"], {"--watchdog": "100ms"},
         ["app.py", "--watchdog", "x"]),
        (["--workers", "2", "--watchdog=1s", "app.py"], {"--watchdog": "1s"},
         ["--workers", "2", "app.py"]),
        (["--watchdog", "0.1", "--graceful-timeout=5", "-m", "pkg"], {"--watchdog": "0.1"},
         ["--graceful-timeout=5", "-m", "pkg"]),
        (["--inspect", "s.sock", "--workers=2", "--watchdog", "1", "app.py"],
         {"--inspect": "s.sock", "--watchdog": "1"}, ["--workers=2", "app.py"]),
        (["app.py", "--watchdog", "1"], {}, ["app.py", "--watchdog", "1"]),
    ],
)
def test_the_runner_flag_is_a_runner_option_before_the_program(argv, options, rest):
    from ferroloop.__main__ import _take_runner_options

    assert _take_runner_options(argv) == options
    assert argv == rest


def test_a_bad_runner_flag_is_a_usage_error(tmp_path):
    done = run_script(tmp_path, "asyncio.run(main())", ["-m", "ferroloop", "--watchdog", "x"], {})
    assert done.returncode == 2
    assert "--watchdog: expected a duration" in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "ferroloop", "--watchdog"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "--watchdog needs a value" in done.stderr
