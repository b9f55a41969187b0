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


def _telling_lines(text: str) -> list[str]:
    """Lines long enough to identify a solution (short ones like ")" or "# Solution" prove nothing)."""
    return [line.strip() for line in text.splitlines() if len(line.strip()) >= 12]


@pytest.mark.parametrize("name", NAMES)
def test_nothing_of_a_solution_shows_until_expanded(
    name: str, notebook_run: Callable[[str], NotebookRun], expected: Expected
) -> None:
    """No code and no output of a solution is on the page until the learner expands it.

    Checked on what the browser renders (each solution cell's innerText and
    its laid-out output areas) twice: as the notebook opens (its saved
    outputs) and after Run All. JupyterLab un-hides a cell's output whenever
    the cell runs (``outputs_hidden`` only protects the saved file), so after
    a run only a solution that prints nothing shows nothing. Then the
    learner's way in is taken (click the placeholders) to prove the same
    probes do see the source once expanded.
    """
    run = notebook_run(name)
    assert expected.solutions, f"{name} has no solution cell"
    for moment in ("solutions_on_open", "solutions"):
        solutions = {entry["index"]: entry for entry in run.report[moment]}
        assert sorted(solutions) == expected.solutions, f"{moment}: solution cells {sorted(solutions)}, in the file {expected.solutions}"
        for index, cell in solutions.items():
            assert cell["input_hidden"] and cell["input_placeholder"] and not cell["editor_visible"], (
                f"{moment}, cell {index}: the solution's source is not collapsed: {cell}"
            )
            if moment == "solutions_on_open":
                assert cell["output_hidden"], f"cell {index}: the saved solution output is not hidden (jupyter.outputs_hidden)"
            assert cell["visible_outputs"] == 0, (
                f"{moment}, cell {index}: {cell['visible_outputs']} solution output(s) on the page"
                + ("; JupyterLab shows a cell's output again when it runs: a solution must print nothing"
                   if moment == "solutions" else "")
            )
            shown = [line for line in _telling_lines(cell["source"] + "\n" + cell["output_text"]) if line in cell["visible_text"]]
            assert not shown, f"{moment}, cell {index}: visible before expanding: {shown[:5]}"

    # The probes above can see a solution: expanded, its code shows.
    for cell in run.report["solutions_expanded"]:
        index = cell["index"]
        assert cell["editor_visible"] and not cell["input_hidden"], f"cell {index}: did not expand: {cell}"
        assert any(line in cell["visible_text"] for line in _telling_lines(cell["source"])), (
            f"cell {index}: source still invisible when expanded"
        )


@pytest.mark.parametrize("name", NAMES)
def test_notebook_file_is_never_saved(name: str, notebook_run: Callable[[str], NotebookRun]) -> None:
    run = notebook_run(name)
    assert not run.contents_writes, f"the page tried to write: {run.contents_writes}"
    assert run.report["sha256_after"] == run.report["sha256_before"], f"{name} changed on disk"
    assert run.screenshot is not None and run.screenshot.stat().st_size > 0
