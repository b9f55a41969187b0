"""The session: ``ShardedSession`` under asyncio, with shardlib's choosers and ids.

::

    Session = make_sessionmaker(engines)
    async with Session() as session:
        session.add(WeatherLocation("Asia", "Tokyo"))
        await session.commit()

``async_sessionmaker(sync_session_class=ShardedSession, shards=...)`` is the
asyncio spelling: the shards are the engines' ``sync_engine`` objects, used
inside the implicitly awaited internals.

Before every flush, :class:`ShardlibSession`

* validates every new or changed object **before any SQL runs**, so a batch
  with one bad continent writes nothing anywhere;
* gives new locations their global ids (:mod:`shardlib.ids`), one counter
  statement per flush at most;
* orders pending objects by shard, so the unit of work sends each shard one
  batched INSERT per table even when objects were added in interleaved order
  (it groups consecutive rows that share a connection).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from sqlalchemy import event, inspect
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.horizontal_shard import ShardedQuery, ShardedSession
from sqlalchemy.exc import MultipleResultsFound
from sqlalchemy.orm import Session, SessionTransaction
from sqlalchemy.orm.attributes import instance_state
from sqlalchemy.orm.exc import StaleDataError

from . import execution, guards, locking, lookups, routing, schema, twophase, upstream
from .engines import check_engines
from .catalog import ENGINES_KEY as _ENGINES
from .catalog import refresh_map
from .ids import allocator_for
from .models import Report, WeatherLocation
from .shards import (COUNTER_SHARD, SHARD_BITS, SHARD_IDS, check_shard_id, make_id, shard_for_continent,
                     shard_for_id, slot_for_continent, slot_of_id)

GC_PAUSE_MIN_OBJECTS = 1000
"""Batches of at least this many objects pause the cyclic GC (see ``_gc_paused_for``)."""

_CONNECTED = "shardlib.connected_shards"
_CONNECTIONS = "shardlib.flush_connections"


@contextmanager
def _gc_paused_for(object_count: int) -> Iterator[None]:
    """Pause Python's cyclic garbage collector while many objects are handled.

    Every ORM object is tracked by the cyclic GC, and each full collection
    re-scans all of them: with tens of thousands of new objects, collections
    triggered by the session's own allocations cost a fifth to a third of a
    flush. Reference counting keeps freeing memory meanwhile; cycles wait
    until the block ends. Small batches, or a GC already paused, are left alone.
    """
    if object_count < GC_PAUSE_MIN_OBJECTS or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class ShardlibSession(ShardedSession):
    """A ``ShardedSession`` that allocates global ids, validates before flushing, guards
    every write path and answers multi-shard statements exactly or refuses
    (:mod:`shardlib.execution`)."""

    def __init__(self, shard_chooser: Any, identity_chooser: Any, execute_chooser: Any,
                 shards: dict[str, Any], query_cls: Any = ShardedQuery, **kw: Any) -> None:
        """``ShardedSession.__init__`` without its per-session ``do_orm_execute`` hook.

        That hook would run every statement a second time through the session
        (``invoke_statement``); shardlib's class-level hook
        (:func:`shardlib.execution.execute`) routes every statement itself, and
        runs a one-shard statement once, in place. Registering an event on a
        session *instance* also gives each session its own copy of the event
        dispatcher, which cost more than creating the rest of the session.
        """
        Session.__init__(self, query_cls=query_cls, **kw)
        self.shard_chooser = shard_chooser
        self.identity_chooser = identity_chooser
        self.execute_chooser = execute_chooser
        self._ShardedSession__shards: dict[str, Any] = dict(shards)  # what bind_shard() fills

    def get_bind(self, mapper: Any = None, *, shard_id: Any = None, instance: Any = None,
                 clause: Any = None, **kw: Any) -> Any:
        if shard_id is None and mapper is None and instance is None:
            raise ValueError(
                "no shard given: a sharded session cannot guess which database you mean; "
                "pass bind_arguments={'shard_id': ...} with one of "
                + ", ".join(map(repr, SHARD_IDS))
            )
        if shard_id is not None:
            check_shard_id(shard_id)
        return super().get_bind(mapper, shard_id=shard_id, instance=instance, clause=clause, **kw)

    def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        """``Session.get``; a primary key found on several shards names them.

        With shardlib's choosers, a location id names its shard: ``get()`` asks
        that shard directly (``identity_token``), which is what the choosers
        would answer (one identity-map token, one shard for ``WHERE id = ...``)
        without analysing the SELECT that ``get()`` builds.
        """
        if kw.get("identity_token") is None and entity is WeatherLocation and self._own_choosers():
            if _ENGINES in self.info:
                refresh_map(self)  # the id's database in the catalog's current map, as execute() would
            shard = routing.shard_named_by_id(ident)
            if shard is not None:
                kw["identity_token"] = shard
        try:
            return super().get(entity, ident, **kw)
        except MultipleResultsFound:
            kw.pop("identity_token", None)
            found = [s for s in SHARD_IDS if ShardedSession.get(self, entity, ident, identity_token=s, **kw) is not None]
            raise MultipleResultsFound(
                f"{getattr(entity, '__name__', entity)} {ident!r} exists on {len(found)} shards "
                f"({', '.join(map(repr, found))}): its ids are shard-local. Ask one shard with "
                f"session.get({getattr(entity, '__name__', entity)}, {ident!r}, identity_token=...) "
                f"with one of {', '.join(map(repr, found))}, or select it through its location"
            ) from None

    def add_all(self, instances: Any) -> None:
        """Add many objects; as in :meth:`flush`, a big batch pauses the cyclic GC."""
        instances = list(instances)
        with _gc_paused_for(len(instances)):
            super().add_all(instances)

    def flush(self, objects: Any = None) -> None:
        """Flush; a big flush runs with Python's cyclic garbage collector paused
        (see :func:`_gc_paused_for`). An UPDATE or DELETE that found its row gone
        because the row's continent moved to another database meanwhile raises
        the retryable :class:`shardlib.ContinentMoved`, not ``StaleDataError``."""
        if objects is None and self._is_clean():  # autoflush before every query: nothing to do
            return
        # a failed flush rolls back and expires them: note which rows it was changing
        changing = [s.key for s in (*self.identity_map._modified, *self._deleted) if s.key is not None]
        try:
            if len(self._new) < GC_PAUSE_MIN_OBJECTS:  # autoflush before every query: keep it cheap
                super().flush(objects)
            else:
                with _gc_paused_for(len(self._new)):
                    super().flush(objects)
        except StaleDataError as error:
            moved = _moved_since_loaded(changing)
            if moved is None:
                raise
            raise moved from error

    def _own_choosers(self) -> bool:
        return (self.identity_chooser is routing.identity_chooser
                and self.execute_chooser is routing.execute_chooser)

    def connection_callable(self, mapper: Any = None, instance: Any = None, shard_id: Any = None,
                            **kw: Any) -> Any:
        """The flush asks for a connection once per row; answer from a per-transaction cache."""
        if shard_id is None:
            token = instance_state(instance).identity_token if instance is not None else None
            shard_id = token or self._choose_shard_and_assign(mapper, instance)
        transaction = self.get_transaction()
        if transaction is None:
            return super().connection_callable(mapper, instance, shard_id=shard_id, **kw)
        cache = self.info.setdefault(_CONNECTIONS, {})
        key = (id(transaction), shard_id)
        connection = cache.get(key)
        if connection is None:
            connection = cache[key] = transaction.connection(mapper, shard_id=shard_id)
        return connection




@event.listens_for(ShardlibSession, "after_begin")
def _remember_connection(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    session.info.setdefault(_CONNECTED, set()).add(connection.engine)


@event.listens_for(ShardlibSession, "after_transaction_end")
def _forget_connections(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_CONNECTED, None)
        session.info.pop(_CONNECTIONS, None)


_ALLOCATED: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
"""Objects whose id shardlib allocated, and that id (to re-allocate after a rollback)."""


def _counter_connection(session: Session) -> Any:
    """The session's own connection to the counter's database when it must be used.

    SQLite locks the whole file: if this session already holds the counter's
    shard in its transaction, a second connection would wait for it forever
    (see shardlib.ids). Servers lock rows: the allocator's own short
    transaction is always safe there.
    """
    allocator = _allocator(session)
    if allocator.engine.dialect.name == "sqlite" and allocator.engine in session.info.get(_CONNECTED, ()):
        return session.connection(bind_arguments={"shard_id": COUNTER_SHARD})
    return None


def _allocator(session: Session) -> Any:
    allocator = session.info.get("shardlib.allocator")
    if allocator is None:
        raise RuntimeError("session was not made by shardlib.make_sessionmaker()")
    return allocator


def allocate_ids(session: Session, count: int) -> list[int]:
    """``count`` fresh global sequence numbers for this session (one counter statement at most)."""
    return _allocator(session).allocate(count, own_connection=_counter_connection(session))


def reserve_ids(session: Session, numbers: list[int]) -> None:
    """Record explicit sequence numbers in the counter (see ``IdAllocator.reserve``)."""
    _allocator(session).reserve(numbers, own_connection=_counter_connection(session))


def _loaded_keys(states: Any) -> list[Any]:
    """Identity keys of loaded ``states``; a report counts as its location, loaded from the
    same database (a report lives with its location)."""
    keys = []
    for state in states:
        key = state.key
        if key is None:
            continue
        if key[0] is Report:
            location_id = state.committed_state.get("location_id", state.dict.get("location_id"))
            if location_id is None:
                continue
            key = (WeatherLocation, (location_id,), key[2])
        keys.append(key)
    return keys


def _moved_since_loaded(keys: list[Any]) -> Any:
    """A :class:`~shardlib.resharding.ContinentMoved` if a changed or deleted
    location (identity ``keys``) was loaded from a database that no longer
    stores its continent.

    Asked before every flush (after the shard map is refreshed) and again if a
    flush fails with ``StaleDataError``: an UPDATE or DELETE sent to the old
    database is fenced there, and after the move's clean-up it matches nothing,
    which SQLAlchemy reports for an UPDATE but only *warns* about for a DELETE,
    so a delete would silently not happen."""
    from .resharding import ContinentMoved

    for key in keys:
        if key[0] is not WeatherLocation:
            continue
        location_id, loaded_from = key[1][0], key[2]
        now = shard_for_id(location_id)
        if now is not None and now != loaded_from:
            return ContinentMoved(
                f"WeatherLocation {location_id} was loaded from {loaded_from!r}, but its continent is now stored on "
                f"{now!r} (the shard map changed during this transaction); nothing was written. "
                f"The transaction is safe to run again (shardlib.run_transaction does)",
                shard=loaded_from, code="shardlib_moved", statement=None, params=None, orig=None)
    return None


def _check_stays_on_its_shard(obj: Any) -> None:
    """A stored row cannot change shard by UPDATE: refuse before any SQL."""
    state = inspect(obj)
    if state.key is None:
        return
    stored_on = state.key[2]
    if isinstance(obj, WeatherLocation):
        new_id = state.dict.get("id", state.key[1][0])
        if new_id != state.key[1][0]:
            raise ValueError(
                f"{obj!r} is stored on {stored_on!r} under id {state.key[1][0]}; its id cannot "
                f"change (an id names its shard, and get() looks for it there). Use "
                f"await shardlib.move_location(session, location, continent) to re-home it"
            )
        if "continent" not in state.dict:
            return
        wanted = shard_for_continent(obj.continent)
        # logical shards, not databases: a move of the continent between loading and
        # flushing changes the database, and the fence there answers (shardlib.resharding)
        if slot_for_continent(obj.continent) != slot_of_id(state.key[1][0]):
            raise ValueError(
                f"{obj!r} is stored on {stored_on!r}; continent {obj.continent!r} "
                f"belongs on {wanted!r}. A row cannot change shard by UPDATE: use "
                f"await shardlib.move_location(session, location, {obj.continent!r})"
            )
    elif isinstance(obj, Report):
        # only a changed parent matters; history is read without loading anything
        moved_to = [loc for loc in state.attrs.location.history.added if loc is not None]
        if moved_to:
            location, wanted = moved_to[0], routing.shard_of(moved_to[0])
            new_id = moved_to[0].id
            new_slot = slot_of_id(new_id) if new_id is not None else slot_for_continent(moved_to[0].continent)
        elif state.attrs.location_id.history.added:
            location, wanted = obj.location_id, shard_for_id(obj.location_id)
            new_slot = slot_of_id(obj.location_id) if isinstance(obj.location_id, int) else None
        else:
            return
        old_id = state.committed_state.get("location_id", state.dict.get("location_id"))
        same_logical_shard = (isinstance(old_id, int) and new_slot is not None
                              and slot_of_id(old_id) == new_slot and wanted is not None)
        if not same_logical_shard and wanted != stored_on:
            raise ValueError(
                f"{obj!r} is stored on {stored_on!r} with its old location; its new location "
                f"{location!r} is stored on {wanted!r}. A report lives on its location's shard, "
                f"so it cannot be re-pointed across shards: delete it and add a new Report to "
                f"the new location's reports"
            )


@event.listens_for(ShardlibSession, "before_flush")
def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    refresh_map(session)
    moved = _moved_since_loaded(_loaded_keys([*session.identity_map._modified, *session._deleted]))
    if moved is not None:  # its UPDATE or DELETE would go to the old database: refuse before any SQL
        raise moved
    new = [instance_state(o) for o in session.new]
    shard_index: dict[Any, int] = {}
    needs_id = []
    explicit: list[int] = []
    for state in new:  # 1. validate everything first: nothing is written on error
        obj = state.obj()
        shard = routing.shard_of(obj, state)
        if isinstance(obj, WeatherLocation):
            location_id = state.dict.get("id")
            if location_id is not None and _ALLOCATED.get(obj) == location_id:
                # shardlib gave this id in a flush that was rolled back: the counter may
                # hand the number out again (SQLite in-session allocation), so take a new one
                location_id = state.dict["id"] = None
            if location_id is None:
                needs_id.append(state)
            else:
                guards.check_explicit_id(repr(obj), location_id, obj.continent, shard)
                explicit.append(location_id)
        shard_index[state] = SHARD_IDS.index(shard)
        state.identity_token = shard  # ShardedSession reads it instead of asking again
    for obj in session.dirty:
        _check_stays_on_its_shard(obj)

    if explicit:  # 2. explicit ids are recorded in the counter, which then never hands them out
        reserve_ids(session, [location_id >> SHARD_BITS for location_id in explicit])
    if needs_id:  # 3. one allocation for the whole flush
        numbers = allocate_ids(session, len(needs_id))
        for state, number in zip(needs_id, numbers):
            # a pending object's INSERT reads its values from the instance dict;
            # writing there skips attribute events (this loop runs once per row)
            location_id = state.dict["id"] = make_id(number, state.dict["continent"])
            _ALLOCATED[state.obj()] = location_id

    # 4. group pending rows by shard, keeping their order within a shard
    new.sort(key=lambda s: (shard_index[s], s.insert_order or 0))
    for position, state in enumerate(new):
        state.insert_order = position


locking.install(ShardlibSession)  # SQLite write ticket around _before_flush (shardlib.locking)
lookups.install(ShardlibSession)  # lookup tables kept current, after ids are given (shardlib.lookups)

# ShardedSession concatenates (its own per-session hook); shardlib's hook, registered on the
# class, runs before it, always answers, and so replaces it: merges exactly or refuses.
event.listen(ShardlibSession, "do_orm_execute", execution.execute, retval=True)


Routing = Literal["shardlib", "upstream"]


def make_sessionmaker(
    engines: dict[str, AsyncEngine], *, routing_rules: Routing = "shardlib", **kw: Any
) -> async_sessionmaker[AsyncSession]:
    """An ``async_sessionmaker`` of sharded sessions over ``engines``.

    ``routing_rules="upstream"`` swaps in the seed example's identity and
    execute choosers (every ``get()`` and every SELECT visits all four shards)
    so the notebooks can compare; ids and validation stay shardlib's.
    ``shard_chooser=``, ``identity_chooser=`` or ``execute_chooser=`` replace
    one chooser (to experiment with your own). ``check_schema=False`` opens
    sessions even on shards whose schema revisions differ from the code's
    (:mod:`shardlib.schema`). Other keyword arguments go to
    ``async_sessionmaker`` (e.g. ``twophase=True``, whose decisions are logged
    durably, on ``commit_log_engine=`` or the counter's shard: :mod:`shardlib.twophase`;
    ``commit_log_engine=False`` leaves SQLAlchemy's two-phase commit alone, to compare).
    Once ``shardlib.lookups.enable(engines)`` has built the lookup tables, ``city``
    and ``station`` filters are routed through them; ``lookup_routing=False`` opts out
    (they are kept current either way: :mod:`shardlib.lookups`).
    """
    check_engines(engines)
    if routing_rules == "shardlib":
        choosers = dict(
            shard_chooser=routing.shard_chooser,
            identity_chooser=routing.identity_chooser,
            execute_chooser=routing.execute_chooser,
        )
    elif routing_rules == "upstream":
        choosers = dict(
            shard_chooser=routing.shard_chooser,
            identity_chooser=upstream.identity_chooser,
            execute_chooser=upstream.execute_chooser,
        )
    else:
        raise ValueError(f"unknown routing_rules {routing_rules!r}; valid: 'shardlib', 'upstream'")
    for name in ("shard_chooser", "identity_chooser", "execute_chooser"):
        if name in kw:  # your own chooser replaces one of ours
            choosers[name] = kw.pop(name)
    info: dict[str, Any] = {"shardlib.allocator": allocator_for(engines[COUNTER_SHARD].sync_engine)}
    sync_shards = getattr(engines, "sync_shards", None)  # ShardEngines: a live dict (shardlib.catalog)
    if sync_shards is not None:
        info[_ENGINES] = engines
    else:
        sync_shards = {shard: engines[shard].sync_engine for shard in SHARD_IDS}
    if kw.pop("lookup_routing", True) is False:  # city/station filters scatter even with lookups built
        info[lookups.ROUTING] = False
    if not kw.pop("check_schema", True):  # sessions refuse drifted shards (shardlib.schema)
        info[schema.CHECK_KEY] = False
    commit_log_engine = kw.pop("commit_log_engine", None)
    if kw.get("twophase") and commit_log_engine is not False:  # decisions logged (shardlib.twophase)
        info["shardlib.commit_log"] = twophase.commit_log_for(engines, commit_log_engine)
    info.update(kw.pop("info", {}))
    return async_sessionmaker(
        sync_session_class=ShardlibSession,
        expire_on_commit=kw.pop("expire_on_commit", False),
        shards=sync_shards,
        info=info,
        **choosers,
        **kw,
    )


async def move_location(session: AsyncSession, location: WeatherLocation, continent: str) -> WeatherLocation:
    """Move a stored location (and its reports) to ``continent``'s shard.

    A shard is chosen when a row is inserted; an UPDATE cannot move it. So the
    move is a delete on the old shard and an insert, under a **new id** (ids
    name their shard), on the new one. Both happen at the next commit, where
    the two shards commit separately, in no fixed order, unless the session
    uses two-phase commit (``twophase=True`` on PostgreSQL). If a failure
    there must never lose the row, commit the copy on the new shard first and
    delete the original in a second transaction: the worst case is then a
    duplicate, never a loss (notebook 08). Returns the new object.
    """
    target = shard_for_continent(continent)
    state = inspect(location)
    if state.key is None:
        raise ValueError(f"{location!r} is not stored yet; just set its continent")
    if state.key[2] == target and slot_of_id(state.key[1][0]) == slot_for_continent(continent):
        location.continent = continent
        return location
    reports = await location.awaitable_attrs.reports
    copies = [Report(r.temperature, r.report_time) for r in reports]
    await session.delete(location)
    await session.flush()
    moved = WeatherLocation(continent, location.city)
    moved.reports.extend(copies)
    session.add(moved)
    await session.flush()
    return moved


__all__ = ["ShardlibSession", "make_sessionmaker", "move_location"]
