"""Lookup tables: global secondary indexes for columns that are not the shard key.

Locations are sharded by continent, so ``WHERE city = 'Quito'`` names no shard
and goes to all of them: every shard keeps its own *local* index on its own
rows (DDIA's document-partitioned index), and every shard must be asked. A
**lookup table** is a *global* (term-partitioned) index: one table, value ->
location id, consulted before routing::

    city_lookup                     station_lookup (unique)
    value     | location_id         value | location_id
    London    | 51                  EGLL  | 50
    London    | 64                  RJTT  | 33
    Quito     | 83

    SELECT ... WHERE city = 'Quito'
      1. north_america: SELECT value, location_id FROM city_lookup WHERE value IN ('Quito')
      2. south_america: the SELECT itself (83 names south_america)

Which columns have one is data (:data:`shardlib.models.LOOKUPS`); routing
reads the answers through :func:`shardlib.analysis.lookup_values` and
:func:`shardlib.analysis.shards_for`; this module asks and keeps the tables
current.

What a lookup stores
--------------------
The **location id**, never a database name. An id names its *logical* shard
(:func:`shardlib.shards.shard_for_id`), and the shard map says which database
holds that logical shard today, so moving a continent to another database
needs no change to any lookup.

Building them
-------------
Like an index, the lookup tables are built when asked for:
``await shardlib.lookups.enable(engines)`` creates them on ``COUNTER_SHARD``
and fills them from every shard's rows (:func:`repair`). From then on every
session keeps them current and routes ``city`` and ``station`` filters
through them (``make_sessionmaker(engines, lookup_routing=False)`` opts a
sessionmaker out of the routing, to compare). Before that, nothing changes,
except that a station code cannot be written: nothing could keep it unique.
:func:`shardlib.reset` drops them with every other table.

Where it lives
--------------
In the id counter's database (``COUNTER_SHARD``), like the counter: no new
server to run, and a session's lookup writes are an ordinary connection of the
same session, so with ``twophase=True`` (PostgreSQL) they **join the same
two-phase commit** as the rows they index. The price: one more hot table on
one database, which every city filter and every location write visits. A
separate lookup service (or a lookup sharded by value hash, as Vitess can do)
spreads that load, at the cost of another system to run and no shared
transaction.

Never missing a row (the consistent-lookup ordering)
----------------------------------------------------
Without two-phase commit the shards commit one by one, so the lookup and the
rows it indexes cannot change at the same instant. shardlib orders the writes
so that the lookup is never **missing** an entry for a row that exists (that
would hide the row from every lookup-routed query); a stale *extra* entry only
costs a wasted shard visit. This is Vitess's ``consistent_lookup`` argument:

* an entry is **created before the row commits**: written during the flush
  in a transaction of its own, committed at once (on SQLite on the session's
  own connection to that file, which has nothing else to commit yet). If the
  session already wrote there (rows, or the id counter on SQLite), the entry
  joins that transaction and that database commits **first**, before any
  other shard (``before_commit``); a failed COMMIT on a later shard is then
  a commit that reached a shard (``run_transaction`` does not retry it);
* an entry is **removed after the row's delete commits** (``after_commit``),
  in a short transaction of its own, and only if the row no longer holds the
  value. If that never happens (a crash), the entry is stale: harmless.

With ``twophase=True`` both happen inside the session's transaction instead.

Unique lookups
--------------
``station_lookup``'s primary key makes a station unique across all shards. A
claim that finds the value taken checks whether the owning row **really**
exists (through the session, so its own uncommitted deletes count) before
refusing with :class:`DuplicateLookupValue`; an entry whose row does not exist
(stale) is taken over. Two writers racing for one value cannot both win: on
SQLite the write ticket (:mod:`shardlib.locking`) lets one writer in at a
time; on PostgreSQL each writer holds a transaction-level advisory lock on its
row's shard for every value it writes, the loser's INSERT waits for the
winner's lookup commit, and its owner check waits for the winner's row commit.

Write paths kept current: ORM add / delete / change (flush),
:func:`shardlib.move_location`, Core ``insert()`` / ``update()`` / ``delete()``
through the session (:mod:`shardlib.execution`), :func:`shardlib.bulk_insert`.
Not covered: ``text()`` SQL and writes that bypass shardlib; :func:`verify`
finds what they broke and :func:`repair` fixes it. ``bulk_insert`` checks a
unique value against what is committed when it runs: it takes no write ticket
or advisory lock, so a session claiming the same station during a bulk load
can slip past it (``verify()`` reports the ``duplicate``).


"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, and_, delete, event, inspect, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import ORMExecuteState, Session
from sqlalchemy.orm.attributes import instance_state

from . import routecache
from .analysis import LOOKUP_ANSWERS, LookupAnswers
from .models import LOOKUPS, Lookup, WeatherLocation, lookup_metadata
from .shards import COUNTER_SHARD, SHARD_IDS, shard_for_id

log = logging.getLogger(__name__)

BY_NAME: dict[str, Lookup] = {lookup.name: lookup for lookup in LOOKUPS}
_LOCATIONS = WeatherLocation.__table__

ROUTING = "shardlib.lookup_routing"
"""Session ``info`` key set by ``make_sessionmaker(engines, lookup_routing=False)``: queries ignore
the lookups (to compare with a scatter); by default they consult them once they are enabled."""

MAINTENANCE = "shardlib.lookups"
"""``info={MAINTENANCE: False}``: a session that writes no lookup entries (:func:`repair`'s own);
rows written by such a session would be missing from the lookups until :func:`repair` runs."""

_REMOVALS = "shardlib.lookup_removals"  # (lookup name, value, location id) to remove after commit
_WROTE = "shardlib.lookup_wrote"  # the session's COUNTER_SHARD connection holds lookup writes


_enabled: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()


def remember(engine: Any, enabled: bool) -> None:
    """Record whether the lookup tables exist on this (counter shard's) engine."""
    _enabled[getattr(engine, "sync_engine", engine)] = enabled


def is_enabled(engine: Engine) -> bool:
    """Do the lookup tables exist on the counter shard's ``engine``? Asked once per engine
    and process (``reset``, :func:`enable` and :func:`disable` record the answer)."""
    known = _enabled.get(engine)
    if known is None:
        with engine.connect() as connection:
            known = _enabled[engine] = all(inspect(connection).has_table(lk.table.name) for lk in LOOKUPS)
    return known


def _session_enabled(session: Session) -> bool:
    return "shardlib.allocator" in session.info and is_enabled(session.get_bind(shard_id=COUNTER_SHARD))


async def enable(engines: Mapping[str, AsyncEngine]) -> pd.DataFrame:
    """Build the lookup tables on ``COUNTER_SHARD`` and fill them from every shard's rows.

    Like ``CREATE INDEX``: from then on every session keeps them current and
    routes ``city``/``station`` filters through them. Returns :func:`repair`'s
    frame (one ``missing`` row per entry it filled in). Idempotent. Processes
    with engines that already looked see the change from engines created
    afterwards (as with schema revisions, :mod:`shardlib.schema`).
    """
    async with engines[COUNTER_SHARD].begin() as conn:
        await conn.run_sync(lookup_metadata.create_all)
    remember(engines[COUNTER_SHARD], True)
    return await repair(engines)


async def disable(engines: Mapping[str, AsyncEngine]) -> None:
    """Drop the lookup tables: filters scatter again, nothing keeps them, stations may not be written."""
    async with engines[COUNTER_SHARD].begin() as conn:
        await conn.run_sync(lookup_metadata.drop_all)
    remember(engines[COUNTER_SHARD], False)


class LookupsNotEnabled(ValueError):
    """A write needs the lookup tables (a station code), and they have not been built."""


class DuplicateLookupValue(ValueError):
    """A unique lookup value (a station code) is already held by another stored row."""


# ====================================================================== reading


def _in_order(value: Any) -> Any:
    """A sort key for values of mixed types (a city given as ``7`` among text on SQLite, which
    stores it as ``'7'``): by type name first, so that sorting (the order in which unique values
    are claimed) never compares an int with a str."""
    if isinstance(value, tuple):
        return tuple(map(_in_order, value))
    return type(value).__name__, value


def read_entries(connection: Connection, lookup: Lookup, values: Iterable[str]) -> dict[str, set[int]]:
    """``value -> location ids`` for ``values``, read on ``connection`` (one query)."""
    table = lookup.table
    found: dict[str, set[int]] = {}
    wanted = sorted(set(values), key=_in_order)
    if not wanted:
        return found
    rows = connection.execute(
        select(table.c.value, table.c.location_id).where(table.c.value.in_(wanted))
    ).all()
    for value, location_id in rows:
        found.setdefault(value, set()).add(location_id)
    return found


def answers_from(entries: Mapping[str, Mapping[str, set[int]]]) -> LookupAnswers:
    """Lookup entries (ids) -> the shards routing needs (``shard_for_id``, the current map)."""
    answers: dict[str, dict[str, frozenset[str]]] = {}
    for name, per_value in entries.items():
        answers[name] = {}
        for value, ids in per_value.items():
            shards = frozenset(s for s in map(shard_for_id, ids) if s is not None)
            if shards:
                answers[name][value] = shards
    return answers


def ask(orm_context: ORMExecuteState) -> LookupAnswers | None:
    """Ask the lookup tables what a statement's WHERE needs; ``None`` if it needs nothing.

    Hands the answers to the ``execute_chooser`` as an execution option (the
    chooser itself does no I/O). Once :func:`enable` has built the lookups, unless
    the session was made with ``make_sessionmaker(..., lookup_routing=False)``.
    """
    params = orm_context.parameters if isinstance(orm_context.parameters, Mapping) else None
    answers = answers_for(orm_context.session, orm_context.statement, params)
    if answers is not None:
        orm_context.update_execution_options(**{LOOKUP_ANSWERS: answers})
    return answers


def answers_for(session: Session, statement: Any, params: Mapping[str, Any] | None) -> LookupAnswers | None:
    """The lookup tables' answers for ``statement`` (one query per lookup column it names), or ``None``.

    Read on the session's own ``COUNTER_SHARD`` connection: it sees every
    committed entry and the session's own uncommitted ones.
    """
    if session.info.get(ROUTING) is False:
        return None
    wanted = routecache.lookup_values(statement, params)  # no I/O, remembered: most need no lookup
    if not wanted or not _session_enabled(session):
        return None
    return answers_from(_read(_session_connection(session, COUNTER_SHARD), wanted))


def _read(connection: Connection, wanted: Mapping[str, set[str]]) -> dict[str, dict[str, set[int]]]:
    return {name: read_entries(connection, BY_NAME[name], values) for name, values in wanted.items()}


# ====================================================================== writing: one entry


def _insert_ignore(connection: Connection, table: Any, rows: list[dict[str, Any]]) -> int:
    """INSERT rows, skipping those whose key exists (SQLite and PostgreSQL both say ON CONFLICT)."""
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    result = connection.execute(dialect.insert(table).on_conflict_do_nothing(), rows)
    return result.rowcount


def advisory_key(lookup: Lookup, value: str) -> int:
    """A stable 64-bit key for ``pg_advisory_xact_lock`` (one per lookup value)."""
    digest = hashlib.blake2b(f"{lookup.name}:{value}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_LOCK_ALL = None


def _lock_values(connection: Connection, keys: Sequence[int]) -> None:
    """PostgreSQL: hold an advisory lock per value until this transaction ends.

    One statement for all of them, taken in key order (two writers locking
    overlapping values in one order cannot deadlock each other).
    """
    global _LOCK_ALL
    if connection.dialect.name == "postgresql" and keys:
        if _LOCK_ALL is None:
            from sqlalchemy import BigInteger, bindparam, text
            from sqlalchemy.dialects.postgresql import ARRAY

            _LOCK_ALL = text(
                "SELECT count(pg_advisory_xact_lock(k)) FROM (SELECT unnest(:keys) AS k ORDER BY 1) AS ordered"
            ).bindparams(bindparam("keys", type_=ARRAY(BigInteger)))
        connection.execute(_LOCK_ALL, {"keys": sorted(set(keys))})


def _owner_holds(connection: Connection, lookup: Lookup, value: str, location_id: int) -> bool:
    """Does row ``location_id`` exist with ``value`` in the lookup's column (as ``connection`` sees it)?"""
    found = connection.execute(
        select(lookup.column).where(_LOCATIONS.c.id == location_id)
    ).first()
    return found is not None and found[0] == value


def claim_unique(lookup: Lookup, value: str, location_id: int, lookup_connection: Connection,
                 owner_connection: Any) -> None:
    """Make ``value`` belong to ``location_id`` in a unique lookup, or raise :class:`DuplicateLookupValue`.

    ``owner_connection(shard)`` returns a connection that sees the owning rows
    (the session's own, so its uncommitted deletes count). A taken value whose
    owner row does not hold it any more is stale and is taken over.
    """
    table = lookup.table
    for _ in range(5):  # a takeover can race with another; try again a few times
        if _insert_ignore(lookup_connection, table, [{"value": value, "location_id": location_id}]):
            return
        holder = lookup_connection.execute(select(table.c.location_id).where(table.c.value == value)).scalar()
        if holder is None or holder == location_id:
            if holder == location_id:
                return
            continue  # removed meanwhile: insert again
        shard = shard_for_id(holder)
        if shard is not None:
            owner = owner_connection(shard)
            _lock_values(owner, [advisory_key(lookup, value)])  # waits for a writer still holding it
            if _owner_holds(owner, lookup, value, holder):
                raise DuplicateLookupValue(
                    f"{lookup.name} {value!r} is already used by location {holder} on shard {shard!r}; "
                    f"{lookup.name} values are unique across all shards ({lookup.table.name}). Choose "
                    f"another {lookup.name}, or clear it on location {holder} first"
                )
        taken = lookup_connection.execute(
            update(table).where(and_(table.c.value == value, table.c.location_id == holder))
            .values(location_id=location_id)
        ).rowcount
        if taken:
            log.info("%s %r: stale entry for location %s taken over by %s", lookup.name, value, holder, location_id)
            return
    raise DuplicateLookupValue(f"{lookup.name} {value!r}: could not claim it (it kept changing); try again")


def create_entries(entries: Sequence[tuple[Lookup, str, int]], lookup_connection: Connection,
                   owner_connection: Any) -> None:
    """Create lookup entries ``(lookup, value, location_id)``: non-unique ones in one INSERT each
    lookup, unique ones claimed one by one (:func:`claim_unique`). Refuses before writing if
    two of them claim one unique value."""
    seen: dict[tuple[str, str], int] = {}
    for lookup, value, location_id in entries:
        if lookup.unique:
            other = seen.setdefault((lookup.name, value), location_id)
            if other != location_id:
                raise DuplicateLookupValue(
                    f"{lookup.name} {value!r} is given to two locations in one write ({other} and "
                    f"{location_id}); {lookup.name} values are unique across all shards"
                )
    for lookup in LOOKUPS:
        mine = sorted({(v, i) for lk, v, i in entries if lk is lookup}, key=_in_order)
        if not mine:
            continue
        if lookup.unique:  # the common case in three statements: read, insert the free values, done
            taken = read_entries(lookup_connection, lookup, [v for v, _ in mine])
            free = [(v, i) for v, i in mine if v not in taken]
            inserted = _insert_ignore(lookup_connection, lookup.table,
                                      [{"value": v, "location_id": i} for v, i in free]) if free else 0
            if inserted != len(free):  # someone took one meanwhile: read again
                taken.update(read_entries(lookup_connection, lookup, [v for v, _ in free]))
                free = [(v, i) for v, i in free if taken.get(v, {i}) == {i}]
            for value, location_id in mine:
                if (value, location_id) not in free and taken.get(value) != {location_id}:
                    claim_unique(lookup, value, location_id, lookup_connection, owner_connection)
        else:
            _insert_ignore(lookup_connection, lookup.table, [{"value": v, "location_id": i} for v, i in mine])


def remove_entries(entries: Iterable[tuple[Lookup, str, int]], lookup_connection: Connection,
                   owner_connection: Any) -> int:
    """Remove entries whose row no longer holds the value (checked first: never remove a live one)."""
    removed = 0
    for lookup, value, location_id in sorted(set(entries), key=lambda e: (e[0].name, _in_order(e[1:]))):
        shard = shard_for_id(location_id)
        if shard is not None and _owner_holds(owner_connection(shard), lookup, value, location_id):
            continue  # the row holds this value again (changed back): keep the entry
        table = lookup.table
        removed += lookup_connection.execute(
            delete(table).where(and_(table.c.value == value, table.c.location_id == location_id))
        ).rowcount
    return removed


# ====================================================================== the session's write paths


def _session_connection(session: Session, shard: str) -> Connection:
    return session.connection(bind_arguments={"shard_id": shard})


def _write_in_session(session: Session, creates: list[tuple[Lookup, str, int]],
                      removals: list[tuple[Lookup, str, int]]) -> None:
    """Creates now, on the session's ``COUNTER_SHARD`` connection; removals after commit
    (or now, inside a two-phase transaction)."""
    if (not creates and not removals) or session.info.get(MAINTENANCE) is False:
        return
    if not _session_enabled(session):
        _refuse_unique_without_lookups(creates)
        return
    owner = lambda shard: _session_connection(session, shard)  # noqa: E731
    keys_by_shard: dict[str, list[int]] = {}
    for lookup, value, location_id in [*creates, *removals]:
        shard = shard_for_id(location_id)
        if shard is not None:
            keys_by_shard.setdefault(shard, []).append(advisory_key(lookup, value))
    for shard in SHARD_IDS:  # PostgreSQL: announce our values on each row's shard first
        if shard in keys_by_shard and session.get_bind(shard_id=shard).dialect.name == "postgresql":
            _lock_values(owner(shard), keys_by_shard[shard])
    if creates and (session.twophase or session.get_bind(shard_id=COUNTER_SHARD).dialect.name == "sqlite"):
        engine = session.get_bind(shard_id=COUNTER_SHARD)
        was_connected = engine in session.info.get("shardlib.connected_shards", ())
        connection = _session_connection(session, COUNTER_SHARD)
        on_its_own = not session.twophase and not _in_write_transaction(connection)
        create_entries(creates, connection, owner)
        if on_its_own:  # nothing else of the session's is there: commit the entries at once
            connection.connection.dbapi_connection.commit()
            if not was_connected:  # and give the connection back: the session has nothing there
                _release(session, engine, connection)
        elif not session.twophase:  # the session's own writes are there too: that shard commits first
            session.info[_WROTE] = True
    elif creates:  # a short transaction of its own, committed before the rows are even written
        with session.get_bind(shard_id=COUNTER_SHARD).begin() as connection:
            create_entries(creates, connection, owner)
    if removals:  # after the rows' changes: at commit (two-phase) or after it
        session.info.setdefault(_REMOVALS, []).extend(removals)


def _refuse_unique_without_lookups(creates: Sequence[tuple[Lookup, str, int]]) -> None:
    """Without the lookup tables nothing can keep a unique value unique: refuse, before any SQL."""
    for lookup, value, location_id in creates:
        if lookup.unique:
            raise LookupsNotEnabled(
                f"{lookup.name} {value!r} for location {location_id}: {lookup.name} values are unique "
                f"across all shards only through the {lookup.table.name} lookup, which is not built; "
                f"run await shardlib.lookups.enable(engines) first, or leave {lookup.name} unset"
            )


def _in_write_transaction(connection: Connection) -> bool:
    """SQLite: has this connection written in its open transaction (it holds the file's write lock)?

    Python's ``sqlite3`` opens a transaction at the first INSERT/UPDATE/DELETE only,
    so a connection that has only read is not in one.
    """
    return bool(getattr(connection.connection.driver_connection, "in_transaction", True))


def _release(session: Session, engine: Engine, connection: Connection) -> None:
    """Take a connection with nothing to commit out of the session's transaction (back to the pool).

    Otherwise the session's COMMIT would commit it too, and if a later shard's
    COMMIT then failed, rolling back an already committed connection warns.
    """
    transaction = session.get_transaction()
    assert transaction is not None
    conn, trans, should_commit, autoclose = transaction._connections.pop(engine)
    transaction._connections.pop(conn, None)
    trans.rollback()  # nothing is open on the driver connection: this ends SQLAlchemy's bookkeeping
    if autoclose:
        conn.close()
    session.info.get("shardlib.connected_shards", set()).discard(engine)
    cache = session.info.get("shardlib.flush_connections", {})
    for key in [k for k, v in cache.items() if v is conn]:
        del cache[key]


def _commit_now(session: Session, shard: str) -> None:
    """COMMIT the session's transaction on one shard now, and go on there in a fresh one.

    Events fire as for any COMMIT (``run_transaction`` sees that this shard
    committed), and the session's bookkeeping points at the new transaction,
    so its own COMMIT or ROLLBACK later finds a live transaction there.
    """
    connection = _session_connection(session, shard)
    transaction = session.get_transaction()
    assert transaction is not None
    conn, trans, should_commit, autoclose = transaction._connections[connection]
    trans.commit()
    fresh = connection.begin()
    transaction._connections[connection] = transaction._connections[connection.engine] = (
        conn, fresh, should_commit, autoclose)


def _values_of(obj: Any, state: Any = None) -> list[tuple[Lookup, Any]]:
    state = state or instance_state(obj)
    return [(lookup, state.dict.get(lookup.column.key)) for lookup in LOOKUPS]


def _flush_entries(session: Session) -> tuple[list[tuple[Lookup, str, int]], list[tuple[Lookup, str, int]]]:
    creates: list[tuple[Lookup, str, int]] = []
    removals: list[tuple[Lookup, str, int]] = []
    for obj in session.new:
        if isinstance(obj, WeatherLocation):
            for lookup, value in _values_of(obj):
                if value is not None:
                    creates.append((lookup, value, obj.id))
    for obj in session.dirty:
        if not isinstance(obj, WeatherLocation) or obj in session.deleted:
            continue
        state = instance_state(obj)
        if state.key is None:
            continue
        for lookup in LOOKUPS:
            history = state.attrs[lookup.column.key].history
            if not history.added and not history.deleted:
                continue
            for value in history.added:
                if value is not None:
                    creates.append((lookup, value, state.key[1][0]))
            for value in history.deleted:
                if value is not None and value not in history.added:
                    removals.append((lookup, value, state.key[1][0]))
    for obj in session.deleted:
        if isinstance(obj, WeatherLocation):
            state = instance_state(obj)
            committed = state.committed_state
            for lookup in LOOKUPS:
                key = lookup.column.key
                value = committed.get(key, state.dict.get(key))
                if value is not None and state.key is not None:
                    removals.append((lookup, value, state.key[1][0]))
    return creates, removals


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """ORM add / change / delete (and so :func:`shardlib.move_location`): lookup entries first."""
    if "shardlib.allocator" not in session.info or session.info.get(MAINTENANCE) is False:
        return
    creates, removals = _flush_entries(session)
    _write_in_session(session, creates, removals)


def _before_commit(session: Session) -> None:
    """Flush; then, with two-phase commit, remove the entries of deleted or changed rows in
    the same transaction; without it, commit the lookup's database first."""
    if "shardlib.allocator" not in session.info:
        return
    session.flush()
    if session.twophase:
        removals = session.info.pop(_REMOVALS, None)
        if removals:  # the rows' changes are flushed: their shards' connections see them
            remove_entries(removals, _session_connection(session, COUNTER_SHARD),
                           lambda shard: _session_connection(session, shard))
        return
    if session.info.pop(_WROTE, False):  # the entries are durable before any other shard commits
        _commit_now(session, COUNTER_SHARD)


def _after_commit(session: Session) -> None:
    """Without two-phase commit: remove entries whose rows' deletes (or changes) have committed."""
    removals = session.info.pop(_REMOVALS, None)
    session.info.pop(_WROTE, None)
    if not removals:
        return
    try:
        engine = session.get_bind(shard_id=COUNTER_SHARD)
        owners: dict[str, Connection] = {}
        try:
            def owner(shard: str) -> Connection:
                if shard not in owners:
                    owners[shard] = session.get_bind(shard_id=shard).connect()
                return owners[shard]

            with engine.begin() as connection:
                remove_entries(removals, connection, owner)
        finally:
            for connection in owners.values():
                connection.close()
    except Exception as error:  # the rows are committed; a stale entry only costs a shard visit
        log.warning("lookup entries not removed after commit (stale, harmless; repair() removes them): %s", error)


def _after_transaction_end(session: Session, transaction: Any) -> None:
    if transaction.parent is None:  # rolled back (or committed: after_commit took them already)
        session.info.pop(_REMOVALS, None)
        session.info.pop(_WROTE, None)


def install(session_class: type[Session]) -> None:
    """Keep lookups current in sessions of ``session_class`` (done for ``ShardlibSession``).

    The ``before_flush`` hook must run after shardlib's own (ids are given there).
    """
    event.listen(session_class, "before_flush", _before_flush)
    event.listen(session_class, "before_commit", _before_commit)
    event.listen(session_class, "after_commit", _after_commit)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)


# ---------------------------------------------------------------------- Core INSERT/UPDATE/DELETE


def after_insert_routing(session: Session, per_shard: Mapping[str, list[dict[str, Any]]]) -> None:
    """Core ``insert()`` through the session: entries for the routed rows (ids already given)."""
    creates = [(lookup, row[lookup.column.key], row["id"])
               for rows in per_shard.values() for row in rows for lookup in LOOKUPS
               if row.get(lookup.column.key) is not None]
    _write_in_session(session, creates, [])


def before_update_or_delete(orm_context: ORMExecuteState, shards: Sequence[str]) -> Any:
    """Core/ORM ``update()`` / ``delete()`` of locations through the session.

    The rows it will change are read first (same WHERE, same parameters, on the
    same shards). Returns ``None``, or a function to call once the statement
    has run: it reads the rows' new values (an UPDATE may set them with an SQL
    expression, ``city = upper(city)``), creates their entries and queues the
    old ones for removal. Both happen before this session commits, and the
    lookup's database commits first, so the ordering holds.
    """
    from .guards import LOCATIONS, set_clause, target_table_name

    statement = orm_context.statement
    if target_table_name(statement) != LOCATIONS or orm_context.session.info.get(MAINTENANCE) is False:
        return None
    if not _session_enabled(orm_context.session):
        if orm_context.is_update:  # a station set by a bulk UPDATE needs the lookup as much as an INSERT
            params = orm_context.parameters
            sets = params if isinstance(params, Sequence) and not isinstance(params, Mapping) else [params]
            _refuse_unique_without_lookups([(lk, v, 0) for p in sets for k, v in set_clause(statement, p).items()
                                            for lk in LOOKUPS if lk.column.key == k and v is not None])
        return None
    params = orm_context.parameters
    param_sets = params if isinstance(params, Sequence) and not isinstance(params, Mapping) else [params]
    session = orm_context.session
    keys = {lk.column.key for lk in LOOKUPS}
    if orm_context.is_update and not any(keys & set(set_clause(statement, p)) for p in param_sets):
        return None  # no lookup column changes
    before: dict[int, tuple[Any, ...]] = {}
    for param_set in param_sets:
        for location_id, *old in _matching_rows(session, statement, param_set, shards):
            before[location_id] = tuple(old)
    if not before:
        return None

    def finish() -> None:
        after: dict[int, tuple[Any, ...]] = {}
        if orm_context.is_update:
            query = select(_LOCATIONS.c.id, *(lk.column for lk in LOOKUPS)).where(_LOCATIONS.c.id.in_(sorted(before)))
            for shard in sorted({shard_for_id(i) for i in before} - {None}):
                after.update((i, tuple(v)) for i, *v in _session_connection(session, shard).execute(query))
        creates: list[tuple[Lookup, str, int]] = []
        removals: list[tuple[Lookup, str, int]] = []
        for location_id, old in before.items():
            new = after.get(location_id, (None,) * len(LOOKUPS))
            for lookup, old_value, new_value in zip(LOOKUPS, old, new):
                if old_value == new_value:
                    continue
                if new_value is not None:
                    creates.append((lookup, new_value, location_id))
                if old_value is not None:
                    removals.append((lookup, old_value, location_id))
        _write_in_session(session, creates, removals)

    return finish


def _matching_rows(session: Session, statement: Any, params: Any, shards: Sequence[str]) -> list[tuple[Any, ...]]:
    query = select(_LOCATIONS.c.id, *(lookup.column for lookup in LOOKUPS))
    if statement.whereclause is not None:
        query = query.where(statement.whereclause)
    rows: list[tuple[Any, ...]] = []
    for shard in shards:
        rows.extend(tuple(r) for r in _session_connection(session, shard).execute(query, params or {}))
    return rows


# ---------------------------------------------------------------------- bulk_insert (no session)


async def bulk_created(engines: Mapping[str, AsyncEngine],
                       values: Callable[[str], Iterable[tuple[Any, int]]]) -> None:
    """:func:`shardlib.bulk_insert`: create the entries for the rows about to be written
    (``values(column)``: ``(value, location id)`` of each row whose ``column`` is set) in one
    transaction on ``COUNTER_SHARD``, committed before any shard is written (a duplicate
    unique value raises and nothing is written anywhere).

    Without the lookup tables only unique values are asked for (and refused): a load of rows
    with no station costs nothing here."""
    enabled = await _enabled_on(engines[COUNTER_SHARD])
    creates = [(lookup, value, location_id) for lookup in LOOKUPS if enabled or lookup.unique
               for value, location_id in values(lookup.column.key)]
    if not creates:
        return
    if not enabled:
        _refuse_unique_without_lookups(creates)
        return

    def go(connection: Connection) -> None:
        owners: dict[str, Connection] = {}

        def owner(shard: str) -> Connection:
            if shard not in owners:
                owners[shard] = engines[shard].sync_engine.connect()
            return owners[shard]

        try:
            create_entries(creates, connection, owner)
        finally:
            for c in owners.values():
                c.close()

    async with engines[COUNTER_SHARD].begin() as conn:
        await conn.run_sync(go)


async def _enabled_on(engine: AsyncEngine) -> bool:
    known = _enabled.get(engine.sync_engine)
    if known is None:
        async with engine.connect() as conn:
            known = await conn.run_sync(lambda c: is_enabled(c.engine))
    return known


# ====================================================================== verify / repair

_COLUMNS = ["lookup", "value", "location_id", "shard", "problem"]


async def _read_all(engines: Mapping[str, AsyncEngine]) -> tuple[dict[str, set[tuple[str, int]]],
                                                              dict[str, set[tuple[str, int]]]]:
    """(entries per lookup, (value, id) per lookup as the shards hold them); the lookup first."""
    entries: dict[str, set[tuple[str, int]]] = {}
    async with engines[COUNTER_SHARD].connect() as conn:
        for lookup in LOOKUPS:
            result = await conn.execute(select(lookup.table.c.value, lookup.table.c.location_id))
            entries[lookup.name] = {(v, i) for v, i in result}
    stored: dict[str, set[tuple[str, int]]] = {lookup.name: set() for lookup in LOOKUPS}
    for shard in SHARD_IDS:
        async with engines[shard].connect() as conn:
            result = await conn.execute(select(_LOCATIONS.c.id, *(lk.column for lk in LOOKUPS)))
            for location_id, *values in result:
                for lookup, value in zip(LOOKUPS, values):
                    if value is not None:
                        stored[lookup.name].add((value, location_id))
    return entries, stored


def _differences(entries: Mapping[str, set[tuple[str, int]]], stored: Mapping[str, set[tuple[str, int]]]) -> pd.DataFrame:
    rows = []
    for lookup in LOOKUPS:
        have, need = entries[lookup.name], stored[lookup.name]
        for value, location_id in sorted(need - have):
            rows.append((lookup.name, value, location_id, shard_for_id(location_id), "missing"))
        for value, location_id in sorted(have - need):
            rows.append((lookup.name, value, location_id, shard_for_id(location_id), "stale"))
        if lookup.unique:
            holders: dict[str, list[int]] = {}
            for value, location_id in need:
                holders.setdefault(value, []).append(location_id)
            for value, ids in sorted(holders.items()):
                if len(ids) > 1:
                    for location_id in sorted(ids):
                        rows.append((lookup.name, value, location_id, shard_for_id(location_id), "duplicate"))
    frame = pd.DataFrame(rows, columns=_COLUMNS)
    return frame.sort_values(["lookup", "value", "location_id", "problem"], ignore_index=True)


async def verify(engines: Mapping[str, AsyncEngine]) -> pd.DataFrame:
    """Compare every lookup with the rows the shards hold; one row per difference.

    ``problem`` is ``missing`` (a row has the value, the lookup has no entry:
    queries would skip that row), ``stale`` (an entry whose row does not hold
    the value: a wasted shard visit) or ``duplicate`` (a unique value held by
    several rows, written behind shardlib's back). An empty frame means they agree.
    Read-only; run it while writers are active and an in-flight write may show
    as ``stale`` (its entry is written before its row).
    """
    entries, stored = await _read_all(engines)
    return _differences(entries, stored)


async def repair(engines: Mapping[str, AsyncEngine]) -> pd.DataFrame:
    """Make every lookup match the shards: add missing entries, delete stale ones.

    Returns what it found (:func:`verify`'s frame, with a ``repaired`` column).
    ``duplicate`` values (and their missing entries) are not repaired (which row keeps the station is
    yours to decide): they stay in the frame with ``repaired=False``, and the
    rows keep their entries. A stale entry is deleted only after its row is
    read again, in the same transaction, with the value's lock held (the
    write ticket on SQLite, advisory locks on PostgreSQL), so an entry
    written ahead of its row by a running writer is not mistaken for stale.
    """
    from .locking import take_write_ticket
    from .session import make_sessionmaker

    Session = make_sessionmaker({s: engines[s] for s in SHARD_IDS}, check_schema=False, info={MAINTENANCE: False})
    async with Session() as session:
        def go(sync_session: Session) -> pd.DataFrame:
            take_write_ticket(sync_session)
            lookup_conn = _session_connection(sync_session, COUNTER_SHARD)
            owners = lambda shard: _session_connection(sync_session, shard)  # noqa: E731
            entries = {lk.name: {(v, i) for v, i in lookup_conn.execute(select(lk.table.c.value, lk.table.c.location_id))}
                       for lk in LOOKUPS}
            stored: dict[str, set[tuple[str, int]]] = {lk.name: set() for lk in LOOKUPS}
            for shard in SHARD_IDS:
                for location_id, *values in owners(shard).execute(select(_LOCATIONS.c.id, *(lk.column for lk in LOOKUPS))):
                    for lookup, value in zip(LOOKUPS, values):
                        if value is not None:
                            stored[lookup.name].add((value, location_id))
            frame = _differences(entries, stored)
            duplicated = {(r.lookup, r.value) for r in frame.itertuples(index=False) if r.problem == "duplicate"}
            repaired = []
            for row in frame.itertuples(index=False):
                lookup = BY_NAME[row.lookup]
                if (row.lookup, row.value) in duplicated:
                    repaired.append(False)  # which row keeps the value is the owner's decision
                elif row.problem == "missing":
                    if lookup.unique and lookup_conn.execute(
                            select(lookup.table.c.location_id).where(lookup.table.c.value == row.value)).first():
                        lookup_conn.execute(update(lookup.table).where(lookup.table.c.value == row.value)
                                            .values(location_id=row.location_id))
                    else:
                        _insert_ignore(lookup_conn, lookup.table, [{"value": row.value, "location_id": row.location_id}])
                    repaired.append(True)
                elif row.problem == "stale":
                    shard = shard_for_id(row.location_id)
                    if shard is not None:
                        _lock_values(owners(shard), [advisory_key(lookup, row.value)])
                    repaired.append(bool(remove_entries([(lookup, row.value, row.location_id)], lookup_conn, owners)))
                else:
                    repaired.append(False)
            frame["repaired"] = pd.Series(repaired, dtype=bool)
            return frame

        frame = await session.run_sync(go)
        await session.commit()
    return frame


__all__ = ["BY_NAME", "DuplicateLookupValue", "LookupsNotEnabled", "disable", "enable", "is_enabled", "remember", "advisory_key", "answers_for", "answers_from", "ask", "bulk_created",
           "claim_unique", "create_entries", "install", "read_entries", "remove_entries", "repair", "verify"]
