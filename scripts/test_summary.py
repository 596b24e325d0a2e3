"""Prints the per-interpreter table of a scripts/test-all.sh run and its closing line.

    python3 scripts/test_summary.py SECONDS VERSION=JUNIT_XML=EXIT=STUBTEST ...

STUBTEST is `ok` or `failed` (mypy's stubtest of that interpreter's build). Exits 1 when
no interpreter ran, a run wrote no report or a stubtest failed."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET


def counts(path: str) -> dict[str, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for suite in suites:
        for key in total:
            total[key] += int(suite.get(key, 0))
    return total


def main(argv: list[str]) -> int:
    seconds, runs = int(argv[0]), argv[1:]
    ok = bool(runs)
    passed = failed = skipped = 0
    stub_failed = []
    print("\n| CPython | passed | failed | skipped | pytest exit | stubtest |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        version, path, rc, stub = run.split("=")
        if stub != "ok":
            stub_failed.append(version)
        try:
            c = counts(path)
        except (OSError, ET.ParseError) as exc:
            print(f"| {version} | - | - | - | {rc} (no report: {exc}) | {stub} |")
            ok = False
            continue
        bad = c["failures"] + c["errors"]
        good = c["tests"] - bad - c["skipped"]
        passed, failed, skipped = passed + good, failed + bad, skipped + c["skipped"]
        print(f"| {version} | {good} | {bad} | {c['skipped']} | {rc} | {stub} |")
    versions = ", ".join(run.split("=")[0] for run in runs) or "none"
    print(f"\nInterpreters tested: {versions}; wall time {seconds // 60} min {seconds % 60} s")
    if not runs:
        print("no interpreter ran")
    if stub_failed:
        print(
            f"stubtest FAILED on CPython {', '.join(stub_failed)}: the declared types do not "
            "match the built package (its errors come before that interpreter's tests)"
        )
    print(f"All: {passed} passed, {failed} failed, {skipped} skipped")
    return 0 if ok and not stub_failed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
