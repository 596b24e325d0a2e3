"""Runs every conformance module on ferroloop and on asyncio's own loop (the
yardstick, every test run, none excluded) and prints the README's Markdown table.

    python -m tests.conformance.summary
"""

from __future__ import annotations

import collections
import platform
import tempfile
from pathlib import Path

from .test_conformance import MODULES, run_module

FAILED = ("fail", "error", "xpass")


def main() -> None:
    totals = collections.Counter()
    print(f"CPython {platform.python_version()}:\n")
    print(
        "| module | stock asyncio passes | ferroloop passes | skipped (internals) "
        "| fail | stock passes, ferroloop not | of which virtual-clock only |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for module in MODULES:
            ours = run_module(module, Path(tmp) / f"{module}.json")
            stock = run_module(module, Path(tmp) / f"{module}-stock.json", stock=True)
            outcomes = ours["outcomes"]
            stock_passed = {t for t, o in stock["outcomes"].items() if o == "pass"}
            counts = collections.Counter(outcomes.values())
            row = {
                "stock": len(stock_passed),
                "pass": counts["pass"],
                "skip": counts["skip"] + counts["xfail"],
                "fail": sum(counts[o] for o in FAILED),
                # Excluded tests are counted as skipped, not here.
                "behind": sum(1 for t in stock_passed if outcomes.get(t, "fail") in FAILED),
                "virtual": len(ours["virtual_clock"]),
            }
            totals.update(row)
            print(
                f"| {module} | {row['stock']} | {row['pass']} | {row['skip']} | {row['fail']} "
                f"| {row['behind']} | {row['virtual']} |"
            )
    t = totals
    print(
        f"| **total** | {t['stock']} | **{t['pass']}** | {t['skip']} | {t['fail']} "
        f"| {t['behind']} | {t['virtual']} |"
    )


if __name__ == "__main__":
    main()
