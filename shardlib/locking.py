"""Deadlock-free writers on SQLite shards: one write ticket, always taken first.

The deadlock
------------
SQLite locks a whole database file for writing, from a transaction's first
write until its COMMIT. Two sessions, each writing two shards in opposite
order, each flushing after every row::

    A: INSERT Tokyo  (asia: locked by A)      B: INSERT London (europe: locked by B)
    A: INSERT Paris  -> waits for europe      B: INSERT Osaka  -> waits for asia

Each waits for a lock the other holds until it commits, and neither can
commit. SQLite cannot see the cycle (it spans two files), so both wait the
whole busy timeout and at least one fails with ``database is locked``. With
30 such sessions at once, 27 failed.

The rule
--------
The classic cure is to take locks in one global order. A session cannot know
at its first flush which shards its later flushes will write, so shardlib
uses the simplest global order there is: **every shardlib session takes one
"write ticket" before its first write, and keeps it until its transaction
ends**. The ticket is the write lock of the first SQLite shard in
``SHARD_IDS`` order (``north_america``, which also holds the id counter),
taken with::

    BEGIN IMMEDIATE        -- on north_america: wait (busy timeout) for its write lock

on the session's own connection to that shard. A session holding the ticket
never waits for another ticket holder's shard lock, because there is only one
ticket holder; a session waiting for the ticket holds no write lock yet, so
nobody waits for it. No cycle can form, in one process or across processes
(the lock is the file's own lock). Trace a first write and you will see it::

    north_america  BEGIN IMMEDIATE
    asia           INSERT INTO weather_locations ...

The id counter (:mod:`shardlib.ids`) fits the same order: ids are allocated
*before* the ticket is taken (a short transaction of the allocator's own,
while the session holds no lock) or, once the session holds the ticket,
inside the session's transaction on the very connection that holds it.

The cost
--------
**Writers are serialised across all SQLite shards**: while one session is
between its first write and its commit, every other session's first write
waits, even if it writes a different shard. Readers never wait (WAL mode).
Inside one process this costs little, since the four "servers" share one CPU
and one GIL anyway; ``benchmarks/concurrent_writers.py`` measures it. Keep
write transactions short: everything between the first flush and the commit
holds the ticket. Database servers lock rows, not files, so on PostgreSQL no
ticket is taken (:mod:`shardlib.conflicts` explains what ends a cross-shard
deadlock there).

What it covers, and what not
----------------------------
* every flush that writes (ORM ``add``/change/``delete``, autoflush included),
  and every ORM-enabled ``insert()``/``update()``/``delete()`` run through the
  session;
* **not** ``session.execute(text("INSERT ..."))``: a text statement does not
  say it writes. Take the ticket yourself first::

      await session.run_sync(shardlib.take_write_ticket)

* :func:`shardlib.bulk_insert` takes no ticket and needs none: it holds one
  shard's lock at a time, so it can make others wait but never be part of a
  cycle.

Read transactions that become writers
-------------------------------------
By default Python's ``sqlite3`` (and so ``aiosqlite``) runs a SELECT outside
any transaction, so a session's earlier reads hold no snapshot. If you make
SQLite transactions begin at the first SELECT (e.g. ``BEGIN`` in a
``"begin"`` event, for repeatable reads), a read transaction must *upgrade*
to write, and in WAL mode an upgrade never waits: if another connection
committed since the snapshot began it fails at once with
``SQLITE_BUSY_SNAPSHOT``. shardlib upgrades the ticket shard eagerly (a
``DELETE ... WHERE 0`` that changes nothing) so that this happens at the
ticket, in order, raising :class:`shardlib.ShardConflict`: the transaction
read stale data and must run again, which :func:`shardlib.run_transaction`
does.

Switching it off
----------------
``make_sessionmaker(engines, info={"shardlib.write_ticket": False})`` makes
sessions that take no ticket (notebooks use it to show the deadlock).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction

from .conflicts import ShardConflict
from .models import WeatherLocation
from .shards import SHARD_IDS

ENABLED_KEY = "shardlib.write_ticket"
"""``session.info`` key; ``False`` switches the write ticket off for that session."""

_HELD = "shardlib.write_ticket_held"  # the root SessionTransaction holding the ticket
_BEGUN = "shardlib.write_ticket_begun"  # engines this root transaction has connections to


def ticket_shard(session: Session) -> str | None:
    """The shard whose write lock is the ticket: the first SQLite shard, or ``None``."""
    for shard in SHARD_IDS:
        if session.get_bind(shard_id=shard).dialect.name == "sqlite":
            return shard
    return None


def holds_write_ticket(session: Session) -> bool:
    """Does ``session``'s current transaction hold the write ticket?"""
    held = session.info.get(_HELD)
    return held is not None and held is session.get_transaction()


