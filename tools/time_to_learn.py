"""The course's time-to-learn method: ``python tools/time_to_learn.py [NB ...]`` prints each notebook's numbers.

    estimate_minutes = words / 150 + code_lines / 15 + 5 * exercises

- ``words``: whitespace-separated tokens in all Markdown cells (reading at 150 words a minute);
- ``code_lines``: non-blank lines of code cells that are not hidden solutions
  (reading and running code at 15 lines a minute);
- ``exercises``: hidden solution cells (five minutes to think each one through).

The "Time to learn" section states an integer number of minutes (its first
"NN minutes"), and it must lie between ``ceil(estimate)`` and
``ceil(estimate) + 10``. ``tests/test_project.py`` enforces this;
CONTRIBUTING.md explains it.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import Any

import nbformat

ROOT = Path(__file__).resolve().parent.parent
SLACK = 10


def is_solution(cell: Any) -> bool:
    return cell.cell_type == "code" and cell.metadata.get("jupyter", {}).get("source_hidden") is True


def stated_minutes(nb: Any) -> int | None:
    """The first "NN minutes" in the ``## Time to learn`` section, or None."""
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    section = re.search(r"^##\s+Time to learn\s*$(.*?)(?=^##\s|\Z)", text, re.M | re.S)
    if not section:
        return None
    number = re.search(r"(\d+)\s+minutes", section.group(1))
    return int(number.group(1)) if number else None


def measure(nb: Any) -> dict[str, Any]:
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    code_lines = sum(
        sum(1 for line in c.source.splitlines() if line.strip())
        for c in nb.cells if c.cell_type == "code" and not is_solution(c)
    )
    exercises = sum(is_solution(c) for c in nb.cells)
    estimate = words / 150 + code_lines / 15 + 5 * exercises
    return {"words": words, "code_lines": code_lines, "exercises": exercises, "estimate": round(estimate, 1),
            "allowed": (math.ceil(estimate), math.ceil(estimate) + SLACK), "stated": stated_minutes(nb)}


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    bad = 0
    for path in paths:
        m = measure(nbformat.read(path, as_version=4))
        low, high = m["allowed"]
        ok = m["stated"] is not None and low <= m["stated"] <= high
        bad += not ok
        print(f"{path.name:42} {m['words']:5} words {m['code_lines']:4} code lines {m['exercises']} exercises "
              f"-> {m['estimate']:5} min; allowed {low}-{high}; stated {m['stated']} {'ok' if ok else 'OUT OF RANGE'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
