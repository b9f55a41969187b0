"""The bulk path: many rows, no ORM objects, one statement per shard batch.

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
   statement (``UPDATE id_counter ... RETURNING``): each continent's rows
   take consecutive numbers, so their ids (which name the continent's
   logical shard in their low bits) are ``first, first + 16, ...``; the
   rows' lookup entries (city, station: :mod:`shardlib.lookups`, once
   enabled) are written and committed next, before any row (a station
   already in use stops the load here, before any shard is written);
3. each shard receives, per continent and per ``batch_size`` rows, **one**
   ``INSERT ... SELECT`` whose parameters are whole columns: the cities as
   one JSON array read by ``json_each`` on SQLite, as one array read by
   ``unnest`` on PostgreSQL (:class:`ContinentRun`). The database makes the
   rows; Python neither builds a tuple nor binds parameters per row (about
   1.5 times as fast as ``executemany`` of prepared tuples on SQLite, 2.2
   times on PostgreSQL). All of a shard's batches share one transaction;
   the shards are written **concurrently** (on SQLite only when every batch
   is such a statement: see ``concurrent=`` below for why).

Reports go as ``executemany`` of tuples (``bulk_insert(engines, Report,
rows)``): each row needs a ``location_id``, which names the shard; report
ids stay shard-local.

Like every multi-shard write without two-phase commit, the shards commit
independently: if one shard fails, the others keep their rows (see notebook
08). Rows carry their ids, so a retry can skip what is already there.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import gc
import json
from itertools import repeat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from sqlalchemy import String, bindparam, func, insert, select
from sqlalchemy.dialects import postgresql
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


class Tuples:
    """Rows for ``executemany``: the columns the INSERT names and one tuple per row."""

    def __init__(self, columns: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        self.columns, self.rows = columns, rows

    def __len__(self) -> int:
        return len(self.rows)

    def column_statement(self, dialect: Any, table: Any) -> None:
        return None  # one tuple per row, always

    def statements(self, dialect: Any, table: Any, batch_size: int) -> Iterator[tuple[str, Any, int]]:
        """``(driver SQL, parameters, rows)`` per ``executemany`` of at most ``batch_size`` rows."""
        sql, positions, processors = _driver_statement(dialect, table, self.columns)
        as_is = positions == list(range(len(self.columns))) and not any(processors)
        for start in range(0, len(self.rows), batch_size):
            batch = self.rows if start == 0 and len(self.rows) <= batch_size else self.rows[start : start + batch_size]
            if not as_is:
                batch = [tuple(p(r[i]) if p else r[i] for i, p in zip(positions, processors)) for r in batch]
            yield sql, batch, len(batch)


class ContinentRun:
    """One continent's new locations: ids ``first_id``, ``first_id + 16``, ... (consecutive
    sequence numbers, the continent's logical shard in the low bits), one city each and,
    if any row has one, a station each.

    Written as one ``INSERT ... SELECT`` per batch that receives the whole city column as
    **one** parameter (SQLite: a JSON text read by ``json_each``, built in since 3.38;
    PostgreSQL: an array read by ``unnest``): the database makes the rows itself, so
    nothing is done per row in Python, neither building a tuple nor binding three
    parameters (raw ``sqlite3`` measured about twice as fast this way as with
    ``executemany`` of prepared tuples). Values that cannot travel exactly (anything but
    ``str``; on SQLite text with a NUL character, which ``json_each`` cuts off) go as tuples.
    """

    STEP = 1 << SHARD_BITS

    def __init__(self, continent: str, first_id: int, cities: list[Any], stations: list[Any] | None) -> None:
        self.continent, self.first_id, self.cities, self.stations = continent, first_id, cities, stations

    def __len__(self) -> int:
        return len(self.cities)

    def ids(self) -> range:
        return range(self.first_id, self.first_id + len(self.cities) * self.STEP, self.STEP)

    def as_tuples(self, start: int = 0, stop: int | None = None) -> Tuples:
        """Rows ``start`` to ``stop`` as ``(id, continent, city[, station])`` tuples, made by ``zip`` in C."""
        ids, cities = self.ids()[start:stop], self.cities[start:stop]
        if self.stations is None:  # no station column at all: binding a NULL costs a third more per row
            return Tuples(LOCATION_COLUMNS[:3], list(zip(ids, repeat(self.continent), cities)))
        return Tuples(LOCATION_COLUMNS, list(zip(ids, repeat(self.continent), cities, self.stations[start:stop])))

    @functools.cached_property
    def _columnar(self) -> bool:
        """Can every value travel inside one column parameter exactly? Text only (stations: text or None)."""
        if set(map(type, self.cities)) != {str}:
            return False
        return self.stations is None or set(map(type, self.stations)) <= {str, type(None)}

    def column_statement(self, dialect: Any, table: Any) -> Any | None:
        """The ``INSERT ... SELECT`` that takes whole columns on ``dialect``, or ``None`` (tuples)."""
        columns = ("city",) if self.stations is None else ("city", "station")
        if dialect.name == "postgresql" and self._columnar:
            return _array_insert(table, columns)
        if dialect.name == "sqlite" and dialect.dbapi.sqlite_version_info >= (3, 38) and self._columnar:
            return _json_insert(table, columns)
        return None

    def statements(self, dialect: Any, table: Any, batch_size: int) -> Iterator[tuple[Any, Any, int]]:
        statement = self.column_statement(dialect, table)
        if statement is None:
            yield from self.as_tuples().statements(dialect, table, batch_size)
            return
        for start in range(0, len(self.cities), batch_size):
            parameters = {"first_id": self.first_id + start * self.STEP, "step": self.STEP,
                          "continent": self.continent}
            cities = self.cities[start : start + batch_size]
            stations = None if self.stations is None else self.stations[start : start + batch_size]
            if dialect.name == "postgresql":  # arrays: asyncpg and psycopg send a list as one array value
                parameters["cities"] = cities
                if stations is not None:
                    parameters["stations"] = stations
            else:
                payload = json.dumps(cities if stations is None else list(zip(cities, stations)), ensure_ascii=False)
                if "\\u0000" in payload:  # a NUL character (or a backslash and "u0000"): json_each cuts text there
                    yield from self.as_tuples(start, start + batch_size).statements(dialect, table, batch_size)
                    continue
                parameters["rows"] = payload
            yield statement, parameters, len(cities)

    def values(self, column: str) -> Iterator[tuple[Any, int]]:
        values = {"city": self.cities, "station": self.stations}.get(column)
        if values is not None:
            yield from ((value, i) for value, i in zip(values, self.ids()) if value is not None)


def _from_select(table: Any, columns: tuple[str, ...], offset: Any, values: list[Any]) -> Any:
    """``INSERT INTO t (id, continent, <columns>) SELECT :first_id + :step * <offset>, :continent, <values>``."""
    id_type = table.c.id.type
    made = select(bindparam("first_id", type_=id_type) + bindparam("step", type_=id_type) * offset,
                  bindparam("continent", type_=table.c.continent.type), *values)
    return insert(table).from_select(["id", "continent", *columns], made)


@functools.lru_cache(maxsize=16)
def _json_insert(table: Any, columns: tuple[str, ...]) -> Any:
    """SQLite: ``... SELECT :first_id + :step * key, :continent, value FROM json_each(:rows)``
    (with a station: ``json_extract(value, '$[0]')`` and ``'$[1]'`` of ``[city, station]`` pairs),
    built once per table and columns."""
    rows = func.json_each(bindparam("rows", type_=String)).table_valued("key", "value")
    if columns == ("city",):
        values = [rows.c.value]
    else:
        values = [func.json_extract(rows.c.value, f"$[{n}]") for n in range(len(columns))]
    return _from_select(table, columns, rows.c.key, values)


@functools.lru_cache(maxsize=16)
def _array_insert(table: Any, columns: tuple[str, ...]) -> Any:
    """PostgreSQL: ``... SELECT :first_id + :step * (n - 1), :continent, city[, station]
    FROM unnest(:cities[, :stations]) WITH ORDINALITY AS (city[, station], n)``: one array
    parameter per column, built once per table and columns."""
    arrays = [bindparam(f"{column.replace('city', 'citie')}s", type_=postgresql.ARRAY(table.c[column].type))
              for column in columns]
    rows = func.unnest(*arrays).table_valued(*columns, with_ordinality="n").render_derived(name="new_rows")
    return _from_select(table, columns, rows.c.n - 1, [rows.c[column] for column in columns])


def _route_locations(rows: Iterable[Mapping[str, Any]]) -> tuple[dict[Any, list[Any]], dict[Any, list[tuple[Any, Any]]]]:
    """Validate and group every row first: ``({continent: [city, ...]}, {continent: [(city, station), ...]})``.

    The first dict holds the common rows (exactly ``continent`` and ``city``),
    the second the rows with a station. The loop for the common case does one
    dict lookup and one append per row; anything else (a station, an id, not a
    dict, a continent not seen yet, a missing key) takes the slow path, which
    checks everything and names what is wrong.
    """
    plain: dict[Any, list[Any]] = {}
    with_station: dict[Any, list[tuple[Any, Any]]] = {}
    for number, row in enumerate(rows):
        try:
            if type(row) is dict and len(row) == 2:
                plain[row["continent"]].append(row["city"])  # KeyError/TypeError: nothing appended
                continue
        except (LookupError, TypeError):
            pass
        _route_location_slowly(number, row, plain, with_station)
    return plain, with_station


def _route_location_slowly(number: int, row: Any, plain: dict[Any, list[Any]],
                           with_station: dict[Any, list[tuple[Any, Any]]]) -> None:
    _check_mapping(number, row, LOCATION_COLUMNS[1:3])
    try:
        continent, city = row["continent"], row["city"]
    except KeyError as missing:
        raise ValueError(f"row {number} {dict(row)!r} has no {missing.args[0]!r}; "
                         f"locations need 'continent' and 'city'") from None
    if row.get("id") is not None:
        raise ValueError(f"row {number} {dict(row)!r} has an id; bulk_insert allocates ids itself")
    try:
        known = continent in plain
    except TypeError:  # unhashable: no continent at all
        known = False
    if not known:
        shard_for_continent(continent)  # ValueError naming it and the valid ones
        plain[continent] = []
    station = row.get("station")
    if station is None:
        plain[continent].append(city)
    else:
        with_station.setdefault(continent, []).append((city, station))


def _location_runs(plain: Mapping[Any, list[Any]], with_station: Mapping[Any, list[tuple[Any, Any]]],
                   first_number: int) -> dict[str, list[ContinentRun]]:
    """Give every row its id: per database, one run of consecutive sequence numbers per continent
    (and one more for its rows with a station)."""
    number = first_number
    runs: dict[str, list[ContinentRun]] = {s: [] for s in SHARD_IDS}
    for continent, cities in plain.items():
        if cities:
            runs[shard_for_continent(continent)].append(ContinentRun(continent, make_id(number, continent), cities, None))
            number += len(cities)
    for continent, pairs in with_station.items():
        cities, stations = map(list, zip(*pairs))
        runs[shard_for_continent(continent)].append(ContinentRun(continent, make_id(number, continent), cities, stations))
        number += len(pairs)
    return runs


def _route_reports(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[Tuples]]:
    """Validate and route every row first; per shard, one batch of ``(location_id, temperature, time)``."""
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
    return {shard: [Tuples(REPORT_COLUMNS, rows_)] if rows_ else [] for shard, rows_ in routed.items()}


@functools.lru_cache(maxsize=64)
def _driver_statement(dialect: Any, table: Any, columns: tuple[str, ...]) -> tuple[str, list[int], list[Any]]:
    """The INSERT in the driver's SQL and paramstyle, where each parameter comes
    from in our tuples, and each parameter's bind processor (or None); compiled
    once per dialect, table and columns.

    Handing the driver plain tuples skips SQLAlchemy's per-row parameter
    handling (dict lookups, type processing for types that need none), which
    is most of the cost of a large executemany.
    """
    compiled = insert(table).values({c: None for c in columns}).compile(dialect=dialect)
    order = list(compiled.positiontup or [])
    if sorted(order) != sorted(columns):
        raise NotImplementedError(f"{dialect.name}: bulk_insert needs a positional paramstyle")
    processors = compiled._bind_processors
    return str(compiled), [columns.index(name) for name in order], [processors.get(n) for n in order]


async def _write_shard(engine: AsyncEngine, table: Any, batches: Sequence[Tuples | ContinentRun],
                       batch_size: int, bar: Any) -> None:
    """Every batch of one shard in one transaction, at most ``batch_size`` rows per statement."""
    if not batches:
        return
    async with engine.begin() as conn:
        for batch in batches:
            for statement, parameters, count in batch.statements(engine.dialect, table, batch_size):
                if isinstance(statement, str):
                    await conn.exec_driver_sql(statement, parameters)
                else:
                    await conn.execute(statement, parameters)
                if bar is not None:
                    bar.update(count)


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

    ``concurrent``: write the shards at the same time or one after another.
    The default: at the same time on database servers (their time is mostly
    network round trips and the servers' own work); on SQLite, whose "shards"
    all run inside this process, only when every batch is one whole-column
    ``INSERT ... SELECT``: SQLite then makes the rows inside one call, with the
    GIL released, and four shards write in parallel (measured about 1.3 times
    faster than taking turns on 2 cores). ``executemany`` of tuples (reports,
    values that are not text) binds every row while holding the GIL: four
    driver threads fight over it, measured 2.5 times slower than taking turns.
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
        plain, with_station = _route_locations(rows)
        total = sum(map(len, plain.values())) + sum(map(len, with_station.values()))
    elif model is Report:
        routed = _route_reports(rows)
        total = sum(len(batch) for batches in routed.values() for batch in batches)
    else:
        raise ValueError(f"bulk_insert takes WeatherLocation or Report, not {model!r}")
    if total == 0:
        return 0

    if model is WeatherLocation:  # one counter statement for every row
        async with engines[COUNTER_SHARD].begin() as conn:
            number = await conn.run_sync(advance_counter, total)
        routed = _location_runs(plain, with_station, number)
        # lookup entries first, committed before any row (shardlib.lookups); a duplicate station stops here
        runs = [run for shard in SHARD_IDS for run in routed[shard]]
        await lookups.bulk_created(engines, lambda column: (pair for run in runs for pair in run.values(column)))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc=f"bulk_insert {model.__tablename__}", unit="rows")
    async def write(shard: str) -> None:
        try:
            await _write_shard(engines[shard], model.__table__, routed[shard], batch_size, bar)
        except Exception as error:
            raise BulkInsertError(shard, error) from error

    try:
        if concurrent is None:  # servers: overlap the round trips; SQLite: only whole-column statements
            concurrent = any(engine.dialect.name != "sqlite" for engine in engines.values()) or all(
                batch.column_statement(engines[shard].dialect, model.__table__) is not None
                for shard in SHARD_IDS for batch in routed[shard])
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
