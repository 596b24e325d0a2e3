"""`python -m ferroloop script.py [args]` / `python -m ferroloop -m module [args]`:
run a program with ferroloop as asyncio's loop, as plain `python` would run it."""

from __future__ import annotations

import os
import platform
import runpy
import signal
import sys
import traceback

USAGE = "usage: python -m ferroloop [--version] (script.py | -m module) [args ...]"


def _user_traceback(tb):
    """Drops the runner's own frames (this file, runpy) from the front of a traceback."""
    own = {os.path.abspath(__file__), os.path.abspath(runpy.__file__)}

    def is_runner(filename: str) -> bool:
        return filename == "<frozen runpy>" or os.path.abspath(filename) in own

    while tb is not None and is_runner(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


def main(argv: list[str]) -> None:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not argv else sys.stdout)
        sys.exit(2 if not argv else 0)

    import ferroloop

    if argv[0] in ("-V", "--version"):
        print(f"ferroloop {ferroloop.__version__} (CPython {platform.python_version()})")
        return
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
        traceback.print_exception(type(exc), exc, _user_traceback(exc.__traceback__))
        sys.stderr.flush()
        if isinstance(exc, KeyboardInterrupt):
            # Die of SIGINT, as the interpreter does, so the parent sees the signal.
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
