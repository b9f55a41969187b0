"""Moving a continent to another database while it is being written.

A shard runs hot, a database is retired, a new one arrives: the shard map has
to change while the application keeps reading and writing. Vitess does it
with ``MoveTables``/``Reshard`` (copy, catch up from the binlog, VDiff,
SwitchTraffic, ReverseTraffic); Citus moves shards over logical replication.
shardlib does the same for one continent, in phases you can also run one by
one (notebook 14)::

    move = ContinentMove(engines, "Europe", "europe_2")   # a new database
    await move.prepare()      # target schema, change capture on the source, fences
    await move.copy()         # batches, while writers keep writing
    await move.catch_up()     # apply what changed during the copy
    diff = await move.verify()          # VDiff: missing / extra / different rows
    await move.cut_over()     # fence, last changes, publish the new map version
    await move.clean_up()     # delete the source's copy (or: await move.reverse())

or all at once: ``await shardlib.move_continent(engines, "Europe", "europe_2")``.

Change capture
--------------
``prepare`` installs triggers on the source that append ``(table, primary
key)`` to ``shardlib_changes`` for every INSERT, UPDATE and DELETE of the
moving continent's rows (its logical shard: the low bits of the location id).
Catch-up reads a batch of entries, re-reads those rows **as they are now** on
the source (one snapshot), writes that state to the target (upsert, or delete
when the row is gone), and only then deletes the entries it applied. Applying
a row's current state is idempotent, so a batch applied twice (a crash
between the target's commit and the log's delete) is harmless, and entries
committed out of order (PostgreSQL hands out sequence numbers before commit)
are never skipped: nothing is deleted that was not applied. Vitess reads the
binlog instead of triggers and PostgreSQL could stream logical replication;
triggers work the same on SQLite and PostgreSQL, need no server settings, and
cost the source one small INSERT per changed row while a move runs.

Report ids do not survive a move
--------------------------------
Location ids name their logical shard, so they stay valid on any database.
Report ids are each database's own autoincrement: the target already has
reports with those numbers. Moved reports get new ids there, and the mover
keeps ``shardlib_moved_reports`` (source id -> target id) to apply later
changes. This is exactly why Vitess asks for global sequences before a
resharding: an id that is local to a shard cannot move.

The fence, and why a stale process never writes to the old place
----------------------------------------------------------------
Each database involved gets fence triggers: a write to a continent listed in
its ``shardlib_fence`` table fails with ``shardlib_fenced: continent ...``,
which shardlib raises as :class:`ContinentMoved` (retryable: the session
reloads the map, :func:`shardlib.run_transaction` runs it again). The target
is fenced for the continent until the cut-over; the source from the cut-over
on, for good. The fence is taken so that no write can slip between the last
catch-up and the new map: on PostgreSQL by ``LOCK TABLE ... IN SHARE ROW
EXCLUSIVE MODE`` in the fencing transaction (it waits for writers already
running, and blocks new ones, for the few milliseconds the fence takes); on
SQLite by the database's single write lock. The mover's own writes pass the
fences: inside its transactions it holds a row in ``shardlib_mover_token``,
which no other transaction can see (it is deleted before the mover commits).

A move interrupted at any phase leaves the map pointing at a complete copy:
before the new map is published, the source has every row (it was never
changed by the mover) and :meth:`ContinentMove.abort` removes the target's
partial copy; :meth:`ContinentMove.resume` continues from the last phase
recorded (phases are idempotent). After publication the target has every row.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, and_, bindparam, delete, insert, literal_column, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from . import shards
from .catalog import REFRESH_INTERVAL_S
from .conflicts import ShardConflict
from .models import Report, WeatherLocation
from .shards import SHARD_BITS, ShardMap

LOCATIONS = WeatherLocation.__table__
REPORTS = Report.__table__
_MASK = (1 << SHARD_BITS) - 1
FENCE_PREFIX = "shardlib_fenced"
PHASES = ("prepared", "copied", "caught_up", "fenced", "cut_over", "cleaned_up")


class MoveError(RuntimeError):
    """A move cannot go on (the message names the continent, databases and phase)."""


class VDiffMismatch(MoveError):
    """:meth:`ContinentMove.verify` found differences; ``diff`` is the DataFrame."""

    def __init__(self, message: str, diff: Any) -> None:
        super().__init__(message)
        self.diff = diff


class ContinentMoved(ShardConflict):
    """A write reached a database its continent has moved away from: nothing was
    written; the session reloads the shard map, and the transaction is safe to
    run again (:func:`shardlib.run_transaction` does). Retryable."""


# ---------------------------------------------------------------------- SQL for each dialect

def _sqlite_fence_triggers(slot: int, continent: str, version: int) -> list[str]:
    message = (f"{FENCE_PREFIX}: continent {continent} (logical shard {slot}) has moved away from this "
               f"database (shard map version {version})")
    guard = "NOT EXISTS (SELECT 1 FROM shardlib_mover_token)"
    out = []
    for table, column in (("weather_locations", "id"), ("weather_reports", "location_id")):
        for op, rows in (("INSERT", ("NEW",)), ("UPDATE", ("OLD", "NEW")), ("DELETE", ("OLD",))):
            when = " OR ".join(f"({r}.{column} & {_MASK}) = {slot}" for r in rows)
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS shardlib_fence_{slot}_{table}_{op.lower()} "
                f"BEFORE {op} ON {table} WHEN ({when}) AND {guard} "
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END")
    return out


def _sqlite_capture_triggers(slot: int) -> list[str]:
    out = []
    for table, tag, key, column in (("weather_locations", "L", "id", "id"),
                                    ("weather_reports", "R", "id", "location_id")):
        for op, rows in (("INSERT", ("NEW",)), ("UPDATE", ("OLD", "NEW")), ("DELETE", ("OLD",))):
            when = " OR ".join(f"({r}.{column} & {_MASK}) = {slot}" for r in rows)
            row = rows[-1] if op != "UPDATE" else "NEW"
            body = f"INSERT INTO shardlib_changes (slot, tbl, pk) VALUES ({slot}, '{tag}', {row}.{key});"
            if op == "UPDATE":  # a changed key: the old one is gone
                body += (f" INSERT INTO shardlib_changes (slot, tbl, pk) SELECT {slot}, '{tag}', OLD.{key} "
                         f"WHERE OLD.{key} <> NEW.{key};")
            out.append(
                f"CREATE TRIGGER IF NOT EXISTS shardlib_capture_{slot}_{table}_{op.lower()} "
                f"AFTER {op} ON {table} WHEN ({when}) AND NOT EXISTS (SELECT 1 FROM shardlib_mover_token) "
                f"BEGIN {body} END")
    return out


_PG_SETUP = [
    """CREATE OR REPLACE FUNCTION shardlib_fence_check() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    key_old bigint; key_new bigint; c text; s integer; v integer;
