"""Re-execute notebooks in place: ``make notebooks`` (all) or ``make notebooks NB=notebooks/03_*.ipynb``.

Each notebook runs in a fresh ``python3`` kernel, with the notebooks folder as
working directory (as nbval and JupyterLab do) and ``IPYKERNEL_CELL_NAME``
set so tracebacks name cells the same way on every run. Outputs and execution
counts are rewritten; nothing else about the notebook changes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def run(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["IPYKERNEL_CELL_NAME"] = "<IPY-INPUT>"
    os.environ.pop("SHARDLIB_URLS", None)  # committed outputs are the SQLite ones
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}},
        record_timing=False,
    )
    started = time.perf_counter()
    client.execute()
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, path)
    print(f"{path.relative_to(ROOT)}: {time.perf_counter() - started:.1f}s")


def main(argv: list[str]) -> int:
    paths = [Path(a).resolve() for a in argv] or sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    for path in paths:
        run(path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
