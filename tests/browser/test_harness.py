"""The browser harness itself: it must see a failure when there is one.

A throwaway notebook in a temporary folder (never ``notebooks/``), served by
a second JupyterLab, has a table, a hidden cell that only warns on stderr, a
cell that raises and a cell after it. Run the same way as the real
notebooks, the report must name the exception and nothing else, and the
server must refuse to overwrite the file.
"""

from __future__ import annotations

import json
import urllib.error
from collections.abc import Iterator
from typing import Any

import nbformat
import pytest

from .lab import ARTIFACTS, Expected, LabPage, LabServer, sha256

pytestmark = pytest.mark.browser

CANARY = "canary.ipynb"


def _canary() -> nbformat.NotebookNode:
    v4 = nbformat.v4
    nb = v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [
        v4.new_markdown_cell("# Canary\n\n```mermaid\nflowchart LR\n    A --> B\n```"),
        v4.new_code_cell("import pandas as pd\npd.DataFrame({'shard': ['asia', 'europe'], 'rows': [2, 3]})"),
        v4.new_code_cell(
            "# Solution\nimport sys, warnings\nwarnings.warn('only a warning')\nprint('only stderr', file=sys.stderr)",
            metadata={"jupyter": {"source_hidden": True}},
        ),
        v4.new_code_cell("import time\ntime.sleep(1)\n1 / 0"),
        v4.new_code_cell("print('never runs')"),
    ]
    return nb


@pytest.fixture(scope="module")
def canary_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    root = tmp_path_factory.mktemp("canary-notebooks")
    nbformat.write(_canary(), root / CANARY)
    with LabServer(root, tmp_path_factory.mktemp("canary-lab"), ARTIFACTS / "browser" / "jupyter-lab-canary.log") as server:
        yield server


def test_a_failing_cell_is_reported(canary_server: LabServer, browser_context: Any) -> None:
    path = canary_server.root_dir / CANARY
    before = sha256(path)
    expected = Expected.from_file(path)
    lab = LabPage(browser_context, canary_server)
    try:
        run = lab.run(CANARY, run_timeout_s=120)
    finally:
        lab.close()

    errors = run.errors()
    assert len(errors) == 1 and "ZeroDivisionError" in errors[0], errors
    code = run.code
    # Run All stops at the failing cell: the last cell never ran.
    assert [c["execution_count"] for c in code] == [1, 2, 3, None]
    # stderr is shown, but a warning is not a failure.
    assert any("only a warning" in text for text in code[1]["stderr"]), code[1]["stderr"]
    # The hidden cell opens collapsed; the others do not.
    assert run.report["collapsed_on_open"] == [2]
    assert [c["placeholder"] for c in run.report["cells"]] == [False, False, True, False, False]
    assert not code[1]["editor_visible"]
    # The canary's solution hides its source but not its output (no outputs_hidden):
    # the solution probe must see that output on the page, the mistake issue 12 is about.
    (solution,) = run.report["solutions"]
    assert solution["index"] == 2 and solution["input_hidden"] and not solution["output_hidden"], solution
    assert solution["visible_outputs"] >= 1 and "only stderr" in solution["visible_text"], solution
    assert sum(c["html_tables"] for c in code) == 1
    mermaid = run.report["cells"][0]["mermaid"]
    assert expected.mermaid == {0: 1} and len(mermaid) == 1 and mermaid[0]["svg"] and mermaid[0]["loaded"], mermaid
    assert not run.contents_writes
    assert sha256(path) == before


def test_the_server_refuses_to_save(canary_server: LabServer) -> None:
    path = canary_server.root_dir / CANARY
    before = sha256(path)
    model = {"type": "notebook", "format": "json", "content": json.loads(path.read_text())}
    model["content"]["cells"] = []
    with pytest.raises(urllib.error.HTTPError) as refused:
        canary_server.api("PUT", f"api/contents/{CANARY}", body=model)
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as refused:
        canary_server.api("DELETE", f"api/contents/{CANARY}")
    assert refused.value.code == 403
    assert sha256(path) == before
    assert not (path.parent / ".ipynb_checkpoints").exists()
