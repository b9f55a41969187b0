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
   their lookup entries (city, station: :mod:`shardlib.lookups`) are written
   and committed next, before any row (a station already in use stops the
   load here, before any shard is written);
3. each shard receives its rows as ``executemany`` batches of plain tuples,
   inside one transaction per shard; server shards are written
   **concurrently**, embedded SQLite shards one after another (see
   ``concurrent=`` below for why).

Reports go the same way (``bulk_insert(engines, Report, rows)``): each row
needs a ``location_id``, which names the shard; report ids stay shard-local.

Like every multi-shard write without two-phase commit, the shards commit
independently: if one shard fails, the others keep their rows (see notebook
08). Rows carry their ids, so a retry can skip what is already there.
"""

from __future__ import annotations

import asyncio
import datetime
import gc
from itertools import repeat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from .engines import check_engines
from . import lookups
from .ids import advance_counter
from .models import Report, WeatherLocation
from .shards import COUNTER_SHARD, SHARD_BITS, SHARD_IDS, make_id, shard_for_continent, shard_for_id

DEFAULT_BATCH_SIZE = 10_000


LOCATION_COLUMNS = ("id", "continent", "city", "station")
REPORT_COLUMNS = ("location_id", "temperature", "report_time")


def _check_mapping(number: int, row: Any, columns: Sequence[str]) -> None:
    if not isinstance(row, Mapping):
        raise ValueError(
            f"row {number} is a {type(row).__name__} ({row!r}); bulk_insert takes dicts with "
            f"the keys {', '.join(map(repr, columns))}, e.g. dict(zip({tuple(columns)!r}, row))"
        )


def _route_locations(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[str, list[Any], list[Any]]]]:
    """Validate and route every row first: per shard, ``(continent, [city, ...], [station, ...])``
    groups.

    Rows are grouped by continent (the shard follows from the continent), so the
    loop does one dict lookup and two appends per row; rows that are not plain dicts
    of exactly ``continent`` and ``city`` (a station, an id), or bring a continent
    not seen yet, take the slow path, which checks everything and names what is wrong.
    """
    groups: dict[Any, tuple[list[Any], list[Any]]] = {}
    for number, row in enumerate(rows):
        try:
            if type(row) is not dict or len(row) != 2:  # an id, a station, ...: the slow path
                raise LookupError
            cities, stations = groups[row["continent"]]  # KeyError: a new continent
            cities.append(row["city"])  # KeyError (no city): nothing appended yet
            stations.append(None)
        except (LookupError, TypeError):
            _route_location_slowly(number, row, groups)
    routed: dict[str, list[tuple[str, list[Any], list[Any]]]] = {s: [] for s in SHARD_IDS}
    for continent, (cities, stations) in groups.items():
        routed[shard_for_continent(continent)].append((continent, cities, stations))
    return routed


def _route_location_slowly(number: int, row: Any, groups: dict[Any, tuple[list[Any], list[Any]]]) -> None:
    _check_mapping(number, row, LOCATION_COLUMNS[1:3])
    try:
        continent, city = row["continent"], row["city"]
    except KeyError as missing:
        raise ValueError(f"row {number} {dict(row)!r} has no {missing.args[0]!r}; "
                         f"locations need 'continent' and 'city'") from None
    if row.get("id") is not None:
        raise ValueError(f"row {number} {dict(row)!r} has an id; bulk_insert allocates ids itself")
    try:
        found = groups.get(continent)
    except TypeError:  # unhashable: no continent at all
        found = None
    if found is None:
        shard_for_continent(continent)  # ValueError naming it and the valid ones
        found = groups[continent] = ([], [])
    found[0].append(city)
    found[1].append(row.get("station"))


def _route_reports(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[tuple[Any, ...]]]:
    """Validate and route every row first; ``(location_id, temperature, time)`` per shard."""
    routed: dict[str, list[tuple[Any, ...]]] = {s: [] for s in SHARD_IDS}
    now = datetime.datetime.now()
    for number, row in enumerate(rows):
        _check_mapping(number, row, REPORT_COLUMNS)
        shard = shard_for_id(row.get("location_id"))
        if shard is None:
            raise ValueError(
                f"row {number} {dict(row)!r}: location_id {row.get('location_id')!r} names no shard; "
                f"use the id of a stored WeatherLocation"
            )
        if "temperature" not in row:
            raise ValueError(f"row {number} {dict(row)!r} has no 'temperature'")
        routed[shard].append((row["location_id"], row["temperature"], row.get("report_time") or now))
    return routed


def _driver_statement(
    engine: AsyncEngine, table: Any, columns: Sequence[str]
) -> tuple[str, list[int], list[Any]]:
    """The INSERT in the driver's SQL and paramstyle, where each parameter comes
    from in our tuples, and each parameter's bind processor (or None).

    Handing the driver plain tuples skips SQLAlchemy's per-row parameter
    handling (dict lookups, type processing for types that need none), which
    is most of the cost of a large executemany.
    """
    compiled = insert(table).values({c: None for c in columns}).compile(dialect=engine.dialect)
    order = list(compiled.positiontup or [])
    if sorted(order) != sorted(columns):
        raise NotImplementedError(f"{engine.dialect.name}: bulk_insert needs a positional paramstyle")
    processors = compiled._bind_processors
    return str(compiled), [columns.index(name) for name in order], [processors.get(n) for n in order]


async def _write_shard(engine: AsyncEngine, table: Any, columns: Sequence[str],
                       rows: list[tuple[Any, ...]], batch_size: int, bar: Any) -> None:
    if not rows:
        return
    sql, positions, processors = _driver_statement(engine, table, columns)
    as_is = positions == list(range(len(columns))) and not any(processors)
    async with engine.begin() as conn:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            if not as_is:
                batch = [tuple(p(r[i]) if p else r[i] for i, p in zip(positions, processors)) for r in batch]
            await conn.exec_driver_sql(sql, batch)
            if bar is not None:
                bar.update(len(batch))


class BulkInsertError(RuntimeError):
    """A shard's write failed; it names the shard. Shards written before it stay written:
    each shard commits its own transaction (there is no cross-shard atomicity here)."""

    def __init__(self, shard: str, error: BaseException) -> None:
        self.shard, self.error = shard, error
        super().__init__(
            f"bulk_insert failed on shard {shard!r}: {type(error).__name__}: {error}. Each shard "
            f"commits on its own: shards written before {shard!r} keep their rows"
        )


async def bulk_insert(
    engines: Mapping[str, AsyncEngine],
    model: type[WeatherLocation] | type[Report],
    rows: Iterable[Mapping[str, Any]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = False,
    concurrent: bool | None = None,
) -> int:
    """Insert ``rows`` (dicts, no ids) on their shards; return how many were written.

    ``concurrent``: write the shards at the same time (default for database
    servers, whose time is mostly network round trips) or one after another
    (default for SQLite, whose "shards" all run inside this process: four
    driver threads binding parameters contend for one GIL, measured 2.5x
    slower than taking turns).
    """
    check_engines(engines)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    gc_was_enabled = gc.isenabled()
    gc.disable()  # every row tuple is tracked by the cyclic GC: its collections cost a third of the time
    try:
        return await _bulk_insert(engines, model, rows, batch_size, progress, concurrent)
    finally:
        if gc_was_enabled:
            gc.enable()


async def _bulk_insert(engines: Mapping[str, AsyncEngine], model: Any, rows: Iterable[Mapping[str, Any]],
                       batch_size: int, progress: bool, concurrent: bool | None) -> int:
    if model is WeatherLocation:
        routed = _route_locations(rows)
    elif model is Report:
        routed = _route_reports(rows)
    else:
        raise ValueError(f"bulk_insert takes WeatherLocation or Report, not {model!r}")
    total = sum(len(r) if model is Report else sum(len(g[1]) for g in r) for r in routed.values())
    if total == 0:
        return 0

    columns = REPORT_COLUMNS
    if model is WeatherLocation:  # one counter statement for every row
        columns = LOCATION_COLUMNS
        async with engines[COUNTER_SHARD].begin() as conn:
            number = await conn.run_sync(advance_counter, total)
        step = 1 << SHARD_BITS  # consecutive sequence numbers: ids 16 apart, same logical shard
        for shard in SHARD_IDS:  # ids name each row's continent (its logical shard)
            groups, rows_ = routed[shard], []
            for continent, cities, stations in groups:  # tuples made by zip (in C): (id, continent, city, station)
                first_id = make_id(number, continent)
                rows_.extend(zip(range(first_id, first_id + len(cities) * step, step), repeat(continent), cities,
                                 stations))
                number += len(cities)
            routed[shard] = rows_
        # lookup entries first, committed before any row (shardlib.lookups); a duplicate station stops here
        await lookups.bulk_created(engines, ((r[0], {"city": r[2], "station": r[3]})
                                             for shard in SHARD_IDS for r in routed[shard]))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"bulk_insert {model.__tablename__}", unit="rows")
    async def write(shard: str) -> None:
        try:
            await _write_shard(engines[shard], model.__table__, columns, routed[shard], batch_size, bar)
        except Exception as error:
            raise BulkInsertError(shard, error) from error

    try:
        if concurrent is None:  # servers: overlap the round trips; SQLite: share one CPU and GIL
            concurrent = any(engine.dialect.name != "sqlite" for engine in engines.values())
        if concurrent:  # the first failure cancels the other shards' writes (and rolls them back)
            async with asyncio.TaskGroup() as group:
                for shard in SHARD_IDS:
                    group.create_task(write(shard))
        else:  # one coroutine at a time: a failure leaves none un-awaited
            for shard in SHARD_IDS:
                await write(shard)
    except* BulkInsertError as failed:
        raise failed.exceptions[0] from None
    finally:
        if bar is not None:
            bar.close()
    return total
