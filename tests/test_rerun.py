"""Every notebook survives each code cell being run twice in a row (issue 12).

A learner re-runs the cell they just edited. ``tools/rerun_notebooks.py``
executes a notebook top to bottom in one fresh kernel, each code cell twice
before the next; any error fails, naming the cell index and the error.

Cost: this doubles notebook execution (strict nbval of the set takes ~50 s),
so the notebooks run in subprocesses, two at a time (the machine has two
cores), started once for all the notebooks this pytest run selected. Each
notebook uses its own SQLite folder, so parallel runs cannot interfere. Under
``make test-pg`` (``SHARDLIB_URLS`` set) they run on those servers, one at a
time, since they share the databases.
Skip with ``-m "not rerun"``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
TOOL = ROOT / "tools" / "rerun_notebooks.py"
# With SHARDLIB_URLS set (make test-pg) the notebooks run on those servers, which
# they all share: one at a time. On SQLite each has its own folder: two at a time.
ON_SERVERS = bool(os.environ.get("SHARDLIB_URLS"))
WORKERS = 1 if ON_SERVERS else 2

pytestmark = pytest.mark.rerun


def _rerun_in_subprocess(path: Path) -> dict[str, object]:
    flags = ["--json", "--servers"] if ON_SERVERS else ["--json"]
    done = subprocess.run([sys.executable, str(TOOL), *flags, str(path)], capture_output=True, text=True,
                          cwd=ROOT, timeout=1200)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"notebook": path.name, "error": f"the runner crashed (exit {done.returncode}):\n{done.stderr[-3000:]}",
                "seconds": None}
    return json.loads(lines[-1])


@pytest.fixture(scope="session")
def reruns(request: pytest.FixtureRequest):
    """One future per selected notebook, all submitted at once to a pool of two workers."""
    selected = [item.callspec.params["path"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_every_cell_survives_running_twice"]
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        futures: dict[Path, Future] = {path: pool.submit(_rerun_in_subprocess, path) for path in selected}
        yield futures


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_cell_survives_running_twice(path: Path, reruns: dict[Path, Future]) -> None:
    result = reruns[path].result()
    assert result["error"] is None, result["error"]
