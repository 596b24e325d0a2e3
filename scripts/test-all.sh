#!/usr/bin/env bash
# Runs the whole test suite (behaviour, stress, runner, CPython's test_asyncio of that
# interpreter, and the integration tests against real PostgreSQL and Redis) once per
# interpreter: the ones given as arguments, or else every one scripts/pythons.sh finds
# (3.11, and 3.10, 3.12, 3.13 where the machine has them). Each interpreter gets its own
# virtualenv (.venv-3.X) and cargo target folder (target/py3.X), so a second run only
# rebuilds what changed. Before the tests, mypy's stubtest checks the type stubs against
# the module as built. Prints a table of the versions that ran, their counts and the
# stubtest outcome, then one closing line with the test totals; exits non-zero if any
# run failed or collected nothing (pytest's exit 5 is a broken suite, not a pass) or a
# stubtest failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ $# -gt 0 ]; then
    pythons=("$@")
else
    mapfile -t pythons < <(scripts/pythons.sh) || exit 1
    [ ${#pythons[@]} -gt 0 ] || exit 1
fi

mkdir -p target
start=$(date +%s)
status=0
reports=()
for py in "${pythons[@]}"; do
    if ! ver=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])'); then
        echo "test-all: $py does not run" >&2
        status=1
        continue
    fi
    venv=.venv-$ver
    report=target/pytest-$ver.xml
    echo "=== CPython $ver ($py): building ferroloop into $venv"
    t0=$(date +%s)
    if [ ! -x "$venv/bin/python" ]; then
        "$py" -m venv "$venv" && "$venv/bin/pip" install -q --upgrade pip || { status=1; continue; }
    fi
    if ! CARGO_TARGET_DIR=target/py$ver "$venv/bin/pip" install -q ".[test,integration]"; then
        echo "test-all: building ferroloop for CPython $ver failed" >&2
        status=1
        continue
    fi
    # The stub of the Rust core against the module just built (pyo3's signatures and
    # the Python modules' version branches differ by interpreter).
    echo "=== CPython $ver: stubtest"
    if "$venv/bin/python" -m mypy.stubtest ferroloop --mypy-config-file pyproject.toml \
        --allowlist scripts/stubtest-allowlist.txt; then
        stub=ok
    else
        stub=failed
        status=1
    fi
    echo "=== CPython $ver: tests"
    rm -f "$report"
    "$venv/bin/python" -m pytest tests -q -p no:cacheprovider --junitxml="$report"
    rc=$?
    if [ $rc -eq 5 ]; then
        echo "test-all: pytest collected no tests on CPython $ver" >&2
    fi
    [ $rc -eq 0 ] || status=1
    echo "=== CPython $ver: pytest exit $rc after $(( $(date +%s) - t0 )) s"
    reports+=("$ver=$report=$rc=$stub")
done

python3 scripts/test_summary.py "$(( $(date +%s) - start ))" "${reports[@]}" || status=1
exit $status
