"""Backfill: fill a new column's NULLs on every shard, in small batches.

The middle step of an expand/contract change (notebook 13). Once a nullable
column exists on every shard (expand) and every writer writes it, old rows
are filled by short transactions of ``batch_size`` rows each::

    UPDATE weather_reports SET unit = 'F'
    WHERE id IN (SELECT id FROM weather_reports WHERE unit IS NULL
                 ORDER BY id LIMIT 500)

Short batches keep each write lock short, so concurrent writers wait
milliseconds instead of the whole backfill (one UPDATE of a million rows
would hold SQLite's file lock, or PostgreSQL's row locks, until it ends).
Shards are independent databases, so they are filled concurrently.
A shard is done when a batch finds nothing left. Rows that a writer adds with
NULL *after* that are not filled: that is why writers must write the column
first, and why the contract step checks again before adding NOT NULL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy import column, select, table, update
from sqlalchemy.ext.asyncio import AsyncEngine

from .engines import check_engines
from .shards import SHARD_IDS


@dataclass(frozen=True)
class Batch:
    """One committed batch: on which shard, its number there, rows filled."""

    shard: str
    number: int
    rows: int


async def _fill_shard(engine: AsyncEngine, shard: str, statement: Any,
                      on_batch: Callable[[Batch], Any] | None) -> dict[str, Any]:
    rows = batches = 0
    started = time.perf_counter()
    while True:
        async with engine.begin() as conn:
            filled = (await conn.execute(statement)).rowcount
        if filled <= 0:
            break
        batches += 1
        rows += filled
        if on_batch is not None:
            on_batch(Batch(shard, batches, filled))
        await asyncio.sleep(0)  # let writers in between batches
    return {"shard": shard, "rows": rows, "batches": batches,
            "seconds": time.perf_counter() - started}


async def backfill(engines: Mapping[str, AsyncEngine], table_name: str, column_name: str,
                   value: Any, *, batch_size: int = 500, key: str = "id",
                   on_batch: Callable[[Batch], Any] | None = None) -> pd.DataFrame:
    """Set ``table_name.column_name = value`` where it is NULL, on every shard.

    ``value`` is a literal or any SQL expression (e.g. a ``case()`` on other
    columns). Batches of ``batch_size`` rows, chosen by ``key`` order, each
    in its own transaction; ``on_batch(Batch)`` is called after each commit.
    Returns one row per shard: ``rows`` filled, ``batches``, ``seconds``.
    """
    check_engines(engines)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    t = table(table_name, column(key), column(column_name))
    pending = (
        select(t.c[key]).where(t.c[column_name].is_(None)).order_by(t.c[key]).limit(batch_size)
    )
    statement = update(t).where(t.c[key].in_(pending.scalar_subquery())).values({column_name: value})
    results = await asyncio.gather(
        *(_fill_shard(engines[s], s, statement, on_batch) for s in SHARD_IDS)
    )
    return pd.DataFrame(results).set_index("shard")


__all__ = ["Batch", "backfill"]
