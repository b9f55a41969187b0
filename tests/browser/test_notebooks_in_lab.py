"""Every notebook, as a learner runs it: JupyterLab, Kernel -> Restart Kernel and Run All Cells.

Each notebook is opened and run once (``notebook_run``); the tests below
check different things on that one run, so a failure names what broke. A
full-height screenshot of each run notebook goes to
``artifacts/screenshots/<notebook>.png``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .lab import NOTEBOOKS, SCREENSHOTS, Expected, LabPage, LabServer, NotebookRun, notebook_names, sha256

pytestmark = pytest.mark.browser

NAMES = notebook_names()


@pytest.fixture(scope="session")
def notebook_run(lab_server: LabServer, browser_context: Any) -> Iterator[Callable[[str], NotebookRun]]:
    """Run each notebook at most once per session, however many tests look at it."""
    lab = LabPage(browser_context, lab_server)
    done: dict[str, NotebookRun | BaseException] = {}

    def get(name: str) -> NotebookRun:
        if name not in done:
            path = NOTEBOOKS / name
            before = sha256(path)
            try:
                run = lab.run(name, screenshot=SCREENSHOTS / f"{path.stem}.png")
                run.report["sha256_before"], run.report["sha256_after"] = before, sha256(path)
                done[name] = run
                print(f"\n{name}: {run.seconds:.1f}s {run.phases}")
            except Exception as error:  # noqa: BLE001 (re-raised for every test of this notebook)
                done[name] = error
        result = done[name]
        if isinstance(result, BaseException):
            raise result
        return result

    yield get
    lab.close()


@pytest.fixture
def expected(name: str) -> Expected:
    return Expected.from_file(NOTEBOOKS / name)


def test_there_are_notebooks() -> None:
    assert len(NAMES) >= 10, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom_without_errors(name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected) -> None:
    run = notebook_run(name)
    errors = run.errors()
    page_errors = f"\n\nJavaScript errors on the page: {run.page_errors}" if run.page_errors else ""
    assert not errors, f"{name} failed in JupyterLab:\n\n" + "\n\n".join(errors) + page_errors
    counts = [c["execution_count"] for c in run.code]
    # A fresh kernel ran every code cell once, in order.
    assert counts == list(range(1, expected.code_cells + 1)), counts


@pytest.mark.parametrize("name", NAMES)
def test_dataframes_render_as_tables(name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected) -> None:
    run = notebook_run(name)
    rendered = sum(c["html_tables"] for c in run.code)
    if expected.calls_show_shards:
        assert expected.html_tables >= 1, f"{name} calls show_shards but its saved outputs hold no table"
    # The committed outputs (which nbval keeps in step with the code) say how many.
    assert rendered == expected.html_tables, f"{rendered} HTML tables on the page, {expected.html_tables} in {name}"
    images = [ok for c in run.code for ok in c["images"]]
    assert len(images) == expected.images and all(images), f"figures: {images}, expected {expected.images}"


@pytest.mark.parametrize("name", NAMES)
def test_widgets_render(name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected) -> None:
    """tqdm's progress bar is an ipywidget in JupyterLab: only a browser shows whether it renders."""
    run = notebook_run(name)
    rendered = sum(c["widgets"] for c in run.code)
    assert rendered == expected.widgets, f"{rendered} widgets rendered, {expected.widgets} in {name}"


@pytest.mark.parametrize("name", NAMES)
def test_mermaid_diagrams_render(name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected) -> None:
    run = notebook_run(name)
    by_cell = {c["index"]: c.get("mermaid", []) for c in run.report["cells"]}
    for index, fences in expected.mermaid.items():
        diagrams = by_cell[index]
        assert len(diagrams) == fences, f"cell {index}: {len(diagrams)} diagrams rendered, {fences} mermaid blocks"
        for diagram in diagrams:
            assert not diagram["warning"], f"cell {index}: mermaid reported an error"
            assert diagram["svg"] and diagram["loaded"], f"cell {index}: no SVG image: {diagram}"
    if name.startswith("00_"):
        assert expected.mermaid, "00_overview is expected to show at least one diagram"


@pytest.mark.parametrize("name", NAMES)
def test_solution_cells_open_collapsed(name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected) -> None:
    run = notebook_run(name)
    assert run.report["dom_cells"] == run.report["model_cells"], "not every cell is attached (windowing mode)"
    assert expected.hidden_inputs, f"{name} has no hidden solution cell"
    assert run.report["collapsed_on_open"] == expected.hidden_inputs, "collapsed cells when the notebook opened"
    for cell in run.report["cells"]:
        hidden = cell["index"] in expected.hidden_inputs
        assert cell["input_hidden"] == hidden, cell
        assert cell["placeholder"] == hidden, f"cell {cell['index']}: collapsed placeholder shown: {cell['placeholder']}"
        if hidden:
            assert not cell["editor_visible"], f"cell {cell['index']}: solution source is visible"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_file_is_never_saved(name: str, notebook_run: Callable[[str], NotebookRun]) -> None:
    run = notebook_run(name)
    assert not run.contents_writes, f"the page tried to write: {run.contents_writes}"
    assert run.report["sha256_after"] == run.report["sha256_before"], f"{name} changed on disk"
    assert run.screenshot is not None and run.screenshot.stat().st_size > 0
