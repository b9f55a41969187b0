"""Simulated network latency, for benchmarks and notebooks about fan-out.

Four SQLite files on one disk answer in microseconds, so they hide what a
real deployment feels: every statement to every shard pays a round trip.
:func:`injected_latency` makes each shard sleep before every statement. The
sleep runs *in the database driver's worker thread* (SQLite: a user-defined
function; PostgreSQL: ``pg_sleep``), exactly where a slow network would
block, so the asyncio event loop stays free to talk to other shards.

    with injected_latency(engines, 0.050):
        await shardlib.gather(engines, stmt)   # ~50 ms: shards wait in parallel
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return 0


@contextmanager
def injected_latency(engines: Mapping[str, AsyncEngine], seconds: float) -> Iterator[None]:
    """Sleep ``seconds`` on the shard's own connection before every statement."""
    if seconds < 0:
        raise ValueError(f"latency must be >= 0 seconds, got {seconds!r}")

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        raw = conn.connection.dbapi_connection
        helper = raw.cursor()
        if conn.dialect.name == "sqlite":
            info = conn.connection.info  # lives as long as the driver connection
            if not info.get("shardlib_sleep"):
                raw.create_function("shardlib_sleep", 1, lambda s: _sleep(s))
                info["shardlib_sleep"] = True
            helper.execute("SELECT shardlib_sleep(?)", (seconds,))
        elif conn.dialect.name == "postgresql":
            helper.execute(f"SELECT pg_sleep({float(seconds)!r})")
        else:
            raise NotImplementedError(f"no latency injection for {conn.dialect.name}")
        helper.close()

    for engine in engines.values():
        event.listen(engine.sync_engine, "before_cursor_execute", before)
    try:
        yield
    finally:
        for engine in engines.values():
            event.remove(engine.sync_engine, "before_cursor_execute", before)
