"""Reference tables: small tables copied whole to every shard, so joins with them stay local.

Citus calls them reference tables, ShardingSphere broadcast tables. Countries
are the example: every location's continent has countries, and a query that
joins locations with countries should not have to leave the location's shard::

    select(WeatherLocation.city, Country.name)
        .join(Country, Country.continent == WeatherLocation.continent)
        .where(WeatherLocation.continent == "Europe")     # runs on europe only, joined there

Which tables are reference tables is data (:data:`shardlib.models.REFERENCE_TABLES`).
shardlib then:

* **reads** a reference table alone on one shard (every copy is the same);
* **joins** it inside each shard: the co-location check
  (:func:`shardlib.gather.check_locality`) treats its rows as present
  everywhere, like a ``VALUES`` list;
* **writes** it on every shard: ``insert(Country)``, ``update(Country)``,
  ``delete(Country)`` executed through a sharded session without a pinned
  shard run on all shards, in the session's transaction. With
  ``twophase=True`` (PostgreSQL) the copies change atomically: all or none.
  Without it (SQLite), a write that fails on any shard before COMMIT rolls
  back everywhere, but the shards COMMIT one after another: a crash between
  two COMMITs leaves copies that differ. SQLite cannot promise more (it has
  no prepared transactions); :func:`check_copies` finds the difference and
  :func:`copy_from` rewrites every copy from one shard.

An ORM ``session.add(Country(...))`` is refused: an object is flushed to one
shard. Use ``await session.execute(insert(Country), rows)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.selectable import Alias, FromClause, TableClause

from .models import REFERENCE_TABLES
from .shards import SHARD_IDS

REFERENCE_TABLE_NAMES = frozenset(table.name for table in REFERENCE_TABLES)
"""Names of the tables copied to every shard."""

_BY_NAME = {table.name: table for table in REFERENCE_TABLES}


class ReferenceCopiesDiffer(RuntimeError):
    """The copies of a reference table are not the same on every shard."""


def _base(element: Any) -> Any:
    element = element._deannotate() if hasattr(element, "_deannotate") else element
    while isinstance(element, Alias):
        element = element.element
    return element


def reads_only_reference(element: Any) -> bool:
    """True if every table ``element`` reads is a reference table (and it reads at least one).

    >>> from shardlib.models import Country, WeatherLocation
    >>> reads_only_reference(Country.__table__), reads_only_reference(WeatherLocation.__table__)
    (True, False)
    """
    from sqlalchemy.sql import visitors

    found = False
    for e in visitors.iterate(element):
        if isinstance(e, FromClause):
            base = _base(e)
            if isinstance(base, TableClause):
                if base.name not in REFERENCE_TABLE_NAMES:
                    return False
                found = True
    base = _base(element)
    if isinstance(base, TableClause):
        return base.name in REFERENCE_TABLE_NAMES
    return found


def is_reference_write(orm_context: Any) -> bool:
    """An UPDATE or DELETE of a reference table (run on every shard when not pinned)."""
    if not (orm_context.is_update or orm_context.is_delete):
        return False
    table = _base(getattr(orm_context.statement, "table", None))
    return getattr(table, "name", None) in REFERENCE_TABLE_NAMES


async def _copies(engines: Mapping[str, AsyncEngine], table: Any) -> dict[str, set[tuple[Any, ...]]]:
    copies = {}
    for shard in SHARD_IDS:
        async with engines[shard].connect() as conn:
            copies[shard] = {tuple(r) for r in await conn.execute(select(table))}
    return copies


async def check_copies(engines: Mapping[str, AsyncEngine], table: str = "countries", *,
                       raise_if_different: bool = False) -> pd.DataFrame:
    """Every row of ``table`` that is not the same on all shards: one row per (row, shard missing it).

    Columns: the table's columns, ``missing on`` (the shards whose copy lacks
    exactly this row) and ``present on``. Empty when all copies agree. With
    ``raise_if_different=True``, raises :class:`ReferenceCopiesDiffer` instead.
    """
    if table not in _BY_NAME:
        raise ValueError(f"{table!r} is not a reference table; reference tables: {', '.join(map(repr, sorted(_BY_NAME)))}")
    reference = _BY_NAME[table]
    copies = await _copies(engines, reference)
    every = set().union(*copies.values())
    rows = []
    for row in sorted(every, key=repr):
        missing = [s for s in SHARD_IDS if row not in copies[s]]
        if missing:
            present = [s for s in SHARD_IDS if row in copies[s]]
            rows.append((*row, ", ".join(missing), ", ".join(present)))
    frame = pd.DataFrame(rows, columns=[*(c.name for c in reference.columns), "missing on", "present on"])
    if raise_if_different and len(frame):
        raise ReferenceCopiesDiffer(
            f"the copies of {table!r} differ: {len(frame)} row(s) are not on every shard, e.g. "
            f"{tuple(frame.iloc[0, :len(reference.columns)])!r} is missing on {frame.iloc[0]['missing on']}. "
            f"Rewrite every copy from a good one: await shardlib.reference.copy_from(engines, {table!r}, shard)"
        )
    return frame


async def copy_from(engines: Mapping[str, AsyncEngine], table: str, source: str) -> int:
    """Make every copy of ``table`` equal to ``source``'s (one transaction per shard); rows copied per shard."""
    if table not in _BY_NAME:
        raise ValueError(f"{table!r} is not a reference table; reference tables: {', '.join(map(repr, sorted(_BY_NAME)))}")
    if source not in SHARD_IDS:
        raise ValueError(f"unknown shard {source!r}; valid shards: {', '.join(map(repr, SHARD_IDS))}")
    reference = _BY_NAME[table]
    async with engines[source].connect() as conn:
        rows = [dict(r._mapping) for r in await conn.execute(select(reference))]
    for shard in SHARD_IDS:
        if shard == source:
            continue
        async with engines[shard].begin() as conn:
            await conn.execute(delete(reference))
            if rows:
                await conn.execute(insert(reference), rows)
    return len(rows)


__all__ = ["REFERENCE_TABLE_NAMES", "ReferenceCopiesDiffer", "check_copies", "copy_from", "is_reference_write",
           "reads_only_reference"]
