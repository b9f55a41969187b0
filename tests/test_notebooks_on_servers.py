"""Every notebook runs unchanged against the servers in SHARDLIB_URLS (make test-pg).

Outputs are not compared: SQL text in traces legitimately differs between
dialects (``?`` vs ``$1::VARCHAR``). Every cell must run without an error,
and the notebooks' own asserts check what they claim.
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import on_postgres

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))

pytestmark = pytest.mark.skipif(not on_postgres(), reason="needs SHARDLIB_URLS (make pg-up)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_on_servers(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    os.environ["IPYKERNEL_CELL_NAME"] = "<IPY-INPUT>"
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
