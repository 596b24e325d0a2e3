"""CPython's own test_asyncio against ferroloop: one subprocess per module.

A module passes when every test not listed in expectations.py passes, no listed
xfail unexpectedly passes, and the module really built ferroloop loops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_test_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(f"test.test_asyncio.{module}") is not None
    except ImportError:
        return True  # no `test` package: test_cpython_test_package_is_installed fails


MODULES = [
    "test_events",
    "test_tasks",
    "test_futures",
    "test_locks",
    "test_queues",
    "test_taskgroups",
    "test_timeouts",
    "test_waitfor",
    "test_runners",
    "test_context",
    "test_pep492",
    "test_sock_lowlevel",
    "test_streams",
    "test_server",
    "test_sendfile",
    "test_buffered_proto",
    "test_sslproto",
    "test_subprocess",
    "test_ssl",
    "test_threads",
    "test_futures2",
    "test_eager_task_factory",  # 3.12+
    "test_staggered",  # 3.13+
]
# Only the modules this interpreter's test package has (test_taskgroups, test_timeouts
# and test_ssl are 3.11+).
MODULES = [m for m in MODULES if _has_test_module(m)]



def run_module(module: str, out: Path, stock: bool = False) -> dict:
    """One module's outcomes on ferroloop, or with `stock` on asyncio's own loop."""
    proc = subprocess.run(
        [sys.executable, "-m", "tests.conformance.adapter", module, "--json", str(out)]
        + (["--stock"] if stock else []),
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONASYNCIODEBUG": ""},
    )
    assert out.exists(), f"{module} did not finish:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    result = json.loads(out.read_text())
    result["log"] = proc.stderr
    return result


def test_cpython_test_package_is_installed():
    # In CI a missing `test` package must fail, not skip the conformance run.
    import test.test_asyncio  # noqa: F401


@pytest.mark.parametrize("module", MODULES)
def test_conformance(module, tmp_path):
    result = run_module(module, tmp_path / f"{module}.json")
    outcomes = result["outcomes"]
    bad = sorted(name for name, outcome in outcomes.items() if outcome in ("fail", "error"))
    xpass = sorted(name for name, outcome in outcomes.items() if outcome == "xpass")
    assert result["loops_created"] > 0, f"{module} never built a ferroloop loop"
    assert not bad, f"{module}: unexpected failures {bad}\n{result['log'][-8000:]}"
    assert not xpass, f"{module}: listed as xfail but passing now, update expectations.py: {xpass}"
