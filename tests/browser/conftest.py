"""Browser tests: JupyterLab in headless Chromium (``make test-browser``).

They are slow and need Chromium and Playwright, so ``make test`` (plain
``pytest tests``) must not run them. Every test marked ``browser`` is
*skipped*, with a reason saying how to run it, unless the run asked for them:

* ``pytest -m browser ...`` (what ``make test-browser`` does): the ``-m``
  expression names ``browser`` (and not as ``not browser``); or
* ``SHARDLIB_BROWSER=1`` in the environment, for ad-hoc runs such as
  ``SHARDLIB_BROWSER=1 pytest tests/browser -k 03_``.

Skipping (rather than deselecting) keeps them visible in ``make test``'s
summary. Nothing here imports Playwright at collection time, so ``pytest
tests`` works where it is not installed. When the browser tests *are*
asked for, a missing Playwright or Chromium is an error, not a skip: a green
run that drove no browser would prove nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab import ARTIFACTS, CHROMIUM, NOTEBOOKS, VIEWPORT, LabServer, launch_chromium

SKIP_REASON = "browser test: run `make test-browser` (pytest -m browser) or set SHARDLIB_BROWSER=1"


def browser_tests_requested(config: pytest.Config) -> bool:
    if os.environ.get("SHARDLIB_BROWSER", "").strip() == "1":
        return True
    markexpr = config.getoption("markexpr", default="") or ""
    return bool(re.search(r"\bbrowser\b", markexpr)) and not re.search(r"\bnot\s+browser\b", markexpr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if browser_tests_requested(config):
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if item.get_closest_marker("browser") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def chromium() -> Iterator[Any]:
    """Debian's Chromium, driven by Playwright (whose own browser download is not used)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright is not installed: pip install -e '.[browser]' (make test-browser does)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} not found: apt-get install -y chromium (or set SHARDLAB_CHROMIUM)")
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="session")
def browser_context(chromium: Any) -> Iterator[Any]:
    """One context for the session: pages share the HTTP cache, so JupyterLab loads fast after the first."""
    context = chromium.new_context(viewport=VIEWPORT)
    context.set_default_timeout(60_000)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    """``jupyter lab`` on the real notebooks folder, unable to change it."""
    checkpoints = NOTEBOOKS / ".ipynb_checkpoints"
    had_checkpoints = checkpoints.exists()
    with LabServer(NOTEBOOKS, tmp_path_factory.mktemp("lab"), ARTIFACTS / "browser" / "jupyter-lab.log") as server:
        yield server
    assert had_checkpoints or not checkpoints.exists(), f"JupyterLab wrote {checkpoints}"
