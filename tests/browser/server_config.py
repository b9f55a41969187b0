"""Jupyter server configuration for the browser tests (loaded with ``--config``).

The browser tests open the real ``notebooks/`` folder, so the server must not
be able to change it: every contents write (save, rename, delete, new file,
restore checkpoint) is refused with 403. Files are still reported as
writable, so the page looks exactly as it does for a learner (no "read-only"
badge); it is the autosave setting that keeps JupyterLab from saving, and a
save that slipped through would fail loudly here instead of overwriting the
committed outputs. Checkpoints, the one thing JupyterLab writes when it opens
a notebook, go to a temporary folder given on the command line
(``--FileCheckpoints.checkpoint_dir``).

Not named ``jupyter_server_config.py`` on purpose: Jupyter looks for files of
that name on its own, and this one must apply only where ``--config`` names it.
"""

from __future__ import annotations

from typing import Any

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado import web


def _refuse(what: str, path: str) -> web.HTTPError:
    return web.HTTPError(403, f"shardlab browser tests: {what} {path!r} refused (read-only notebooks)")


class ReadOnlyContentsManager(AsyncLargeFileManager):
    """Serves files as usual but refuses to change any of them."""

    async def save(self, model: dict[str, Any], path: str = "") -> dict[str, Any]:
        raise _refuse("save", path)

    async def delete_file(self, path: str) -> None:
        raise _refuse("delete", path)

    async def rename_file(self, old_path: str, new_path: str) -> None:
        raise _refuse("rename", old_path)

    async def restore_checkpoint(self, checkpoint_id: str, path: str) -> None:
        raise _refuse("restore checkpoint of", path)


c = get_config()  # noqa: F821 (provided by traitlets when it loads this file)
c.ServerApp.contents_manager_class = ReadOnlyContentsManager
