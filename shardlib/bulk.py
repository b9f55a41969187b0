"""The bulk path: many rows, no ORM objects, one executemany per shard batch.

The unit of work is built for object graphs: it tracks every object's state,
history and identity, which costs tens of microseconds per row. For loading
100,000 rows, skip it::

    rows = ({"continent": c, "city": name} for c, name in source)
    written = await shardlib.bulk_insert(engines, WeatherLocation, rows, progress=True)

What happens:

1. every row is validated and routed **before anything is written**: an
   unknown continent raises ``ValueError`` naming it, and no shard (nor the
   id counter) is touched;
2. ids for all the locations come from the global counter in **one**
   statement (``UPDATE id_counter ... RETURNING``), each naming its shard;
3. each shard receives its rows as ``executemany`` batches, inside one
   transaction per shard, all shards **concurrently**.

Reports go the same way (``bulk_insert(engines, Report, rows)``): each row
needs a ``location_id``, which names the shard; report ids stay shard-local.

Like every multi-shard write without two-phase commit, the shards commit
independently: if one shard fails, the others keep their rows (see notebook
08). Rows carry their ids, so a retry can skip what is already there.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from .engines import check_engines
from .ids import advance_counter
from .models import Report, WeatherLocation
from .shards import COUNTER_SHARD, SHARD_IDS, make_id, shard_for_continent, shard_for_id

DEFAULT_BATCH_SIZE = 10_000


def _route_locations(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    routed: dict[str, list[dict[str, Any]]] = {s: [] for s in SHARD_IDS}
    for number, row in enumerate(rows):
        try:
            continent, city = row["continent"], row["city"]
        except KeyError as missing:
            raise ValueError(f"row {number} {dict(row)!r} has no {missing.args[0]!r}; "
                             f"locations need 'continent' and 'city'") from None
        if row.get("id") is not None:
            raise ValueError(f"row {number} {dict(row)!r} has an id; bulk_insert allocates ids itself")
        routed[shard_for_continent(continent)].append({"continent": continent, "city": city})
    return routed


def _route_reports(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    routed: dict[str, list[dict[str, Any]]] = {s: [] for s in SHARD_IDS}
    now = datetime.datetime.now()
    for number, row in enumerate(rows):
        shard = shard_for_id(row.get("location_id"))
        if shard is None:
            raise ValueError(
                f"row {number} {dict(row)!r}: location_id {row.get('location_id')!r} names no shard; "
                f"use the id of a stored WeatherLocation"
            )
        if "temperature" not in row:
            raise ValueError(f"row {number} {dict(row)!r} has no 'temperature'")
        routed[shard].append(
            {"location_id": row["location_id"], "temperature": row["temperature"],
             "report_time": row.get("report_time") or now}
        )
    return routed


def _driver_statement(
    engine: AsyncEngine, table: Any, columns: list[str]
) -> tuple[str, list[str], list[Any]]:
    """The INSERT in the driver's SQL and paramstyle, its parameter order, and bind processors.

    Handing the driver plain tuples skips SQLAlchemy's per-row parameter
    handling (dict lookups, type processing for types that need none), which
    is most of the cost of a large executemany.
    """
    compiled = insert(table).values({c: None for c in columns}).compile(dialect=engine.dialect)
    order = list(compiled.positiontup or [])
    if sorted(order) != sorted(columns):
        raise NotImplementedError(f"{engine.dialect.name}: bulk_insert needs a positional paramstyle")
    processors = compiled._bind_processors
    return str(compiled), order, [processors.get(name) for name in order]


async def _write_shard(engine: AsyncEngine, table: Any, rows: list[dict[str, Any]],
                       batch_size: int, bar: Any) -> None:
    if not rows:
        return
    sql, columns, processors = _driver_statement(engine, table, list(rows[0]))
    async with engine.begin() as conn:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            if any(processors):
                tuples = [tuple(p(r[c]) if p else r[c] for c, p in zip(columns, processors)) for r in batch]
            else:
                tuples = [tuple(r[c] for c in columns) for r in batch]
            await conn.exec_driver_sql(sql, tuples)
            if bar is not None:
                bar.update(len(batch))


async def bulk_insert(
    engines: Mapping[str, AsyncEngine],
    model: type[WeatherLocation] | type[Report],
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
) -> int:
    """Insert ``rows`` (dicts, no ids) on their shards; return how many were written."""
    check_engines(engines)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if model is WeatherLocation:
        routed = _route_locations(rows)
    elif model is Report:
        routed = _route_reports(rows)
    else:
        raise ValueError(f"bulk_insert takes WeatherLocation or Report, not {model!r}")
    total = sum(len(r) for r in routed.values())
    if total == 0:
        return 0

    if model is WeatherLocation:  # one counter statement for every row
        async with engines[COUNTER_SHARD].begin() as conn:
            first = await conn.run_sync(advance_counter, total)
        number = first
        for shard in SHARD_IDS:
            for row in routed[shard]:
                row["id"] = make_id(number, shard)
                number += 1

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"bulk_insert {model.__tablename__}", unit="rows")
    try:
        await asyncio.gather(
            *(_write_shard(engines[s], model.__table__, routed[s], batch_size, bar) for s in SHARD_IDS)
        )
    finally:
        if bar is not None:
            bar.close()
    return total
