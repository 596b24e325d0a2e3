"""Runs every conformance module and prints the README's Markdown table of counts.

    python -m tests.conformance.summary
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

from .test_conformance import MODULES, run_module


def main() -> None:
    totals = collections.Counter()
    print("| module | pass | xfail (waits for a later issue) | skipped (internals) | fail | of which virtual-clock only |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for module in MODULES:
            result = run_module(module, Path(tmp) / f"{module}.json")
            counts = collections.Counter(result["outcomes"].values())
            virtual = len(result["virtual_clock"])
            fail = counts["fail"] + counts["error"] + counts["xpass"]
            totals.update(counts)
            totals["virtual"] += virtual
            print(f"| {module} | {counts['pass']} | {counts['xfail']} | {counts['skip']} | {fail} | {virtual} |")
    fail = totals["fail"] + totals["error"] + totals["xpass"]
    print(f"| **total** | **{totals['pass']}** | {totals['xfail']} | {totals['skip']} | {fail} | {totals['virtual']} |")


if __name__ == "__main__":
    main()
