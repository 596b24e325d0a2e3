"""Runs one module of CPython's own `test.test_asyncio` against ferroloop.

    python -m tests.conformance.adapter MODULE [--json OUT] [--timeout SECONDS] [--stock]

The tests are imported from the interpreter's `test` package, never copied. Modules
built on loop mixins (`test_events`, `test_sock_lowlevel`, ...) get one more test class
whose `create_event_loop()` returns a ferroloop loop; every other module reaches the
loop through a fresh ferroloop event loop policy installed before each test.
Exclusions come from `expectations.py`; each test has a timeout so a hang is a failure.
`--stock` runs the same tests on asyncio's own loop: what ferroloop is measured against.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import signal
import sys
import time
import unittest

import ferroloop

from . import expectations

# Module -> (name of the stock epoll test class to derive from).
MIXIN_MODULES = {
    "test_events": "EPollEventLoopTests",
    "test_sock_lowlevel": "EPollEventLoopTests",
    "test_sendfile": "EPollEventLoopTests",
    "test_buffered_proto": "BufferedProtocolSelectorTests",
    "test_server": "SelectorStartServerTests",
    "test_sslproto": "SelectorStartTLSTests",
    "test_subprocess": "SubprocessThreadedWatcherTests",
}


# Other test classes of a mixin module that reach the loop through the policy (those
# this Python's module has: TestServer2 is 3.12's, UnixServerCleanupTests 3.13's).
ALSO_LOAD = {
    "test_sslproto": ["SslProtoHandshakeTests"],
    "test_server": ["TestServer2", "UnixServerCleanupTests"],
}

# The loop under test; `--stock` swaps in asyncio's own, to see what the interpreter's
# asyncio passes through this same adapter.
new_event_loop = ferroloop.new_event_loop
EventLoopPolicy = ferroloop.EventLoopPolicy


class TestTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise TestTimeout("test exceeded its time limit")


def _ferroloop_class(module, base_name):
    base = getattr(module, base_name)
    return type(
        "Ferroloop" + base_name,
        (base,),
        {
            # test_events and friends call create_event_loop; the functional tests
            # (test_server, test_buffered_proto) call new_loop.
            "create_event_loop": lambda self: new_event_loop(),
            "new_loop": lambda self: new_event_loop(),
            "__module__": module.__name__,
        },
    )


def load(module_name: str) -> unittest.TestSuite:
    module = __import__(f"test.test_asyncio.{module_name}", fromlist=["*"])
    loader = unittest.TestLoader()
    if module_name in MIXIN_MODULES:
        suite = loader.loadTestsFromTestCase(_ferroloop_class(module, MIXIN_MODULES[module_name]))
        for name in ALSO_LOAD.get(module_name, []):
            if hasattr(module, name):
                suite.addTests(loader.loadTestsFromTestCase(getattr(module, name)))
        return suite
    return loader.loadTestsFromModule(module)


def short_id(test: unittest.TestCase) -> str:
    # "ClassName.test_method", the form used in expectations.py
    return ".".join(test.id().split(".")[-2:])


def apply_expectations(suite, module_name: str, marks: dict) -> None:
    for test in _iter(suite):
        mark = marks.get(short_id(test)) or marks.get(test.id().split(".")[-1])
        if mark is None:
            continue
        kind, reason = mark
        if kind == "skip":
            method = getattr(test, test._testMethodName)
            setattr(test, test._testMethodName, unittest.skip(f"excluded: {reason}")(method))
        else:
            # What unittest.expectedFailure sets, on the test instance.
            test.__unittest_expecting_failure__ = True


def _iter(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _iter(item)
        else:
            yield item


class Result(unittest.TextTestResult):
    def __init__(self, *args, timeout: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.timeout = timeout
        self.outcomes: dict[str, str] = {}
        self.virtual_clock: set[str] = set()
        self.current = None

    def startTest(self, test):
        self.current = short_id(test)
        # A policy left behind by one test must not leak into the next.
        asyncio.set_event_loop_policy(EventLoopPolicy())
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, self.timeout)
        faulthandler.dump_traceback_later(self.timeout * 3, exit=True)
        super().startTest(test)

    def stopTest(self, test):
        signal.setitimer(signal.ITIMER_REAL, 0)
        faulthandler.cancel_dump_traceback_later()
        # Not the default policy: 3.10's IsolatedAsyncioTestCase makes its loop before
        # startTest, from the policy in place then.
        asyncio.set_event_loop_policy(EventLoopPolicy())
        super().stopTest(test)

    def _set(self, test, outcome):
        self.outcomes[short_id(test)] = outcome

    def addSuccess(self, test):
        super().addSuccess(test)
        self._set(test, "pass")

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set(test, "fail")

    def addError(self, test, err):
        super().addError(test, err)
        self._set(test, "error")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._set(test, "skip")

    def addExpectedFailure(self, test, err):
        super().addExpectedFailure(test, err)
        self._set(test, "xfail")

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._set(test, "xpass")


def _make_result_class(timeout: float):
    def make(*args, **kwargs):
        result = Result(*args, timeout=timeout, **kwargs)
        _track_virtual_clock(result)
        return result

    return make


def _track_virtual_clock(result: Result) -> None:
    """Marks tests that build test_utils' virtual-clock TestLoop (they never use ferroloop)."""
    from test.test_asyncio import utils as test_utils

    original = test_utils.TestCase.new_test_loop

    def new_test_loop(self, gen=None):
        if gen is None:
            # No virtual time needed: run the test on a real ferroloop loop instead.
            loop = new_event_loop()
            self.set_event_loop(loop)
            return loop
        result.virtual_clock.add(result.current)
        return original(self, gen)

    test_utils.TestCase.new_test_loop = new_test_loop


