"""`python -m ferroloop`: argv, exit status and tracebacks as plain python gives them."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run(tmp_path, body, *args, module=False):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(body))
    target = ["-m", "prog"] if module else [str(script)]
    return subprocess.run(
        [sys.executable, "-m", "ferroloop", *target, *args],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


PROGRAM = """
import asyncio, sys
async def main():
    loop = asyncio.get_running_loop()
    print(type(loop).__module__, sys.argv[1:])
    await asyncio.sleep(0.01)
    return int(sys.argv[1]) if len(sys.argv) > 1 else 0
sys.exit(asyncio.run(main()))
"""


def test_script_runs_on_ferroloop_with_argv_and_exit_status(tmp_path):
    proc = run(tmp_path, PROGRAM, "3", "x")
    assert proc.returncode == 3
    assert proc.stdout.strip() == "ferroloop._loop ['3', 'x']"


def test_module_mode(tmp_path):
    proc = run(tmp_path, PROGRAM, "0", module=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ferroloop._loop ['0']"


def test_uncaught_exception_traceback_starts_at_the_script(tmp_path):
    proc = run(tmp_path, "import asyncio\nasync def main():\n    raise ValueError('boom')\nasyncio.run(main())\n")
    assert proc.returncode == 1
    assert "ValueError: boom" in proc.stderr
    first_frame = proc.stderr.splitlines()[1]
    assert "prog.py" in first_frame
    assert "runpy" not in proc.stderr and "__main__.py" not in proc.stderr


def test_no_arguments_is_a_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "ferroloop"], check=False, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "usage" in proc.stderr


def test_version_is_printed_not_taken_for_a_script(tmp_path):
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        proc = subprocess.run(
            [sys.executable, "-m", "ferroloop", flag],
            check=False,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""
        expected = f"ferroloop {version('ferroloop')} (CPython {sys.version.split()[0]})"
        assert proc.stdout.strip() == expected


def test_sigint_taken_by_another_thread_still_interrupts_asyncio_run(tmp_path):
    # The interpreter runs a signal's C handler in whichever thread the kernel picked;
    # only the wakeup fd the running loop sets tells an idle loop (no timer, no fd) that
    # asyncio.run's SIGINT handler is due. Without it this program sleeps for an hour.
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import asyncio, signal, threading, time, ferroloop

        def poke():
            time.sleep(0.5)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)

        async def main():
            threading.Thread(target=poke).start()
            await asyncio.sleep(3600)

        try:
            ferroloop.run(main())
        except KeyboardInterrupt:
            print("interrupted")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.stdout.strip() == "interrupted", proc.stderr
