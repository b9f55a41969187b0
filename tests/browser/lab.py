"""Drive a real JupyterLab in headless Chromium, the way a learner would.

Two pieces, used by the browser tests' fixtures and tests:

``LabServer``
    ``python -m jupyter lab`` (as ``make lab`` runs it) on a free loopback
    port with a known token, isolated from ``~/.jupyter`` and made unable to
    change the notebooks it serves (see ``server_config.py``,
    ``LAB_SETTINGS`` and ``LabServer.start``).

``LabPage``
    Opens notebooks one after another in a JupyterLab page, clears each
    one's outputs, runs Kernel -> "Restart Kernel and Run All Cells..." from
    the menu bar, waits for the run to finish and reports what the page shows
    (``NotebookRun``), then closes the tab without saving.

JupyterLab 4 keeps its application object private unless started with
``--LabApp.expose_app_in_browser``; the server turns that on so the tests can
*read* the notebook model (execution counts, output types, kernel status)
instead of guessing from prompts. Everything the test *does* goes through the
visible UI: menu bar, dialog buttons.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
NOTEBOOKS = ROOT / "notebooks"
ARTIFACTS = ROOT / "artifacts"
SCREENSHOTS = ARTIFACTS / "screenshots"
CHROMIUM = os.environ.get("SHARDLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
VIEWPORT = {"width": 1400, "height": 900}
MAX_SCREENSHOT_HEIGHT = 60_000  # px; the longest notebook is about 20,000 px tall

# User settings, written to a fresh user_settings_dir for each server.
LAB_SETTINGS: dict[str, dict[str, Any]] = {
    # Never write the notebooks: no autosave (the server refuses writes anyway).
    "@jupyterlab/docmanager-extension:plugin": {"autosave": False},
    # Render every cell (JupyterLab 4.1+ attaches only visible cells by
    # default), so the DOM holds the whole notebook and the screenshot shows it.
    # No blank "scroll past the last cell" space, which grows with the viewport
    # and would make the full-height screenshot chase its own tail.
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none", "scrollPastEnd": False},
    # Nothing that reaches for the internet, nothing that pops up over the page.
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/extensionmanager-extension:plugin": {"enabled": False},
}

# Environment variables that would point JupyterLab, the kernel or the
# notebooks somewhere other than a learner's fresh checkout.
SCRUBBED_ENV = (
    "JUPYTER_PATH", "JUPYTER_CONFIG_PATH", "JUPYTERLAB_DIR", "JUPYTERLAB_SETTINGS_DIR",
    "JUPYTERLAB_WORKSPACES_DIR", "JUPYTER_TOKEN", "JUPYTER_PREFER_ENV_PATH", "MPLBACKEND",
    "SHARDLIB_URLS", "SHARDLIB_ORACLE_URL", "SHARDLIB_DATA_DIR",
)


def notebook_names() -> list[str]:
    return sorted(p.name for p in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabServer:
    """``jupyter lab`` serving ``root_dir``; state lives under ``work_dir``."""

    def __init__(self, root_dir: Path, work_dir: Path, log_path: Path) -> None:
        self.root_dir = root_dir
        self.work_dir = work_dir
        self.log_path = log_path
        self.token = secrets.token_hex(16)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, **query: str) -> str:
        params = "&".join([f"token={self.token}"] + [f"{k}={v}" if v else k for k, v in query.items()])
        return f"{self.base}/{path.lstrip('/')}?{params}"

    # -- lifecycle -------------------------------------------------------
    def _prepare(self) -> dict[str, str]:
        dirs = {name: self.work_dir / name for name in ("config", "data", "runtime", "ipython", "settings", "workspaces", "checkpoints")}
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for plugin, values in LAB_SETTINGS.items():
            package, name = plugin.split(":")
            target = dirs["settings"] / package / f"{name}.jupyterlab-settings"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(values))
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(
            JUPYTER_CONFIG_DIR=str(dirs["config"]),
            JUPYTER_DATA_DIR=str(dirs["data"]),
            JUPYTER_RUNTIME_DIR=str(dirs["runtime"]),
            IPYTHONDIR=str(dirs["ipython"]),
            JUPYTER_PLATFORM_DIRS="1",
            PYTHONUNBUFFERED="1",
        )
        return env

    def _command(self) -> list[str]:
        w = self.work_dir
        return [
            sys.executable, "-m", "jupyter", "lab",
            "--no-browser",
            "--allow-root",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",  # never drift to a port we did not choose
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root_dir}",
            f"--config={HERE / 'server_config.py'}",
            f"--FileCheckpoints.checkpoint_dir={w / 'checkpoints'}",
            f"--LabApp.user_settings_dir={w / 'settings'}",
            f"--LabApp.workspaces_dir={w / 'workspaces'}",
            "--LabApp.expose_app_in_browser=True",
            "--LabApp.news_url=",
            "--ServerApp.terminals_enabled=False",
        ]

    def start(self, timeout: float = 90.0) -> None:
        env = self._prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for attempt in range(3):  # the free port can be taken between probe and bind
            self.port = _free_port()
            log = open(self.log_path, "ab" if attempt else "wb")  # noqa: SIM115 (the child keeps it)
            self.proc = subprocess.Popen(
                self._command(), cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    last_error = f"jupyter lab exited with {self.proc.returncode}"
                    break
                try:
                    status = self.api("GET", "api/status", timeout=2)
                    if "started" in status:
                        return
                except (OSError, ValueError):
                    pass
                time.sleep(0.25)
            else:
                last_error = f"jupyter lab did not answer on port {self.port} within {timeout:.0f}s"
            self.stop()
        raise RuntimeError(f"{last_error}; see {self.log_path}:\n{self.log_tail()}")

    def __enter__(self) -> "LabServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGTERM makes the server shut its kernels down cleanly. The server
        # runs in its own session (start_new_session), so only it gets the signal.
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- REST ------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, timeout: float = 10) -> Any:
        headers = {"Authorization": f"token {self.token}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(f"{self.base}/{path}", data=data, method=method, headers=headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            answer = response.read()
        return json.loads(answer) if answer else None

    def shutdown_kernels_for(self, name: str) -> None:
        for session in self.api("GET", "api/sessions"):
            if session.get("path") == name:
                try:
                    self.api("DELETE", f"api/sessions/{session['id']}", timeout=30)
                except urllib.error.HTTPError:
                    pass


def launch_chromium(playwright: Any) -> Any:
    # launch() always uses a fresh temporary profile (user data dir) of its own.
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


# --- what the page shows -----------------------------------------------------

_PANEL_JS = """
(name) => {
  const app = window.jupyterapp;
  if (!app) return null;
  for (const w of app.shell.widgets('main')) {
    if (w.context && w.context.path === name && w.content && w.content.widgets) return w;
  }
  return null;
}
"""

READY_JS = f"""
(name) => {{
  const w = ({_PANEL_JS})(name);
  if (!w || !w.context.isReady || !w.isVisible) return false;
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return !!kernel && kernel.status === 'idle' && w.content.widgets.length > 0;
}}
"""

CLEARED_JS = f"""
(name) => {{
  const w = ({_PANEL_JS})(name);
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  return code.every(c => c.model.executionCount === null && c.model.outputs.length === 0)
    && w.node.querySelectorAll('.jp-OutputArea-output').length === 0;
}}
"""

# Done when the kernel is idle, no cell is queued or running, and either every
# code cell has an execution count (all ran) or one of them failed (Run All
# stops there and un-queues the rest). Outputs were cleared before the run, so
# a count can only come from this run.
FINISHED_JS = f"""
(name) => {{
  const w = ({_PANEL_JS})(name);
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  if (kernel && kernel.status === 'dead') return true;  // reported as a failure
  if (!kernel || kernel.status !== 'idle') return false;
  const code = w.content.widgets.filter(c => c.model.type === 'code');
  if (code.some(c => c.model.executionState === 'running')) return false;
  if ([...w.node.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('[*]'))) return false;
  const failed = code.some(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
  return failed || code.every(c => c.model.executionCount !== null);
}}
"""

# Indices of the cells whose input shows the collapsed placeholder.
COLLAPSED_JS = f"""
(name) => ({_PANEL_JS})(name).content.widgets
  .map((cell, index) => cell.node.querySelector('.jp-InputPlaceholder') ? index : -1)
  .filter(index => index >= 0)
"""

MERMAID_SETTLED_JS = """
(expected) => document.querySelectorAll(
  '.jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMermaid img, .jp-NotebookPanel:not(.lm-mod-hidden) .jp-RenderedMermaid.jp-mod-warning'
).length >= expected
"""

PROGRESS_JS = f"""
(name) => {{
  const w = ({_PANEL_JS})(name);
  const kernel = w && w.sessionContext.session && w.sessionContext.session.kernel;
  const code = w ? w.content.widgets.filter(c => c.model.type === 'code') : [];
  return {{
    kernel: kernel ? kernel.status : null,
    ran: code.filter(c => c.model.executionCount !== null).length,
    running: code.filter(c => c.model.executionState === 'running').length,
    code: code.length,
  }};
}}
"""

# Everything the assertions need, read in one go once the run has finished.
REPORT_JS = f"""
(name) => {{
  const w = ({_PANEL_JS})(name);
  const cells = w.content.widgets;
  const strip = s => s.replace(/\\u001b\\[[0-9;]*[A-Za-z]/g, '');
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  const report = {{
    kernel: kernel ? kernel.status : null,
    dom_cells: w.content.node.querySelectorAll(':scope .jp-Cell').length,
    model_cells: cells.length,
    cells: [],
  }};
  cells.forEach((cell, index) => {{
    const node = cell.node;
    const entry = {{
      index, type: cell.model.type,
      input_hidden: !!cell.inputHidden,
      placeholder: !!node.querySelector('.jp-InputPlaceholder'),
      editor_visible: !!(node.querySelector('.jp-InputArea-editor') &&
                         node.querySelector('.jp-InputArea-editor').offsetParent !== null),
    }};
    if (cell.model.type === 'code') {{
      entry.execution_count = cell.model.executionCount;
      entry.errors = cell.model.outputs.toJSON().filter(o => o.output_type === 'error').map(o => ({{
        ename: o.ename, evalue: o.evalue, traceback: strip((o.traceback || []).join('\\n')).slice(-3000),
      }}));
      // stderr streams from the model: the DOM renders error outputs with the same mime type.
      entry.stderr = cell.model.outputs.toJSON()
        .filter(o => o.output_type === 'stream' && o.name === 'stderr')
        .map(o => strip(Array.isArray(o.text) ? o.text.join('') : o.text).slice(0, 2000));
      const outs = [...node.querySelectorAll('.jp-OutputArea-output')];
      entry.html_tables = outs.filter(o => o.dataset.mimeType === 'text/html' && o.querySelector('table')).length;
      // ipywidgets (tqdm's progress bar) render through the widget manager, with no mime-type attribute.
      entry.widgets = outs.filter(o => o.querySelector(':scope > .jupyter-widgets')).length;
      entry.images = outs.filter(o => o.dataset.mimeType === 'image/png').map(o => {{
        const img = o.querySelector('img');
        return !!img && img.complete && img.naturalWidth > 0;
      }});
    }} else if (cell.model.type === 'markdown') {{
      entry.mermaid = [...node.querySelectorAll('.jp-RenderedMermaid')].map(m => {{
        const img = m.querySelector('img');
        return {{
          warning: m.classList.contains('jp-mod-warning'),
          svg: !!img && (img.getAttribute('src') || '').startsWith('data:image/svg+xml'),
          loaded: !!img && img.complete && img.naturalWidth > 0,
        }};
      }});
    }}
    report.cells.push(entry);
  }});
  return report;
}}
"""


# What a learner can see of each solution cell (tag "solution" or a hidden input):
# the text the browser actually renders (innerText skips hidden elements), whether
# an output is laid out on the page, and, from the model, what is there to hide.
SOLUTIONS_JS = f"""
(name) => ({_PANEL_JS})(name).content.widgets.map((cell, index) => {{
  const tags = cell.model.getMetadata('tags') || [];
  if (!(cell.inputHidden || tags.includes('solution'))) return null;
  const node = cell.node;
  const outputs = cell.model.type === 'code' ? cell.model.outputs.toJSON() : [];
  const text = o => {{
    const t = o.text || (o.data && o.data['text/plain']) || '';
    return Array.isArray(t) ? t.join('') : t;
  }};
  return {{
    index,
    input_hidden: !!cell.inputHidden,
    output_hidden: !!cell.outputHidden,
    input_placeholder: !!node.querySelector('.jp-InputPlaceholder'),
    output_placeholder: !!node.querySelector('.jp-OutputPlaceholder'),
    editor_visible: !!(node.querySelector('.jp-InputArea-editor') &&
                       node.querySelector('.jp-InputArea-editor').offsetParent !== null),
    visible_outputs: [...node.querySelectorAll('.jp-OutputArea-output')].filter(o => o.offsetParent !== null).length,
    visible_text: node.innerText,
    source: cell.model.sharedModel.getSource(),
    output_text: outputs.map(text).join('\\n'),
  }};
}}).filter(entry => entry !== null)
"""


@dataclass
class Expected:
    """What the committed .ipynb says the page should show after a run."""

    code_cells: int
    hidden_inputs: list[int]
    solutions: list[int]  # cells tagged "solution" or with a hidden input
    mermaid: dict[int, int]  # markdown cell index -> number of ```mermaid fences
    html_tables: int
    images: int
    widgets: int
    calls_show_shards: bool

    @classmethod
    def from_file(cls, path: Path) -> Expected:
        nb = json.loads(path.read_text())
        cells = nb["cells"]

        def source(cell: dict[str, Any]) -> str:
            s = cell.get("source", "")
            return "".join(s) if isinstance(s, list) else s

        outputs = [o for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])]

        def html(o: dict[str, Any]) -> str:
            d = o.get("data", {}).get("text/html", "")
            return "".join(d) if isinstance(d, list) else d

        return cls(
            code_cells=sum(c["cell_type"] == "code" for c in cells),
            hidden_inputs=[i for i, c in enumerate(cells) if c.get("metadata", {}).get("jupyter", {}).get("source_hidden")],
            solutions=[i for i, c in enumerate(cells)
                       if "solution" in c.get("metadata", {}).get("tags", [])
                       or c.get("metadata", {}).get("jupyter", {}).get("source_hidden")],
            mermaid={
                i: len(re.findall(r"^\s*```mermaid\s*$", source(c), re.M))
                for i, c in enumerate(cells)
                if c["cell_type"] == "markdown" and "```mermaid" in source(c)
            },
            html_tables=sum("<table" in html(o) for o in outputs),
            images=sum("image/png" in o.get("data", {}) for o in outputs),
            widgets=sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs),
            calls_show_shards=any("show_shards(" in source(c) for c in cells if c["cell_type"] == "code"),
        )


@dataclass
class NotebookRun:
    name: str
    report: dict[str, Any]
    seconds: float
    contents_writes: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def code(self) -> list[dict[str, Any]]:
        return [c for c in self.report["cells"] if c["type"] == "code"]

    def errors(self) -> list[str]:
        found = [] if self.report["kernel"] == "idle" else [f"kernel ended {self.report['kernel']!r}, not idle"]
        found += [
            f"cell {c['index']} (prompt [{c['execution_count']}]): {e['ename']}: {e['evalue']}\n{e['traceback']}"
            for c in self.code for e in c["errors"]
        ]
        # An exception printed rather than raised (say, by a task the cell
        # started) shows up as a traceback on stderr. Plain warnings do not.
        found += [
            f"cell {c['index']}: traceback on stderr:\n{text}"
            for c in self.code for text in c["stderr"] if "Traceback (most recent call last)" in text
        ]
        return found


def _menu(page: Any, menu: str, item: str) -> None:
    page.locator(".lm-MenuBar-item", has_text=re.compile(rf"^{re.escape(menu)}$")).click()
    entry = page.locator(".lm-Menu .lm-Menu-item:not(.lm-mod-hidden)", has_text=item)
    entry.wait_for(state="visible")
    entry.click()


def _wait(page: Any, js: str, name: str, timeout_s: float, what: str) -> None:
    try:
        page.wait_for_function(js, arg=name, timeout=timeout_s * 1000, polling=250)
    except Exception as error:  # playwright's TimeoutError
        progress = page.evaluate(PROGRESS_JS, name)
        dialogs = page.locator(".jp-Dialog").all_inner_texts()
        raise AssertionError(
            f"{name}: timed out after {timeout_s:.0f}s waiting for {what}; state {progress}"
            + (f"; dialog open: {dialogs}" if dialogs else "")
        ) from error


def expand_and_screenshot(page: Any, path: Path) -> None:
    """Grow the viewport until the notebook needs no scrolling, then take a full-page shot.

    The notebook scrolls inside its own panel (``.jp-WindowedPanel-outer``),
    so ``full_page=True`` alone would only capture one screen of it.
    """
    # Close the file browser: the notebook gets the full width.
    current_left = page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
    if current_left.count():
        current_left.first.click()
    outer = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-WindowedPanel-outer"
    for _ in range(5):
        scroll, client = page.eval_on_selector(outer, "e => [e.scrollHeight, e.clientHeight]")
        if scroll <= client:
            break
        height = min(page.viewport_size["height"] + (scroll - client) + 8, MAX_SCREENSHOT_HEIGHT)
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.wait_for_timeout(300)  # let lumino lay the panels out again
        if height == MAX_SCREENSHOT_HEIGHT:
            break
    page.eval_on_selector(outer, "e => { e.scrollTop = 0; }")
    page.wait_for_timeout(200)
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


class LabPage:
    """One JupyterLab page on ``server``, in which notebooks are opened one after another.

    The page loads JupyterLab once (``/lab?reset``, a blank workspace), then
    each notebook is opened and closed from the menus, as a learner moving
    through the set would: File -> Open from Path..., Edit -> Clear Outputs
    of All Cells, Kernel -> Restart Kernel and Run All Cells..., File ->
    Close Tab -> Discard. Booting JupyterLab is the slowest step, so this
    saves most of the time a fresh page per notebook would cost. If anything
    goes wrong the page is thrown away, and the next notebook starts on a
    freshly loaded one, so one failure cannot leak into the next test.
    """

    def __init__(self, context: Any, server: LabServer) -> None:
        self.context = context
        self.server = server
        self.page: Any = None
        self.writes: list[str] = []
        self.page_errors: list[str] = []

    def _on_request(self, request: Any) -> None:
        # Any write to the contents API (save, rename, delete...) is a failure;
        # creating a checkpoint is the one allowed POST (it goes to a temp dir).
        if "/api/contents" in request.url and request.method != "GET":
            if not (request.method == "POST" and re.search(r"/checkpoints(\?|$)", request.url)):
                self.writes.append(f"{request.method} {request.url}")

    def _open_lab(self) -> Any:
        if self.page is not None and not self.page.is_closed():
            return self.page
        page = self.context.new_page()
        page.set_viewport_size(VIEWPORT)
        page.on("request", self._on_request)
        page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        page.goto(self.server.url("lab", reset=""), wait_until="domcontentloaded")
        page.wait_for_function("() => !!window.jupyterapp", timeout=120_000, polling=250)
        page.evaluate("() => window.jupyterapp.restored.then(() => true)")
        page.locator(".lm-MenuBar-item", has_text="File").wait_for(state="visible")
        self.page = page
        return page

    def close(self) -> None:
        page, self.page = self.page, None
        if page is not None and not page.is_closed():
            page.close()  # run_before_unload=False: no "leave page?" prompt, nothing saved

    def _expand_solutions(self, page: Any, name: str, solutions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Do what a learner does to see a solution: click its collapsed input and output; report again."""
        cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
        for entry in solutions:
            cell = cells.nth(entry["index"])
            for placeholder in (".jp-InputPlaceholder", ".jp-OutputPlaceholder"):
                target = cell.locator(placeholder)
                if target.count():
                    target.first.click()
        page.wait_for_timeout(300)
        return page.evaluate(SOLUTIONS_JS, name)

    def run(self, name: str, *, run_timeout_s: float = 240, screenshot: Path | None = None) -> NotebookRun:
        """Open ``name``, clear it, restart-and-run-all from the menu, report what shows."""
        if screenshot is not None:
            screenshot.with_name(screenshot.stem + ".FAILED.png").unlink(missing_ok=True)
        started = time.monotonic()
        phases: dict[str, float] = {}

        def phase(label: str) -> None:
            phases[label] = round(time.monotonic() - started - sum(phases.values()), 2)

        page = self._open_lab()
        phase("lab")
        self.writes, self.page_errors = [], []
        ok = False
        try:
            page.set_viewport_size(VIEWPORT)
            _menu(page, "File", "Open from Path")
            dialog = page.locator(".jp-Dialog")
            dialog.locator("input").fill(name)
            dialog.locator("button.jp-mod-accept").click()
            dialog.wait_for(state="detached")
            _wait(page, READY_JS, name, 120, "the notebook to open with an idle kernel")
            collapsed_on_open = page.evaluate(COLLAPSED_JS, name)
            solutions_on_open = page.evaluate(SOLUTIONS_JS, name)  # the saved outputs, as opened
            phase("open")
            # Start from a blank page so that every output below comes from this run.
            _menu(page, "Edit", "Clear Outputs of All Cells")
            _wait(page, CLEARED_JS, name, 30, "outputs to clear")
            phase("clear")
            _menu(page, "Kernel", "Restart Kernel and Run All Cells")
            dialog.wait_for(state="visible")
            assert "Restart" in dialog.inner_text(), dialog.inner_text()
            dialog.locator("button.jp-mod-accept", has_text="Restart").click()
            dialog.wait_for(state="detached")
            _wait(page, FINISHED_JS, name, run_timeout_s, "Run All to finish")
            phase("run")
            page.wait_for_timeout(250)
            _wait(page, FINISHED_JS, name, 30, "Run All to stay finished")  # no late stragglers
            # Diagrams render and images decode asynchronously: give them a moment
            # (a shortfall is left for the tests to report, with details).
            mermaid_blocks = sum(Expected.from_file(self.server.root_dir / name).mermaid.values())
            for js, arg in ((MERMAID_SETTLED_JS, mermaid_blocks), ("() => [...document.images].every(i => i.complete)", None)):
                try:
                    page.wait_for_function(js, arg=arg, timeout=30_000, polling=250)
                except Exception:  # noqa: BLE001 (playwright's TimeoutError)
                    pass
            report = page.evaluate(REPORT_JS, name)
            report["collapsed_on_open"] = collapsed_on_open
            report["solutions_on_open"] = solutions_on_open
            report["solutions"] = page.evaluate(SOLUTIONS_JS, name)
            phase("settle")
            if screenshot is not None:
                expand_and_screenshot(page, screenshot)
                page.set_viewport_size(VIEWPORT)
                phase("screenshot")
            report["solutions_expanded"] = self._expand_solutions(page, name, report["solutions"])
            phase("expand")
            # Close without saving: the tab is dirty, so JupyterLab asks.
            _menu(page, "File", "Close Tab")
            try:
                dialog.wait_for(state="visible", timeout=5_000)
            except Exception:  # noqa: BLE001 (not dirty after all: no question asked)
                pass
            else:
                assert "Save your work" in dialog.inner_text(), dialog.inner_text()
                dialog.locator("button", has_text="Discard").click()
                dialog.wait_for(state="detached")
            page.wait_for_function(f"(name) => !({_PANEL_JS})(name)", arg=name, timeout=30_000, polling=250)
            ok = True
            return NotebookRun(name, report, time.monotonic() - started, list(self.writes),
                               list(self.page_errors), screenshot, phases)
        except Exception:
            if screenshot is not None:
                try:
                    failed = screenshot.with_name(screenshot.stem + ".FAILED.png")
                    failed.parent.mkdir(parents=True, exist_ok=True)
                    page.screenshot(path=str(failed), full_page=True)
                except Exception:  # noqa: BLE001 (best effort, keep the real error)
                    pass
            raise
        finally:
            if not ok:
                self.close()
            self.server.shutdown_kernels_for(name)
            phase("close")