BEGIN
    IF TG_TABLE_NAME = 'weather_locations' THEN
        IF TG_OP <> 'INSERT' THEN key_old := OLD.id; END IF;
        IF TG_OP <> 'DELETE' THEN key_new := NEW.id; END IF;
    ELSE
        IF TG_OP <> 'INSERT' THEN key_old := OLD.location_id; END IF;
        IF TG_OP <> 'DELETE' THEN key_new := NEW.location_id; END IF;
    END IF;
    SELECT f.continent, f.slot, f.map_version INTO c, s, v FROM shardlib_fence f
     WHERE f.slot = (key_old & 15) OR f.slot = (key_new & 15) LIMIT 1;
    IF c IS NOT NULL AND NOT EXISTS (SELECT 1 FROM shardlib_mover_token) THEN
        RAISE EXCEPTION 'shardlib_fenced: continent % (logical shard %) has moved away from this database (shard map version %)', c, s, v;
    END IF;
    IF TG_OP = 'DELETE' THEN RETURN OLD; END IF;
    RETURN NEW;
END $$""",
    """CREATE OR REPLACE FUNCTION shardlib_capture() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    tag text := TG_ARGV[0];
    key_old bigint; key_new bigint; part_old bigint; part_new bigint;
BEGIN
    IF EXISTS (SELECT 1 FROM shardlib_mover_token) THEN RETURN NULL; END IF;
    IF TG_OP <> 'INSERT' THEN
        key_old := OLD.id;
        IF tag = 'L' THEN part_old := OLD.id; ELSE part_old := OLD.location_id; END IF;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        key_new := NEW.id;
        IF tag = 'L' THEN part_new := NEW.id; ELSE part_new := NEW.location_id; END IF;
    END IF;
    IF key_new IS NOT NULL AND EXISTS (SELECT 1 FROM shardlib_capturing WHERE slot = (part_new & 15)) THEN
        INSERT INTO shardlib_changes (slot, tbl, pk) VALUES (part_new & 15, tag, key_new);
    END IF;
    IF key_old IS NOT NULL AND (key_new IS NULL OR key_old <> key_new OR (part_old & 15) <> (part_new & 15))
       AND EXISTS (SELECT 1 FROM shardlib_capturing WHERE slot = (part_old & 15)) THEN
        INSERT INTO shardlib_changes (slot, tbl, pk) VALUES (part_old & 15, tag, key_old);
    END IF;
    RETURN NULL;
END $$""",
]


def _is_set_up(conn: Connection) -> bool:
    """One cheap query: are the sidecar tables (and on PostgreSQL the triggers) there?"""
    if conn.dialect.name == "postgresql":
        return bool(conn.execute(text(
            "SELECT to_regclass('shardlib_moves') IS NOT NULL AND to_regclass('shardlib_capturing') IS NOT NULL "
            "AND (SELECT count(*) FROM pg_trigger WHERE tgname IN ('shardlib_fence_weather_locations', "
            "'shardlib_fence_weather_reports', 'shardlib_capture_weather_locations', "
            "'shardlib_capture_weather_reports')) = 4")).scalar())
    return conn.execute(text("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN "
                             "('shardlib_moves', 'shardlib_capturing')")).scalar() == 2


def _setup_tables(conn: Connection) -> None:
    """The mover's sidecar tables (Vitess keeps the same in its ``_vt`` database)."""
    if _is_set_up(conn):  # DDL (CREATE OR REPLACE FUNCTION above all) takes locks writers wait for
        return
    pg = conn.dialect.name == "postgresql"
    serial = "BIGSERIAL PRIMARY KEY" if pg else "INTEGER PRIMARY KEY AUTOINCREMENT"
    for sql in (
        "CREATE TABLE IF NOT EXISTS shardlib_fence (slot INTEGER PRIMARY KEY, "
        "continent VARCHAR(50) NOT NULL, map_version INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS shardlib_mover_token (held INTEGER)",
        f"CREATE TABLE IF NOT EXISTS shardlib_changes (seq {serial}, slot INTEGER NOT NULL, "
        "tbl CHAR(1) NOT NULL, pk BIGINT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS shardlib_moved_reports (slot INTEGER NOT NULL, source_id BIGINT NOT NULL, "
        "target_id BIGINT NOT NULL, PRIMARY KEY (slot, source_id))",
        "CREATE TABLE IF NOT EXISTS shardlib_capturing (slot INTEGER PRIMARY KEY)",
        "CREATE TABLE IF NOT EXISTS shardlib_moves (continent VARCHAR(50) PRIMARY KEY, slot INTEGER NOT NULL, "
        "source VARCHAR(100) NOT NULL, target VARCHAR(100) NOT NULL, phase VARCHAR(20) NOT NULL, "
        "copied_through BIGINT NOT NULL, cut_over_version INTEGER)",
    ):
        conn.exec_driver_sql(sql)
    if pg:
        for sql in _PG_SETUP:
            conn.exec_driver_sql(sql)
        # installed once per database (DDL waits for every transaction on the table);
        # afterwards fences and capture are switched by rows, never by DDL
        for table, tag in (("weather_locations", "L"), ("weather_reports", "R")):
            present = {name for (name,) in conn.execute(
                text("SELECT tgname FROM pg_trigger WHERE tgrelid = CAST(:t AS regclass)"), {"t": table})}
            if f"shardlib_fence_{table}" not in present:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER shardlib_fence_{table} BEFORE INSERT OR UPDATE OR DELETE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION shardlib_fence_check()")
            if f"shardlib_capture_{table}" not in present:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER shardlib_capture_{table} AFTER INSERT OR UPDATE OR DELETE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION shardlib_capture('{tag}')")


