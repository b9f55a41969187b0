"""The project's own rules: dependency lists agree, notebooks are well-formed.

nbval silently skips cells that never ran and silently drops malformed
sanitize entries, so those mistakes are caught here instead.
"""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
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
    assert numbers == list(range(len(numbers))), numbers


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