def _driver_in_transaction(connection: Any) -> bool:
    driver = connection.connection.driver_connection  # aiosqlite or sqlite3 Connection
    return bool(getattr(driver, "in_transaction", False))


def take_write_ticket(session: Session) -> None:
    """Take the SQLite write ticket for ``session``'s transaction (no-op if held).

    Called by shardlib before a session's first write; call it yourself
    before writing with ``text()`` SQL: ``await session.run_sync(take_write_ticket)``.
    Waits up to the ticket shard's busy timeout; raises
    :class:`shardlib.ShardLockTimeout` (retryable) naming the shard if the
    ticket stayed taken that long.
    """
    if session.info.get(ENABLED_KEY) is False or holds_write_ticket(session):
        return
    shard = ticket_shard(session)
    if shard is None:  # no SQLite shard: servers lock rows, nothing to order
        return
    connection = session.connection(bind_arguments={"shard_id": shard})
    if _driver_in_transaction(connection):
        # a read transaction (or a write shardlib did not see): upgrade it now;
        # in WAL mode this never waits, it succeeds or fails at once
        statement = f"DELETE FROM {WeatherLocation.__tablename__} WHERE 0"
    else:
        statement = "BEGIN IMMEDIATE"
    try:
        connection.exec_driver_sql(statement)
    except ShardConflict as conflict:
        conflict.add_detail(
            f"while taking shardlib's SQLite write ticket ({statement} on {shard!r}): every "
            f"shardlib session takes it before its first write, so that writers never "
            f"deadlock across shards (see shardlib.locking)"
        )
        raise
    session.info[_HELD] = session.get_transaction()


def _flush_writes(session: Session) -> bool:
    if session.new or session.deleted:
        return True
    return any(session.is_modified(obj) for obj in session.dirty)


def _ticket_shard_connected(session: Session) -> bool:
    shard = ticket_shard(session)
    return shard is not None and session.get_bind(shard_id=shard) in session.info.get(_BEGUN, ())


def _before_id_allocation(session: Session, flush_context: Any, instances: Any) -> None:
    """Runs before shardlib allocates ids. If the session already has a connection
    to the ticket shard, ids will be taken on it: take the ticket there first."""
    if _ticket_shard_connected(session) and _flush_writes(session):
        take_write_ticket(session)


def _before_flush_writes(session: Session, flush_context: Any, instances: Any) -> None:
    """Runs after validation and id allocation, before the flush's first write."""
    if _flush_writes(session):
        take_write_ticket(session)


def _before_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        take_write_ticket(state.session)


def _remember_begin(session: Session, transaction: SessionTransaction, connection: Any) -> None:
    session.info.setdefault(_BEGUN, set()).add(connection.engine)


def _forget(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None:
        session.info.pop(_HELD, None)
        session.info.pop(_BEGUN, None)


def install(session_class: type[Session]) -> None:
    """Make every session of ``session_class`` take the write ticket (see above).

    Call after the class's own ``before_flush`` listener (which allocates ids)
    is registered: one listener runs before it, one after.
    """
    event.listen(session_class, "before_flush", _before_id_allocation, insert=True)
    event.listen(session_class, "before_flush", _before_flush_writes)
    event.listen(session_class, "do_orm_execute", _before_dml, insert=True)
    event.listen(session_class, "after_begin", _remember_begin)
    event.listen(session_class, "after_transaction_end", _forget)


__all__ = ["ENABLED_KEY", "holds_write_ticket", "install", "take_write_ticket", "ticket_shard"]