def _fence(conn: Connection, slot: int, continent: str, version: int) -> None:
    _setup_tables(conn)
    conn.execute(text("DELETE FROM shardlib_fence WHERE slot = :s"), {"s": slot})
    conn.execute(text("INSERT INTO shardlib_fence (slot, continent, map_version) VALUES (:s, :c, :v)"),
                 {"s": slot, "c": continent, "v": version})
    if conn.dialect.name == "sqlite":
        for sql in _sqlite_fence_triggers(slot, continent, version):
            conn.exec_driver_sql(sql)


def _unfence(conn: Connection, slot: int) -> None:
    _setup_tables(conn)
    conn.execute(text("DELETE FROM shardlib_fence WHERE slot = :s"), {"s": slot})
    if conn.dialect.name == "sqlite":
        for table in ("weather_locations", "weather_reports"):
            for op in ("insert", "update", "delete"):
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS shardlib_fence_{slot}_{table}_{op}")


def _install_capture(conn: Connection, slot: int) -> None:
    _setup_tables(conn)
    if conn.dialect.name == "sqlite":
        for sql in _sqlite_capture_triggers(slot):
            conn.exec_driver_sql(sql)
        return
    conn.execute(text("DELETE FROM shardlib_capturing WHERE slot = :s"), {"s": slot})
    conn.execute(text("INSERT INTO shardlib_capturing (slot) VALUES (:s)"), {"s": slot})


def _remove_capture(conn: Connection, slot: int) -> None:
    if conn.dialect.name == "sqlite":
        for table in ("weather_locations", "weather_reports"):
            for op in ("insert", "update", "delete"):
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS shardlib_capture_{slot}_{table}_{op}")
    else:
        _setup_tables(conn)
        conn.execute(text("DELETE FROM shardlib_capturing WHERE slot = :s"), {"s": slot})
    conn.execute(text("DELETE FROM shardlib_changes WHERE slot = :s"), {"s": slot})


def _with_token(conn: Connection) -> None:
    """Inside the mover's transaction: a row no other transaction can see, which the
    fence and capture triggers recognise as "this is the mover"."""
    conn.exec_driver_sql("INSERT INTO shardlib_mover_token (held) VALUES (1)")


def _drop_token(conn: Connection) -> None:
    conn.exec_driver_sql("DELETE FROM shardlib_mover_token")


def drop_sidecar(conn: Connection) -> None:
    """Remove every mover table (``reset`` calls it; triggers go with their tables)."""
    for table in ("shardlib_fence", "shardlib_mover_token", "shardlib_changes", "shardlib_capturing",
                  "shardlib_moved_reports", "shardlib_moves"):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")


# ---------------------------------------------------------------------- rows

def _slot_of(column: Any, slot: int) -> Any:
    return column.op("&")(_MASK) == slot


_LOCATION_COLUMNS = [c.name for c in LOCATIONS.c]
_REPORT_COLUMNS = [c.name for c in REPORTS.c if c.name != "id"]


def _upsert_locations(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    if not rows:
        return
    ids = [r["id"] for r in rows]
    existing = set(conn.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.id.in_(ids))).scalars())
    fresh = [dict(r) for r in rows if r["id"] not in existing]
    stale = [dict(r) for r in rows if r["id"] in existing]
    if fresh:
        conn.execute(insert(LOCATIONS), fresh)
    if stale:
        conn.execute(update(LOCATIONS).where(LOCATIONS.c.id == bindparam("k_id"))
                     .values({c: bindparam(f"v_{c}") for c in _LOCATION_COLUMNS if c != "id"}),
                     [{**{f"v_{c}": r[c] for c in _LOCATION_COLUMNS if c != "id"}, "k_id": r["id"]}
                      for r in stale])


def _mapping(conn: Connection, slot: int, source_ids: Sequence[int]) -> dict[int, int]:
    if not source_ids:
        return {}
    found: dict[int, int] = {}
    ids = list(source_ids)
    for start in range(0, len(ids), 500):
        rows = conn.execute(text("SELECT source_id, target_id FROM shardlib_moved_reports "
                                 "WHERE slot = :s AND source_id IN :ids")
                            .bindparams(bindparam("ids", expanding=True)),
                            {"s": slot, "ids": ids[start:start + 500]})
        found.update({int(a): int(b) for a, b in rows})
    return found


def _apply_reports(conn: Connection, slot: int, present: Sequence[Mapping[str, Any]],
                   gone: Sequence[int]) -> None:
    """Write source reports (current state) to the target through the id map."""
    ids = [int(r["id"]) for r in present] + [int(i) for i in gone]
    mapped = _mapping(conn, slot, ids)
    updates = [{**{f"v_{c}": r[c] for c in _REPORT_COLUMNS}, "k_id": mapped[int(r["id"])]}
               for r in present if int(r["id"]) in mapped]
    if updates:
        conn.execute(update(REPORTS).where(REPORTS.c.id == bindparam("k_id"))
                     .values({c: bindparam(f"v_{c}") for c in _REPORT_COLUMNS}), updates)
    fresh = [r for r in present if int(r["id"]) not in mapped]
    if fresh:  # one INSERT ... RETURNING for all of them, ids in the rows' order
        new_ids = conn.execute(insert(REPORTS).returning(REPORTS.c.id, sort_by_parameter_order=True),
                               [{c: r[c] for c in _REPORT_COLUMNS} for r in fresh]).scalars().all()
        conn.execute(text("INSERT INTO shardlib_moved_reports (slot, source_id, target_id) VALUES (:s, :a, :b)"),
                     [{"s": slot, "a": int(r["id"]), "b": int(t)} for r, t in zip(fresh, new_ids)])
    dead = [mapped[i] for i in gone if i in mapped]
    if dead:
        conn.execute(delete(REPORTS).where(REPORTS.c.id.in_(dead)))
        conn.execute(text("DELETE FROM shardlib_moved_reports WHERE slot = :s AND source_id IN :ids")
                     .bindparams(bindparam("ids", expanding=True)), {"s": slot, "ids": [i for i in gone if i in mapped]})


def _delete_locations(conn: Connection, slot: int, ids: Sequence[int]) -> None:
    """Delete target locations (and every target report of theirs, with its id map row)."""
    if not ids:
        return
    ids = list(ids)
    report_ids = list(conn.execute(select(REPORTS.c.id).where(REPORTS.c.location_id.in_(ids))).scalars())
    if report_ids:
        conn.execute(delete(REPORTS).where(REPORTS.c.id.in_(report_ids)))
        conn.execute(text("DELETE FROM shardlib_moved_reports WHERE slot = :s AND target_id IN :ids")
                     .bindparams(bindparam("ids", expanding=True)), {"s": slot, "ids": report_ids})
    conn.execute(delete(LOCATIONS).where(LOCATIONS.c.id.in_(ids)))


