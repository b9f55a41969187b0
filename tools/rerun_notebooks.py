"""Run each notebook with every code cell executed twice in a row: ``python tools/rerun_notebooks.py [NB ...]``.

This is how a learner really uses a notebook: they edit a cell, run it, run
it again. Every cell must survive that: set-up cells dispose the engines and
sessions they replace, data cells are idempotent, checks say what they
expected. The notebook runs top to bottom in ONE fresh ``python3`` kernel
(working directory ``notebooks/``, as nbval and ``tools/run_notebooks.py``);
each code cell is run, then run again, before the next one. The first error
stops the notebook and is reported with its cell index and which run failed.

Nothing is written back: the committed outputs change only through
``make notebooks``. ``tests/test_rerun.py`` runs this for every notebook
(``make test``); ``--json`` prints one machine-readable line per notebook; ``--servers`` keeps
``SHARDLIB_URLS`` (normally dropped so parallel runs get their own SQLite
folders) to run on the servers it names, one notebook after another.

After the last cell, every check cell (tag ``check``) runs once more: the
hidden solutions have set the answers by then, so each check must say
"right" for every answer. That proves the checks grade what they claim to,
and that each solution satisfies its own check.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def rerun(path: Path, times: int = 2, servers: bool = False) -> dict[str, object]:
    """Execute ``path`` with each code cell run ``times`` times; return ``{"notebook", "error", "seconds"}``.

    ``error`` is ``None`` or a sentence naming the cell index (0-based, as in
    JupyterLab's cell order), the run (1st or 2nd), the first source line and
    the exception.
    """
    nb = nbformat.read(path, as_version=4)
    os.environ["IPYKERNEL_CELL_NAME"] = "<IPY-INPUT>"
    if not servers:  # each notebook has its own SQLite folder: safe to run in parallel
        os.environ.pop("SHARDLIB_URLS", None)
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        allow_errors=False,
    )
    started = time.perf_counter()
    error = None
    with client.setup_kernel():
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            for attempt in range(1, times + 1):
                try:
                    client.execute_cell(cell, index)
                except CellExecutionError as exc:
                    first_line = next((line for line in cell.source.splitlines() if line.strip()), "")
                    error = (
                        f"{path.name}: cell {index} failed on run {attempt} of {times} "
                        f"(first line: {first_line!r}): {exc.ename}: {exc.evalue}{_failing_line(exc)}"
                    )
                    break
            if error:
                break
        if error is None:
            error = _checks_accept_the_solutions(client, nb, path)
    return {"notebook": path.name, "error": error, "seconds": round(time.perf_counter() - started, 1)}


def _failing_line(exc: CellExecutionError) -> str:
    """The source line IPython's traceback points at (``---->``), for errors with no message."""
    marked = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines() if "---->" in line]
    return f" at: {marked[-1].split('---->', 1)[1].strip()}" if marked else ""


def _checks_accept_the_solutions(client: NotebookClient, nb, path: Path) -> str | None:
    """After Run All the hidden solutions have set every answer: each check cell, run again, must say "right"."""
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "check" not in cell.metadata.get("tags", []):
            continue
        try:
            client.execute_cell(cell, index)
        except CellExecutionError as exc:
            return f"{path.name}: check cell {index} failed when run after the solutions: {exc.ename}: {exc.evalue}"
        printed = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
        if "right" not in printed or "not quite" in printed or "not answered yet" in printed:
            return (f"{path.name}: check cell {index}, run after the hidden solutions, should say 'right' "
                    f"for every answer; it printed: {printed.strip()[:1000]!r}")
    return None


def main(argv: list[str]) -> int:
    as_json = "--json" in argv
    servers = "--servers" in argv  # keep SHARDLIB_URLS: run on those servers (one notebook at a time!)
    paths = [Path(a).resolve() for a in argv if not a.startswith("--")] or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    failed = 0
    for path in paths:
        result = rerun(path, servers=servers)
        failed += result["error"] is not None
        print(json.dumps(result) if as_json else f"{result['notebook']}: {result['error'] or 'ok'} ({result['seconds']}s)",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
