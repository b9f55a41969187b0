"""The project's own rules: dependency lists agree, notebooks are well-formed.

nbval silently skips cells that never ran and silently drops malformed
sanitize entries, so those mistakes are caught here instead.
"""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import sys

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import time_to_learn  # noqa: E402  (tools/ is scripts, not a package)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SKELETON = ["Overview", "Prerequisites", "Time to learn", "Summary", "What's next"]


def _name(requirement: str) -> str:
    name = re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-")


def test_environment_yml_and_pyproject_list_the_same_packages() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"]}
    for extra in ("test", "postgres"):  # "browser" is pip-only (Debian chromium)
        pip_names |= {_name(r) for r in project["optional-dependencies"][extra]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)}
    conda_names -= {"python", "pip", "greenlet"}  # greenlet is sqlalchemy[asyncio]'s extra
    assert conda_names == pip_names, (
        f"only in environment.yml: {sorted(conda_names - pip_names)}; "
        f"only in pyproject.toml: {sorted(pip_names - conda_names)}"
    )
    assert any(isinstance(d, dict) and "-e ." in d.get("pip", []) for d in env["dependencies"])


def test_ci_runs_the_readme_test_command() -> None:
    assert "make test" in (ROOT / ".ci/run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()


def test_sanitize_file_entries_are_well_formed() -> None:
    path = ROOT / "notebooks" / "nbval_sanitize.cfg"
    parser = configparser.ConfigParser()
    parser.read(path)
    for section in parser.sections():
        keys = set(parser[section])
        assert keys == {"regex", "replace"}, f"[{section}] must have exactly regex and replace, has {keys}"
        re.compile(parser[section]["regex"])


def test_notebooks_are_numbered_consecutively() -> None:
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert all(re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", p.name) for p in NOTEBOOKS)
    assert numbers == list(range(max(numbers) + 1)), numbers
    assert [p.name for p in NOTEBOOKS if p.name.startswith("15_")] == ["15_lookups_and_reference_tables.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_executed_cleanly_and_follows_the_skeleton(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    counts = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        assert not any(o.get("output_type") == "error" for o in cell.outputs), "stored error output"
        if cell.source.strip():
            assert cell.execution_count is not None, f"cell never ran: {cell.source[:60]!r}"
            counts.append(cell.execution_count)
        for output in cell.outputs:
            text = "".join(output.get("text", "")) + str(output.get("data", {}).get("text/plain", ""))
            assert " object at 0x" not in text, f"address in output: {text[:120]!r}"
    assert counts == list(range(1, len(counts) + 1)), f"execution counts {counts}"

    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    for heading in SKELETON:
        assert re.search(rf"^##\s+{re.escape(heading)}", markdown, re.M), f"missing section {heading!r}"
    hidden = [c for c in nb.cells if c.metadata.get("jupyter", {}).get("source_hidden")]
    assert hidden, "needs an exercise solution cell hidden by default"
    assert any("assert" in c.source for c in hidden), "the hidden solution should check itself"
    assert "make_engines(" in "".join(c.source for c in nb.cells) or path.name.startswith("00_")
    assert "NBVAL_IGNORE_OUTPUT" not in "".join(c.source for c in nb.cells if "show_shards" in c.source)


@pytest.mark.parametrize("path", NOTEBOOKS[:-1], ids=lambda p: p.name)
def test_notebook_links_the_next_one(path: Path) -> None:
    following = NOTEBOOKS[NOTEBOOKS.index(path) + 1].name
    markdown = "".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    assert f"({following})" in markdown, f"What's next should link {following}"


def _tags(cell) -> list[str]:
    return list(cell.metadata.get("tags", []))


def _hidden(cell) -> dict:
    return cell.metadata.get("jupyter", {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_solution_cells_hide_source_and_outputs(path: Path) -> None:
    """A solution's answer must not show before the learner asks: source AND outputs hidden, tag "solution"."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        flags = _hidden(cell)
        if "solution" in _tags(cell) or flags.get("source_hidden") or flags.get("outputs_hidden"):
            assert cell.cell_type == "code", f"cell {index}: a solution is a code cell"
            assert flags.get("source_hidden") is True and flags.get("outputs_hidden") is True, (
                f"cell {index}: a solution needs jupyter.source_hidden AND jupyter.outputs_hidden true, has {flags}"
            )
            assert "solution" in _tags(cell), f"cell {index}: a hidden solution needs the tag 'solution', has {_tags(cell)}"
            assert not cell.outputs, (
                f"cell {index}: a solution must print and display nothing: JupyterLab shows a cell's output "
                "again whenever it runs (outputs_hidden protects only the saved file), so Run All would reveal it"
            )
            first_line = cell.source.split("\n", 1)[0]
            assert first_line.strip() == "# Solution", (
                f"cell {index}: a hidden cell's placeholder shows its first line, so it must be just "
                f"'# Solution', not {first_line!r}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_exercise_checks_the_learners_answer(path: Path) -> None:
    """Learner's cell, then a visible check cell (tag "check"), then the hidden solution.

    The committed check output says "not answered yet": the learner's cell is
    committed unanswered, and the check copes with that instead of raising or
    recomputing the answer itself.
    """
    nb = nbformat.read(path, as_version=4)
    previous_solution = -1
    for index, cell in enumerate(nb.cells):
        if "solution" not in _tags(cell) and not _hidden(cell).get("source_hidden"):
            continue
        between = nb.cells[previous_solution + 1:index]
        checks = [c for c in between if c.cell_type == "code" and "check" in _tags(c)]
        assert checks, f"cell {index}: the exercise solved here has no check cell (a code cell tagged 'check') before it"
        first_check = between.index(checks[0])
        assert any(c.cell_type == "code" and not _tags(c) for c in between[:first_check]), (
            f"cell {index}: the learner's own (untagged) code cell must come before its check cell"
        )
        for check in checks:
            assert not _hidden(check), f"cell {nb.cells.index(check)}: a check cell stays visible"
            printed = "".join(o.get("text", "") for o in check.outputs)
            assert "not answered yet" in printed, (
                f"cell {nb.cells.index(check)}: the committed check output should say 'not answered yet' "
                f"(the learner's cell is committed unanswered); it printed {printed[:200]!r}"
            )
        previous_solution = index


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_time_to_learn_follows_the_method(path: Path) -> None:
    """Stated minutes within [ceil(estimate), ceil(estimate) + 10] (CONTRIBUTING.md, tools/time_to_learn.py)."""
    m = time_to_learn.measure(nbformat.read(path, as_version=4))
    low, high = m["allowed"]
    assert m["stated"] is not None, "the Time to learn section must state 'NN minutes'"
    assert low <= m["stated"] <= high, (
        f"states {m['stated']} minutes; the method gives {m['estimate']} "
        f"({m['words']} words / 150 + {m['code_lines']} code lines / 15 + 5 x {m['exercises']} exercises), "
        f"so state between {low} and {high}"
    )


def test_the_overview_map_lists_every_notebook_with_its_stated_time() -> None:
    """00's "A map of the set" links each notebook once, in order, with the minutes it states."""
    nb = nbformat.read(ROOT / "notebooks" / "00_overview.ipynb", as_version=4)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    section = re.search(r"^## A map of the set\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section, "00_overview needs a '## A map of the set' section"
    rows = re.findall(r"^\|\s*\[[^\]]*\]\((\d\d_[a-z0-9_]+\.ipynb)\)\s*\|.*\|\s*(\d+)\s*\|\s*$", section.group(1), re.M)
    listed = {name: int(minutes) for name, minutes in rows}
    assert [name for name, _ in rows] == [p.name for p in NOTEBOOKS], (
        f"the map lists {[name for name, _ in rows]}, the folder holds {[p.name for p in NOTEBOOKS]}"
    )
    stated = {p.name: time_to_learn.stated_minutes(nbformat.read(p, as_version=4)) for p in NOTEBOOKS}
    wrong = {name: (listed[name], stated[name]) for name in listed if listed[name] != stated[name]}
    assert not wrong, f"map minutes differ from the notebooks' own (map, notebook): {wrong}"