def _patch_pep492_tests() -> None:
    """test_pep492's base class drives a mocked BaseEventLoop; use a ferroloop loop."""
    from test.test_asyncio import test_pep492
    from test.test_asyncio import utils as test_utils

    def setUp(self):
        test_utils.TestCase.setUp(self)
        self.loop = ferroloop.new_event_loop()
        self.set_event_loop(self.loop)

    test_pep492.BaseTest.setUp = setUp


def _patch_runner_tests() -> None:
    """test_runners builds a mocked BaseEventLoop; give it a ferroloop loop instead,
    with the same `shutdown_ag_run` probe its tests read."""
    from test.test_asyncio import test_runners

    def new_loop(self):
        loop = ferroloop.new_event_loop()
        loop.shutdown_ag_run = False

        async def shutdown_asyncgens():
            loop.shutdown_ag_run = True

        loop.shutdown_asyncgens = shutdown_asyncgens
        return loop

    test_runners.BaseTest.new_loop = new_loop


def _count_loops() -> list[int]:
    """Counts ferroloop loops created, to show the module really exercised ferroloop."""
    created = [0]
    original = ferroloop.Loop.__init__

    def init(self):
        created[0] += 1
        original(self)

    ferroloop.Loop.__init__ = init
    return created


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("module")
    parser.add_argument("--json")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("-k", dest="pattern")
    parser.add_argument(
        "--stock", action="store_true", help="run on asyncio's own loop (the yardstick)"
    )
    args = parser.parse_args()

    global new_event_loop, EventLoopPolicy
    if args.stock:
        new_event_loop = asyncio.new_event_loop
        EventLoopPolicy = asyncio.DefaultEventLoopPolicy
    elif args.module == "test_runners":
        _patch_runner_tests()
    elif args.module == "test_pep492":
        _patch_pep492_tests()
    suite = load(args.module)
    if args.pattern:
        suite = unittest.TestSuite(t for t in _iter(suite) if args.pattern in t.id())
    if not args.stock:  # the yardstick runs every test, the excluded ones too
        apply_expectations(suite, args.module, expectations.for_module(args.module))
    runner = unittest.TextTestRunner(verbosity=2 if args.pattern else 1)
    created = _count_loops()
    started = time.monotonic()
    runner.resultclass = _make_result_class(args.timeout)
    asyncio.set_event_loop_policy(EventLoopPolicy())
    result = runner.run(suite)
    print(f"ferroloop loops created: {created[0]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "module": args.module,
                    "outcomes": result.outcomes,
                    "virtual_clock": sorted(result.virtual_clock),
                    "loops_created": created[0],
                    "seconds": round(time.monotonic() - started, 1),
                },
                fh,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
