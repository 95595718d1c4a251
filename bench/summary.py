"""Every benchmark's headline figures in one table: `make bench`.

The convention: a bench script prints, besides its own report, one line per figure that has
a target (or that the table should show), made by `result()`:

    RESULT {"figure": "...", "value": 1.23, "unit": "x", "target": ">= 0.5", "verdict": "met"}

`verdict` is "met", "missed" or "-" (no target). This file, run as a script, runs each bench
script given (default: all of them, in BENCHES order), passes its output through as it
comes, collects its RESULT lines and prints the table at the end, with the load average of
the machine before each script ran. A script that fails (exit status not 0), or prints no
RESULT line, is named under the table; the others still run. `make bench` runs every script.

Run: .venv/bin/python bench/summary.py bench/links.py [bench/latency.py ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "RESULT "


def result(figure: str, value: float, unit: str, target: str, met: bool | None) -> None:
    """Print one figure for the summary table (`met` None: it has no target)."""
    verdict = "-" if met is None else "met" if met else "missed"
    record = {"figure": figure, "value": value, "unit": unit, "target": target}
    print(RESULT_PREFIX + json.dumps({**record, "verdict": verdict}), flush=True)


def _format(value: float) -> str:
    if value == int(value) and abs(value) >= 10:
        return f"{int(value):,}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def run(script: Path) -> tuple[list[dict[str, object]], int, float, float]:
    """(its results, its exit status, seconds it took, the load average before it)."""
    load = os.getloadavg()[0]
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    results = []
    assert process.stdout is not None
    for line in process.stdout:
        print(line, end="", flush=True)
        if line.startswith(RESULT_PREFIX):
            results.append(json.loads(line[len(RESULT_PREFIX) :]))
    return results, process.wait(), time.monotonic() - start, load


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    scripts = [Path(arg) for arg in argv]
    rows: list[tuple[str, str, str, str, str]] = []
    failed = []
    silent = []
    for script in scripts:
        print(f"\n=== {script} " + "=" * max(0, 70 - len(str(script))), flush=True)
        results, status, seconds, load = run(script)
        if status != 0:
            failed.append(script.name)
        elif not results:
            silent.append(script.name)
        for record in results:
            value = float(record["value"])  # type: ignore[arg-type]
            rows.append(
                (
                    f"{script.name}: {record['figure']}",
                    f"{_format(value)} {record['unit']}".strip(),
                    str(record["target"]),
                    str(record["verdict"]),
                    f"{load:.2f}",
                )
            )
        print(f"=== {script.name}: {seconds:.0f} s, exit status {status}", flush=True)
    header = ("figure", "value", "target", "verdict", "load")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    missed = sum(row[3] == "missed" for row in rows)
    print(f"\n{len(rows)} figures, {missed} missed; load = the load average before the script")
    if silent:
        print(f"no RESULT lines (see their output above): {', '.join(silent)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
