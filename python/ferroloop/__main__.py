"""`python -m ferroloop script.py [args]` / `python -m ferroloop -m module [args]`:
run a program with ferroloop as asyncio's loop, as plain `python` would run it.
Runner options (`--watchdog`, `--workers`...) come before the program."""

from __future__ import annotations

import os
import platform
import runpy
import signal
import sys
import traceback

USAGE = (
    "usage: python -m ferroloop [--version] [--watchdog THRESHOLD] [--inspect PATH]"
    " (script.py | -m module) [args ...]\n"
    "       python -m ferroloop --workers (N | auto) [--graceful-timeout SECONDS]"
    " [--watchdog THRESHOLD] [--inspect PATH] (script.py | -m module) [args ...]\n"
    "       python -m ferroloop top PATH [--interval SECONDS] [--json]\n"
    "  --watchdog THRESHOLD  report a callback that blocks the loop longer than THRESHOLD"
    " (100ms, 0.1s or 0.1), with its stack\n"
    "  --inspect PATH        serve the loop's stats and connections on a Unix socket at PATH"
    " (PATH.N in worker N), for `top`"
)
WORKER_FLAGS = ("--workers", "--graceful-timeout")
WATCHDOG_FLAG = "--watchdog"
INSPECT_FLAG = "--inspect"
RUNNER_FLAGS = (WATCHDOG_FLAG, INSPECT_FLAG)


def _user_traceback(tb):
    """Drops the runner's own frames (this file, runpy) from the front of a traceback."""
    own = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}

    def is_runner(filename: str) -> bool:
        return filename == "<frozen runpy>" or os.path.abspath(filename) in own

    while tb is not None and is_runner(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def _supervise(argv: list[str]) -> None:
    """`--workers N [--graceful-timeout S] target...`: the supervisor (ferroloop._workers)."""
    from . import _workers

    options = {}
    while argv and argv[0].split("=", 1)[0] in WORKER_FLAGS:
        flag, _, value = argv[0].partition("=")
        if not value:
            if len(argv) < 2:
                _usage_error(f"{flag} needs a value")
            value, argv = argv[1], argv[2:]
        else:
            argv = argv[1:]
        options[flag] = value
    try:
        count = _workers.worker_count(options.get("--workers", ""))
        timeout = float(options.get("--graceful-timeout", _workers.DEFAULT_GRACEFUL_TIMEOUT))
    except ValueError:
        _usage_error("--workers takes a positive number or auto, --graceful-timeout seconds")
    if not argv or argv[0] == "-m" and len(argv) < 2:
        _usage_error("no program to run")
    if argv[0] != "-m" and not os.path.exists(argv[0]):
        _usage_error(f"can't open file {argv[0]!r}")
    sys.exit(_workers.supervise(count, timeout, argv))


def _take_runner_options(argv: list[str]) -> dict[str, str]:
    """Takes `--watchdog THRESHOLD` and `--inspect PATH` out of the runner options (the
    flags before the program, worker flags among them) and returns their values."""
    values = {}
    i = 0
    while i < len(argv):
        flag, equals, given = argv[i].partition("=")
        if flag not in (*WORKER_FLAGS, *RUNNER_FLAGS):
            break
        width = 1 if equals else 2
        if not equals:
            if i + 1 >= len(argv):
                _usage_error(f"{flag} needs a value")
            given = argv[i + 1]
        if flag in RUNNER_FLAGS:
            values[flag] = given
            del argv[i : i + width]
        else:
            i += width
    return values


def _set_watchdog(value: str, workers: bool) -> None:
    """Every loop of the program gets the watchdog: through the runner's default, or
    for workers, which are programs of their own, through the environment."""
    from ferroloop import _watchdog

    try:
        threshold = _watchdog.parse_threshold(value)
    except ValueError as exc:
        _usage_error(f"--watchdog: {exc}")
    if workers:
        os.environ[_watchdog.ENVIRONMENT_VARIABLE] = value
    else:
        # Also 0 (off): the runner's word overrides the environment's.
        _watchdog.runner_threshold = threshold or 0.0


def _usage_error(message: str) -> None:
    print(f"{USAGE}\npython -m ferroloop: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)
    if argv[0] == "top":
        from ._top import main as top

        top(argv[1:])
        return
    options = _take_runner_options(argv)
    workers = bool(argv) and argv[0].split("=", 1)[0] in WORKER_FLAGS
    if WATCHDOG_FLAG in options:
        _set_watchdog(options[WATCHDOG_FLAG], workers)
    if INSPECT_FLAG in options:
        # Through the environment, so that workers (PATH.N) see it too.
        os.environ["FERROLOOP_INSPECT"] = os.path.abspath(options[INSPECT_FLAG])
    if not argv:
        _usage_error("no program to run")
    if workers:
        _supervise(argv)

    import ferroloop
    from ferroloop import _workers

    if argv[0] in ("-V", "--version"):
        print(f"ferroloop {ferroloop.__version__} (CPython {platform.python_version()})")
        return
    worker = _workers.enter_worker_mode()
    ferroloop.install()
    try:
        if argv[0] == "-m":
            if len(argv) < 2:
                print(USAGE, file=sys.stderr)
                sys.exit(2)
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            script = argv[0]
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(script))
            runpy.run_path(script, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - reported exactly as python reports it
        if worker and isinstance(exc, KeyboardInterrupt):
            sys.exit(0)  # the supervisor's stop: asyncio.run's shutdown has run
        traceback.print_exception(type(exc), exc, _user_traceback(exc.__traceback__))
        sys.stderr.flush()
        if isinstance(exc, KeyboardInterrupt):
            # Die of SIGINT, as the interpreter does, so the parent sees the signal.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