def _rows(result: Any) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in result]


# ---------------------------------------------------------------------- the move

@dataclasses.dataclass
class MoveStats:
    """What a move did and what it cost (the notebook and the benchmark print it)."""

    locations_copied: int = 0
    reports_copied: int = 0
    copy_seconds: float = 0.0
    changes_applied: int = 0
    catch_up_rounds: int = 0
    fence_ms: float = 0.0
    cut_over_ms: float = 0.0
    map_version: int | None = None

    @property
    def rows_per_second(self) -> float:
        rows = self.locations_copied + self.reports_copied
        return rows / self.copy_seconds if self.copy_seconds else 0.0


class ContinentMove:
    """Move one continent's locations and reports from the database that stores it
    now to ``target`` (module docstring). ``target`` may be a database the map
    does not have yet: ``prepare`` adds it (``url``: its server URL; SQLite: a
    file in the data directory), empty, at the other databases' schema revisions.
    """

    def __init__(self, engines: Mapping[str, AsyncEngine], continent: str, target: str, *,
                 url: str | None = None, batch_size: int = 1000,
                 progress: bool = False, on_phase: Callable[[str], Any] | None = None) -> None:
        catalog = getattr(engines, "catalog", None)
        if catalog is None:
            raise MoveError("moving a continent needs the shard map in a catalog: use the engines "
                            "shardlib.make_engines() returns (file-backed SQLite or servers)")
        shard_map = shards.current()
        self.source = shard_map.database_for(continent)  # ValueError names the valid continents
        if target == self.source:
            raise MoveError(f"{continent!r} is already stored on {target!r}; nothing to move. "
                            f"Other databases: {', '.join(repr(d) for d in shard_map.databases if d != target)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        check_move(shard_map, continent, target)
        self.engines = engines
        self.catalog = catalog
        self.continent = continent
        self.slot = shard_map.slot_for(continent)
        self.target = target
        self.url = url
        self.batch_size = batch_size
        self.progress = progress
        self.on_phase = on_phase
        self.phase = "new"
        self.copied_through = 0
        self.stats = MoveStats()
        self._cut_over_at: float | None = None

    def __repr__(self) -> str:
        return (f"ContinentMove({self.continent!r}: {self.source!r} -> {self.target!r}, "
                f"phase {self.phase!r})")

    # -------------------------------------------------------------- helpers
    def _engine(self, name: str) -> AsyncEngine:
        return self.engines[name]

    async def _on(self, name: str, fn: Callable[[Connection], Any], *, token: bool = False) -> Any:
        """Run ``fn(connection)`` in one write transaction on database ``name``."""
        from .migrations import in_shard_transaction

        def go(conn: Connection) -> Any:
            if token:
                _with_token(conn)
            result = fn(conn)  # on an error the whole transaction, token included, rolls back
            if token:
                _drop_token(conn)
            return result

        return await in_shard_transaction(self._engine(name), go)

    async def _read(self, name: str, fn: Callable[[Connection], Any]) -> Any:
        """Run ``fn`` in one read-only snapshot on database ``name``."""
        engine = self._engine(name)
        options = {"isolation_level": "REPEATABLE READ"} if engine.dialect.name == "postgresql" else {}
        async with engine.connect() as conn:
            if options:
                conn = await conn.execution_options(**options)
            async with conn.begin():
                return await conn.run_sync(fn)

    async def _record(self, phase: str) -> None:
        self.phase = phase

        def save(conn: Connection) -> None:
            _setup_tables(conn)
            conn.execute(text("DELETE FROM shardlib_moves WHERE continent = :c"), {"c": self.continent})
            conn.execute(text("INSERT INTO shardlib_moves (continent, slot, source, target, phase, "
                              "copied_through, cut_over_version) VALUES (:c, :s, :src, :t, :p, :through, :v)"),
                         {"c": self.continent, "s": self.slot, "src": self.source, "t": self.target,
                          "p": phase, "through": self.copied_through, "v": self.stats.map_version})

        await self._on(self.source, save)
        if self.on_phase is not None:
            self.on_phase(phase)

    # -------------------------------------------------------------- phases
    async def prepare(self) -> None:
        """Add the target to the map if it is new (built empty through the
        migrations), fence the continent on the target, and start capturing
        the source's changes. Idempotent."""
        if self.target not in shards.current().databases:
            await add_database(self.engines, self.target, self.url)
        else:
            self.engines.ensure(shards.current())  # type: ignore[attr-defined]
        version = shards.current().version
        await self._on(self.target, lambda c: _fence(c, self.slot, self.continent, version))
        await self._on(self.source, lambda c: (_setup_tables(c), _install_capture(c, self.slot)))
        await self._record("prepared")

    async def copy(self) -> int:
        """Copy every location of the continent with its reports, in batches of
        ``batch_size`` locations, each batch read in one snapshot of the source.
        Then delete target rows the source does not have (a resumed or reversed
        move). Returns the number of rows written."""
        self._need("prepared", "copied", "caught_up")
        started = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            total = await self._read(self.source, lambda c: c.execute(
                select(literal_column("count(*)")).select_from(LOCATIONS)
                .where(_slot_of(LOCATIONS.c.id, self.slot))).scalar_one())
            bar = tqdm(total=total, desc=f"copy {self.continent}", unit="locations")
        written = 0
        try:
            while True:
                last = self.copied_through

                def read(conn: Connection, last: int = last) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
                    locations = _rows(conn.execute(
                        select(LOCATIONS).where(_slot_of(LOCATIONS.c.id, self.slot), LOCATIONS.c.id > last)
                        .order_by(LOCATIONS.c.id).limit(self.batch_size)))
                    ids = [r["id"] for r in locations]
                    reports = _rows(conn.execute(select(REPORTS).where(REPORTS.c.location_id.in_(ids))
                                                 .order_by(REPORTS.c.id))) if ids else []
                    return locations, reports

                locations, reports = await self._read(self.source, read)
                if not locations:
                    break

                def write(conn: Connection) -> None:
                    _upsert_locations(conn, locations)
                    ids = [r["id"] for r in locations]
                    kept = {int(r["id"]) for r in reports}
                    # target reports of these locations that the source no longer has
                    mapped = conn.execute(text(
                        "SELECT m.source_id FROM shardlib_moved_reports m JOIN weather_reports r "
                        "ON r.id = m.target_id WHERE m.slot = :s AND r.location_id IN :ids")
                        .bindparams(bindparam("ids", expanding=True)), {"s": self.slot, "ids": ids})
                    gone = [int(i) for (i,) in mapped if int(i) not in kept]
                    unmapped = conn.execute(text(
                        "SELECT r.id FROM weather_reports r WHERE r.location_id IN :ids AND NOT EXISTS "
                        "(SELECT 1 FROM shardlib_moved_reports m WHERE m.slot = :s AND m.target_id = r.id)")
                        .bindparams(bindparam("ids", expanding=True)), {"s": self.slot, "ids": ids})
                    strays = [int(i) for (i,) in unmapped]
                    if strays:
                        conn.execute(delete(REPORTS).where(REPORTS.c.id.in_(strays)))
                    _apply_reports(conn, self.slot, reports, gone)

                await self._on(self.target, write, token=True)
                self.copied_through = locations[-1]["id"]
                self.stats.locations_copied += len(locations)
                self.stats.reports_copied += len(reports)
                written += len(locations) + len(reports)
                if bar is not None:
                    bar.update(len(locations))
                await self._record("prepared")  # remember how far (a resumed copy starts there)

            source_ids = set(await self._read(self.source, lambda c: list(c.execute(
                select(LOCATIONS.c.id).where(_slot_of(LOCATIONS.c.id, self.slot))).scalars())))
            target_ids = await self._read(self.target, lambda c: list(c.execute(
                select(LOCATIONS.c.id).where(_slot_of(LOCATIONS.c.id, self.slot))).scalars()))
            extra = [i for i in target_ids if i not in source_ids]
            if extra:
                await self._on(self.target, lambda c: _delete_locations(c, self.slot, extra), token=True)
        finally:
            if bar is not None:
                bar.close()
        self.stats.copy_seconds += time.perf_counter() - started
        await self._record("copied")
        return written

    async def _drain_once(self, limit: int) -> int:
        def read(conn: Connection) -> tuple[list[int], list[dict[str, Any]], list[int], list[dict[str, Any]], list[int]]:
            entries = list(conn.execute(text(
                "SELECT seq, tbl, pk FROM shardlib_changes WHERE slot = :s ORDER BY seq LIMIT :n"),
                {"s": self.slot, "n": limit}))
            if not entries:
                return [], [], [], [], []
            loc_ids = sorted({int(pk) for _, tbl, pk in entries if tbl == "L"})
            rep_ids = sorted({int(pk) for _, tbl, pk in entries if tbl == "R"})
            reports = _rows(conn.execute(select(REPORTS).where(REPORTS.c.id.in_(rep_ids)))) if rep_ids else []
            parents = sorted(set(loc_ids) | {int(r["location_id"]) for r in reports
                                             if (int(r["location_id"]) & _MASK) == self.slot})
            locations = _rows(conn.execute(select(LOCATIONS).where(LOCATIONS.c.id.in_(parents)))) if parents else []
            reports = [r for r in reports if (int(r["location_id"]) & _MASK) == self.slot]
            seen_reports = {int(r["id"]) for r in reports}
            seen_locations = {int(r["id"]) for r in locations}
            return ([int(seq) for seq, _, _ in entries], locations,
                    [i for i in loc_ids if i not in seen_locations], reports,
                    [i for i in rep_ids if i not in seen_reports])

        seqs, locations, gone_locations, reports, gone_reports = await self._read(self.source, read)
        if not seqs:
            return 0

        def write(conn: Connection) -> None:
            _upsert_locations(conn, locations)
            _apply_reports(conn, self.slot, reports, gone_reports)
            _delete_locations(conn, self.slot, gone_locations)

        await self._on(self.target, write, token=True)

        def forget(conn: Connection) -> None:
            for start in range(0, len(seqs), 500):
                conn.execute(text("DELETE FROM shardlib_changes WHERE seq IN :seqs")
                             .bindparams(bindparam("seqs", expanding=True)), {"seqs": seqs[start:start + 500]})

        await self._on(self.source, forget)
        self.stats.changes_applied += len(seqs)
        self.stats.catch_up_rounds += 1
        return len(seqs)

    async def catch_up(self, *, until_below: int = 50, limit: int = 2000) -> int:
        """Apply captured changes in rounds until a round finds fewer than
        ``until_below`` entries (0: until a round finds the log empty). With
        writers still writing the log never stays empty, so the default stops
        when the lag is small; the cut-over's last catch-up, behind the fence,
        empties it for good. Returns how many entries were applied."""
        self._need("copied", "caught_up", "fenced")
        applied = 0
        while True:
            done = await self._drain_once(limit)
            applied += done
            if done == 0 or done < until_below:
                break
        if self.phase != "fenced":
            await self._record("caught_up")
        return applied

    async def pending_changes(self) -> int:
        """How many captured changes wait for catch-up."""
        return int(await self._read(self.source, lambda c: c.execute(
            text("SELECT count(*) FROM shardlib_changes WHERE slot = :s"), {"s": self.slot}).scalar_one()))

    async def verify(self, *, raise_on_difference: bool = False) -> Any:
        """VDiff: every location and report of the continent on source and target,
        compared column by column (reports through the id map). Returns a
        DataFrame of differences (``table``, ``key``, ``kind``: missing / extra /
        different, and both sides' values); empty when they agree.

        Writers may go on meanwhile. The source is read in one snapshot together
        with its pending changes, then the target (which only the mover writes,
        and not during ``verify``). A row that differs while a change of it is
        pending is *in flight*, not a difference (``attrs["in flight"]`` counts
        them); any other difference is real: every change visible in the
        source's snapshot without a pending entry was applied before ``verify``
        began."""
        import pandas as pd

        def snapshot(conn: Connection) -> tuple[dict[int, tuple[Any, ...]], dict[int, tuple[Any, ...]]]:
            locations = {int(r.id): tuple(r._mapping[c] for c in _LOCATION_COLUMNS)
                         for r in conn.execute(select(LOCATIONS).where(_slot_of(LOCATIONS.c.id, self.slot)))}
            reports = {int(r.id): tuple(_normal(r._mapping[c]) for c in _REPORT_COLUMNS)
                       for r in conn.execute(select(REPORTS).where(_slot_of(REPORTS.c.location_id, self.slot)))}
            return locations, reports

        def source_side(conn: Connection) -> tuple[Any, Any, set[int], set[int]]:
            locations, reports = snapshot(conn)
            pending = list(conn.execute(text("SELECT tbl, pk FROM shardlib_changes WHERE slot = :s"),
                                        {"s": self.slot}))
            return (locations, reports, {int(pk) for tbl, pk in pending if tbl == "L"},
                    {int(pk) for tbl, pk in pending if tbl == "R"})

        def target_side(conn: Connection) -> tuple[Any, Any, dict[int, int]]:
            locations, reports = snapshot(conn)
            mapping = {int(a): int(b) for a, b in conn.execute(
                text("SELECT source_id, target_id FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot})}
            return locations, reports, mapping

        source_locations, source_reports, pending_locations, pending_reports = await self._read(self.source, source_side)
        target_locations, target_reports, mapping = await self._read(self.target, target_side)
        rows: list[dict[str, Any]] = []
        in_flight = 0
        for key in sorted(set(source_locations) | set(target_locations)):
            a, b = source_locations.get(key), target_locations.get(key)
            if a != b:
                if key in pending_locations:
                    in_flight += 1
                    continue
                kind = "missing" if b is None else "extra" if a is None else "different"
                rows.append({"table": "weather_locations", "key": key, "kind": kind, "source": a, "target": b})
        source_of = {t: s for s, t in mapping.items()}
        matched_targets = set()
        for key, values in sorted(source_reports.items()):
            target_id = mapping.get(key)
            other = target_reports.get(target_id) if target_id is not None else None
            if target_id is not None:
                matched_targets.add(target_id)
            if other != values:
                if key in pending_reports:
                    in_flight += 1
                    continue
                rows.append({"table": "weather_reports", "key": key,
                             "kind": "missing" if other is None else "different", "source": values, "target": other})
        for target_id in sorted(set(target_reports) - matched_targets):
            if source_of.get(target_id) in pending_reports:
                in_flight += 1
                continue
            rows.append({"table": "weather_reports", "key": f"target id {target_id}", "kind": "extra",
                         "source": None, "target": target_reports[target_id]})
        diff = pd.DataFrame(rows, columns=["table", "key", "kind", "source", "target"])
        diff.attrs["compared"] = {"locations": len(source_locations), "reports": len(source_reports)}
        diff.attrs["in flight"] = in_flight
        if raise_on_difference and len(diff):
            raise VDiffMismatch(
                f"{self.continent}: {len(diff)} rows differ between {self.source!r} and {self.target!r} "
                f"({diff['kind'].value_counts().to_dict()}); refusing to cut over. Run catch_up() and "
                f"verify() again, or abort()", diff)
        return diff

    async def cut_over(self, *, verify: bool = True) -> float:
        """Fence the continent on the source, apply the last changes, lift the
        target's fence and publish the new map version. Returns the write pause
        in milliseconds (fence to publication)."""
        self._need("copied", "caught_up", "fenced")
        if verify and self.phase != "fenced":
            await self.catch_up()
            await self.verify(raise_on_difference=True)
        if self.phase != "fenced":
            await self.catch_up()  # what was written during verify(): the fenced drain stays short
        if self.on_phase is not None:
            self.on_phase("fencing")
        started = time.perf_counter()
        if self.phase != "fenced":
            version = shards.current().version + 1

            def fence(conn: Connection) -> None:
                if conn.dialect.name == "postgresql":  # wait for running writers, block new ones
                    conn.exec_driver_sql("LOCK TABLE weather_locations, weather_reports IN SHARE ROW EXCLUSIVE MODE")
                _fence(conn, self.slot, self.continent, version)

            for attempt in range(1, 11):  # the LOCK can lose a deadlock to a writer: take it again
                try:
                    await self._on(self.source, fence)
                    break
                except ShardConflict:
                    if attempt == 10:
                        raise
                    await asyncio.sleep(0.01 * attempt)
            self.stats.fence_ms = (time.perf_counter() - started) * 1000
            await self._record("fenced")
        await self.catch_up(until_below=0)  # nothing can be written any more: this empties the log for good
        source_counts = await self._read(self.source, self._counts)
        target_counts = await self._read(self.target, self._counts)
        if source_counts != target_counts:
            raise MoveError(f"{self.continent}: after the last catch-up the source {self.source!r} has "
                            f"{source_counts} (locations, reports) and the target {self.target!r} "
                            f"{target_counts}; the map was not changed and the continent stays fenced. "
                            f"Run verify() to see the rows, then resume() or abort()")
        await self._on(self.target, lambda c: _unfence(c, self.slot))
        shard_map = shards.current()
        if shard_map.placement[self.continent] != self.target:
            await self.catalog.publish(shard_map.with_placement(self.continent, self.target),
                                       reason=f"move {self.continent} {self.source} -> {self.target}")
        self.stats.map_version = shards.current().version
        self.stats.cut_over_ms = (time.perf_counter() - started) * 1000
        self._cut_over_at = time.monotonic()
        await self._record("cut_over")
        return self.stats.cut_over_ms

    def _counts(self, conn: Connection) -> tuple[int, int]:
        locations = conn.execute(select(literal_column("count(*)")).select_from(LOCATIONS)
                                 .where(_slot_of(LOCATIONS.c.id, self.slot))).scalar_one()
        reports = conn.execute(select(literal_column("count(*)")).select_from(REPORTS)
                               .where(_slot_of(REPORTS.c.location_id, self.slot))).scalar_one()
        return int(locations), int(reports)

    async def clean_up(self, *, drain_seconds: float | None = None) -> int:
        """Delete the continent's rows from the source and stop capturing there.
        The source keeps its fence (a process that never reloaded the map gets
        :class:`ContinentMoved`, not an empty answer from a half-empty table).
        Waits ``drain_seconds`` after the cut-over first (default: twice the
        catalog's refresh interval), so that every process has re-read the map
        and transactions that began before the cut-over have ended before the
        rows disappear (one that has not gets a retryable ContinentMoved). Returns the rows deleted."""
        self._need("cut_over")
        if drain_seconds is None:
            drain_seconds = 2 * REFRESH_INTERVAL_S
        if self._cut_over_at is not None:
            wait = drain_seconds - (time.monotonic() - self._cut_over_at)
            if wait > 0:
                await asyncio.sleep(wait)

        def purge(conn: Connection) -> int:
            ids = list(conn.execute(select(LOCATIONS.c.id).where(_slot_of(LOCATIONS.c.id, self.slot))).scalars())
            deleted = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                deleted += conn.execute(delete(REPORTS).where(REPORTS.c.location_id.in_(chunk))).rowcount
                deleted += conn.execute(delete(LOCATIONS).where(LOCATIONS.c.id.in_(chunk))).rowcount
            _remove_capture(conn, self.slot)
            return deleted

        deleted = await self._on(self.source, purge, token=True)
        await self._on(self.target, lambda c: c.execute(
            text("DELETE FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot}))
        await self._on(self.source, lambda c: c.execute(
            text("DELETE FROM shardlib_moves WHERE continent = :c"), {"c": self.continent}))
        self.phase = "cleaned_up"
        if self.on_phase is not None:
            self.on_phase("cleaned_up")
        return int(deleted)

    async def reverse(self) -> ContinentMove:
        """After the cut-over, before clean-up: move the continent back. The old
        source still holds its rows as of the cut-over; the reverse move reuses
        them (the report id map is turned around), copies what changed since,
        and cuts over. Returns the finished reverse move (the original source
        is the continent's home again; its copy on the target is removed)."""
        self._need("cut_over")
        back = ContinentMove(self.engines, self.continent, self.source, batch_size=self.batch_size,
                             progress=self.progress, on_phase=self.on_phase)

        def turned_around(conn: Connection) -> list[tuple[int, int]]:
            return [(int(a), int(b)) for a, b in conn.execute(
                text("SELECT source_id, target_id FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot})]

        pairs = await self._read(self.target, turned_around)

        def seed(conn: Connection) -> None:
            _setup_tables(conn)
            conn.execute(text("DELETE FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot})
            if pairs:
                conn.execute(text("INSERT INTO shardlib_moved_reports (slot, source_id, target_id) "
                                  "VALUES (:s, :a, :b)"), [{"s": self.slot, "a": t, "b": s} for s, t in pairs])

        await self._on(self.source, seed)
        await back.prepare()
        await back.copy()
        await back.catch_up()
        await back.cut_over()
        await back.clean_up(drain_seconds=0 if self.catalog.path is not None else None)
        # the forward move's bookkeeping on the old source is finished too
        await self._on(self.source, lambda c: _remove_capture(c, self.slot))
        # and its report id map on the old target names reports clean-up has deleted: a later
        # move to that database would take them for copied reports and never write them
        await self._on(self.target, lambda c: c.execute(
            text("DELETE FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot}))
        self.phase = "reversed"
        return back

    async def abort(self) -> None:
        """Before the new map is published: undo the move. The source keeps (and
        again accepts writes for) every row; the target's partial copy is deleted."""
        if self.phase in ("cut_over", "cleaned_up"):
            raise MoveError(f"{self.continent} was cut over to {self.target!r} (map version "
                            f"{self.stats.map_version}); use reverse() to move it back")

        def undo_target(conn: Connection) -> None:
            _setup_tables(conn)
            ids = list(conn.execute(select(LOCATIONS.c.id).where(_slot_of(LOCATIONS.c.id, self.slot))).scalars())
            _delete_locations(conn, self.slot, ids)
            conn.execute(text("DELETE FROM shardlib_moved_reports WHERE slot = :s"), {"s": self.slot})

        if self.target in self.engines:
            await self._on(self.target, undo_target, token=True)

        def undo_source(conn: Connection) -> None:
            _setup_tables(conn)
            _remove_capture(conn, self.slot)
            _unfence(conn, self.slot)
            conn.execute(text("DELETE FROM shardlib_moves WHERE continent = :c"), {"c": self.continent})

        await self._on(self.source, undo_source)
        self.phase = "aborted"

    @classmethod
    async def resume(cls, engines: Mapping[str, AsyncEngine], continent: str, **kw: Any) -> ContinentMove:
        """The interrupted move of ``continent`` (found in its source database's
        ``shardlib_moves``), ready to go on from its recorded phase. Call
        :func:`finish` (or the remaining phases) or :meth:`abort` on it."""
        catalog = getattr(engines, "catalog", None)
        if catalog is not None:
            engines.ensure(await catalog.load())  # type: ignore[attr-defined]
        for name in list(shards.current().databases):
            if name not in engines:
                continue

            def find(conn: Connection) -> Any:
                _setup_tables(conn)
                return conn.execute(text("SELECT slot, source, target, phase, copied_through, cut_over_version "
                                         "FROM shardlib_moves WHERE continent = :c"), {"c": continent}).first()

            found = await _in_transaction(engines[name], find)
            if found is None:
                continue
            slot, source, target, phase, through, version = found
            move = cls.__new__(cls)
            move.engines, move.catalog, move.continent = engines, catalog, continent
            move.slot, move.source, move.target, move.url = int(slot), source, target, None
            move.batch_size = kw.get("batch_size", 1000)
            move.progress, move.on_phase = kw.get("progress", False), kw.get("on_phase")
            move.phase, move.copied_through = phase, int(through)
            move.stats = MoveStats(map_version=version)
            move._cut_over_at = None
            if shards.current().placement[continent] == target and phase == "fenced":
                move.phase = "fenced"  # published before the crash: cut_over() just finishes
            return move
        raise MoveError(f"no interrupted move of {continent!r} found on "
                        f"{', '.join(repr(d) for d in shards.current().databases)}")

    async def finish(self) -> ContinentMove:
        """Run the remaining phases (after :meth:`resume`): copy, catch up,
        verify, cut over, clean up."""
        if self.phase == "new":
            await self.prepare()
        if self.phase == "prepared":
            await self.copy()
        if self.phase in ("copied", "caught_up", "fenced"):
            await self.cut_over()
        if self.phase == "cut_over":
            await self.clean_up()
        return self

    def _need(self, *phases: str) -> None:
        if self.phase not in phases:
            order = " -> ".join(PHASES)
            raise MoveError(f"{self.continent}: this step needs phase {' or '.join(map(repr, phases))}, "
                            f"the move is at {self.phase!r} (phases: {order})")


def check_move(shard_map: ShardMap, continent: str, target: str) -> None:
    """A move may not make a serving database hold rows it does not serve.

    shardlib's continents share one ``weather_locations`` table per database,
    so a half-copied continent on a database that serves another one, or a
    moved-away continent left behind on a database that still serves one,
    would be read twice by every query that does not name its continent. Citus
    and Vitess avoid this by keeping each shard's rows in tables of their own;
    shardlib requires the target to serve nothing yet (a new database, or one
    whose continents have moved away) and the source to serve nothing else."""
    busy = shard_map.continents_on(target)
    if busy:
        free = [d for d in shard_map.databases if not shard_map.continents_on(d)]
        raise MoveError(
            f"cannot move {continent!r} to {target!r}: {target!r} stores {', '.join(map(repr, busy))}, and "
            f"until the cut-over every query that does not name a continent would read the half-copied "
            f"{continent!r} there as well as on {shard_map.placement[continent]!r}. Move it to a new "
            f"database (any new name) or to one that stores no continent"
            + (f" ({', '.join(map(repr, free))})" if free else ""))
    others = [c for c in shard_map.continents_on(shard_map.placement[continent]) if c != continent]
    if others:
        raise MoveError(
            f"cannot move {continent!r} off {shard_map.placement[continent]!r} while it also stores "
            f"{', '.join(map(repr, others))}: after the cut-over, queries for those would still read the "
            f"left-behind copy of {continent!r} until clean-up. Move {', '.join(map(repr, others))} first")


async def _in_transaction(engine: AsyncEngine, fn: Callable[[Connection], Any]) -> Any:
    from .migrations import in_shard_transaction

    return await in_shard_transaction(engine, fn)


def _normal(value: Any) -> Any:
    """Compare floats and datetimes as both databases return them."""
    if isinstance(value, float):
        return round(value, 9)
    return value


async def move_continent(engines: Mapping[str, AsyncEngine], continent: str, target: str, *,
                         url: str | None = None, batch_size: int = 1000, progress: bool = False,
                         clean_up: bool = True) -> ContinentMove:
    """Move ``continent`` to database ``target`` (new or existing) while other
    sessions and processes keep reading and writing it: prepare, copy, catch
    up, verify, cut over, clean up (module docstring). Returns the move (its
    ``stats`` say what it copied and how long writes paused)."""
    move = ContinentMove(engines, continent, target, url=url, batch_size=batch_size, progress=progress)
    await move.prepare()
    await move.copy()
    await move.catch_up()
    await move.cut_over()
    if clean_up:
        await move.clean_up()
    return move


async def add_database(engines: Mapping[str, AsyncEngine], name: str, url: str | None = None) -> ShardMap:
    """Add an empty database to the map: its schema is built through the
    migrations (at the revisions the other databases have) *before* the map
    names it, because every process checks every database's schema revisions.
    ``url``: its server URL (with SQLite shards, a file in the data directory)."""
    from . import migrations, schema

    catalog = getattr(engines, "catalog", None)
    if catalog is None:
        raise MoveError("changing the shard map needs a catalog: use the engines shardlib.make_engines() returns")
    shard_map = shards.current()
    if url is None and getattr(engines, "data_dir", None) is None:
        raise MoveError(f"{name!r} is a new database: give its URL (url='postgresql+asyncpg://host/db'); "
                        f"the map stores it for every process")
    next_map = shard_map.with_database(name, url)  # ValueError if the name is taken or not an identifier
    engines.ensure(next_map)  # type: ignore[attr-defined]
    shards.activate(next_map)  # this process only, so that the migrations know the name
    try:
        await migrations.rebuild(engines[name], name)
        some = next(d for d in shard_map.databases if d in engines)
        wanted = await _in_transaction(engines[some], schema.read_revisions)
        have = await _in_transaction(engines[name], schema.read_revisions)
        for revision in wanted:
            if revision not in have:
                await migrations.migrate(engines, revision, shard=name)
    except BaseException:
        shards.activate(shard_map)
        raise
    return await catalog.publish(next_map, reason=f"add database {name}")


async def add_continent(engines: Mapping[str, AsyncEngine], continent: str, database: str, *,
                        url: str | None = None) -> ShardMap:
    """Add a continent to the map (the next free logical shard) on ``database``,
    an existing one or a new one (then ``url`` for servers); no row moves.
    Returns the new map."""
    catalog = getattr(engines, "catalog", None)
    if catalog is None:
        raise MoveError("adding a continent needs the shard map in a catalog (shardlib.make_engines())")
    shards.current().with_continent(continent, database if database in shards.current().databases
                                    else next(iter(shards.current().databases)))  # validate first
    if database not in shards.current().databases:
        await add_database(engines, database, url)
    return await catalog.publish(shards.current().with_continent(continent, database),
                                 reason=f"add {continent} on {database}")


def fence_error(shard: str, exc: Any) -> ContinentMoved | None:
    """The :class:`ContinentMoved` for a fence's error on ``shard``, or ``None``."""
    message = str(getattr(exc, "orig", exc))
    if FENCE_PREFIX not in message:
        return None
    detail = message[message.index(FENCE_PREFIX) + len(FENCE_PREFIX) + 2:].split("\n")[0]
    detail = detail.split(" (logical")[0] if "continent " in detail else detail
    continent = detail.removeprefix("continent ").strip()
    now = shards.current().placement.get(continent)
    where = (f"; the shard map (version {shards.current().version}) stores it on {now!r}"
             if now and now != shard else f"; this process routes by shard map version {shards.current().version}")
    return ContinentMoved(
        f"{message.splitlines()[0]}\nshard {shard!r}: a write for {continent!r} reached a database "
        f"that no longer stores it (this process routed by an older shard map){where}. Nothing was "
        f"written; the session reloads the map, and the transaction is safe to run again "
        f"(shardlib.run_transaction does)",
        shard=shard, code="shardlib_fenced", statement=exc.statement, params=exc.params,
        orig=exc.orig, hide_parameters=exc.hide_parameters)


__all__ = ["ContinentMove", "ContinentMoved", "MoveError", "MoveStats", "VDiffMismatch",
           "add_continent", "add_database", "drop_sidecar", "fence_error", "move_continent"]
