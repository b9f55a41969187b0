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
write ticket before its first write, and keeps it until its transaction
ends**. The ticket is the write lock of one more, empty SQLite file, named
after the first SQLite shard's path and kept in the system's temporary
directory (:func:`ticket_path`), so every process using the same shard
files finds the same ticket, and the data directory holds only the shards.
(Processes that share the shard files but not ``/tmp``, e.g. two containers
on one volume, would not share the ticket.) A connection of the session's own takes it with
``BEGIN IMMEDIATE`` (wait up to the busy timeout for the file's write lock)
and gives it back, after the shards have committed or rolled back, by
closing. A session holding the ticket never waits for another ticket
holder's shard lock, because there is only one ticket holder; a session
waiting for the ticket holds no write lock yet, so nobody waits for it. No
cycle can form, in one process or across processes (the lock is the file's
own lock).

Inside one process, sessions first queue on an ``asyncio.Lock`` per ticket
file and event loop, and only the head of the queue asks for the file lock.
SQLite's own busy handler *polls* (it sleeps 1, 2, 5, ... up to 100 ms between
attempts), so thirty sessions polling one file hand the lock over slowly and
unfairly; the asyncio queue hands it over at once, in arrival order. The file
lock still orders sessions of different processes.

The ticket file is not a shard: ``shardlib.trace(engines)`` shows only the
SQL the shards ran, exactly as before. To watch the ticket, trace its engine
too: ``shardlib.trace({"ticket": shardlib.locking.ticket_engine(session.sync_session)})``.

The id counter (:mod:`shardlib.ids`) fits the same order: the ticket is
taken before ids are allocated, so the counter's short transaction on
``north_america`` (or the session's own connection there) only ever waits
for a transaction that waits for nothing.

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
deadlock there). In-memory SQLite shards take none either: every connection
to ``:memory:`` is a database of its own, nobody else can lock it.

What it covers, and what not
----------------------------
* every flush that writes (ORM ``add``/change/``delete``, autoflush included),
  and every ``insert()``/``update()``/``delete()`` run through the session;
* **not** ``session.execute(text("INSERT ..."))``: a text statement does not
  say it writes. Take the ticket yourself first::

      await session.run_sync(shardlib.take_write_ticket)

* two sessions writing at the same time *in one task* (flush in one, then
  flush in the other before the first commits): the second waits for a
  ticket that only the first's commit would give back, and fails after the
  busy timeout with :class:`shardlib.ShardLockTimeout`. Commit one before
  writing with the next (on one SQLite file this was always a deadlock);
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
``SQLITE_BUSY_SNAPSHOT``, raised as :class:`shardlib.ShardConflict` naming
the shard. The transaction read stale data and must run again, which
:func:`shardlib.run_transaction` does. (Because an upgrade never waits, it
can never be part of a deadlock either.)

Switching it off
----------------
``make_sessionmaker(engines, info={"shardlib.write_ticket": False})`` makes
sessions that take no ticket (to show the deadlock it prevents).
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only

from .conflicts import ShardConflict, ShardLockTimeout, install_error_names
from .shards import SHARD_IDS

ENABLED_KEY = "shardlib.write_ticket"
"""``session.info`` key; ``False`` switches the write ticket off for that session."""

def ticket_path(shard_database: str) -> Path:
    """The ticket file for shards whose first SQLite file is ``shard_database``::

        /tmp/shardlib-write-ticket-<hash of the shard file's absolute path>.db
    """
    key = hashlib.sha256(str(Path(shard_database).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"shardlib-write-ticket-{key}.db"

DEFAULT_WAIT_S = 30.0
"""Busy timeout for the ticket when the shard engine does not say (see engines.py)."""

_HELD = "shardlib.write_ticket_held"  # _Held: transaction, connection, queue lock

_ticket_engines: weakref.WeakKeyDictionary[Engine, AsyncEngine] = weakref.WeakKeyDictionary()
_queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, asyncio.Lock]] = (
    weakref.WeakKeyDictionary()
)


class _Held:
    """What a session holds while it has the ticket; releases it exactly once,
    also if the session is garbage-collected without being closed."""

    def __init__(self, transaction: SessionTransaction, queue: asyncio.Lock | None) -> None:
        self.transaction = transaction
        self.queue = queue
        self.connection: Connection | None = None
        self._finalizer: weakref.finalize | None = None

    def watch(self, session: Session) -> None:
        if self.queue is not None:
            loop = asyncio.get_running_loop()
            self._finalizer = weakref.finalize(session, _unlock_soon, loop, self.queue)

    def release(self) -> None:
        try:
            if self.connection is not None:
                self.connection.close()  # ends BEGIN IMMEDIATE (a rollback: it wrote nothing)
        finally:
            self.connection = None
            if self._finalizer is not None:
                self._finalizer.detach()
                self._finalizer = None
            if self.queue is not None:
                _unlock(self.queue)
                self.queue = None


def _unlock(queue: asyncio.Lock) -> None:
    if queue.locked():
        queue.release()


def _unlock_soon(loop: asyncio.AbstractEventLoop, queue: asyncio.Lock) -> None:
    """From a garbage collection, which may run in any thread: unlock on the loop."""
    try:
        loop.call_soon_threadsafe(_unlock, queue)
    except RuntimeError:  # the loop is closed: nobody is left to wait on this queue
        pass


def _queue_for(engine: Engine) -> asyncio.Lock | None:
    """This event loop's FIFO queue for ``engine``'s ticket, or ``None`` outside asyncio."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    return _queues.setdefault(loop, {}).setdefault(str(engine.url.database), asyncio.Lock())


def ticket_engine(session: Session) -> Engine | None:
    """The engine of ``session``'s ticket file, or ``None`` when no ticket is needed
    (no file-backed SQLite shard)."""
    for shard in SHARD_IDS:
        bind = session.get_bind(shard_id=shard)
        if bind.dialect.name != "sqlite":
            continue
        database = bind.url.database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        engine = _ticket_engines.get(bind)
        if engine is None:
            wait_s = float(getattr(bind, "shardlib_lock_wait_s", None) or DEFAULT_WAIT_S)
            path = ticket_path(database)
            # NullPool: closing the connection really closes it, releasing the lock
            engine = create_async_engine(f"sqlite+aiosqlite:///{path}", poolclass=NullPool,
                                         connect_args={"timeout": wait_s})
            engine.sync_engine.shardlib_lock_wait_s = wait_s  # type: ignore[attr-defined]
            install_error_names(engine.sync_engine, "write_ticket", wait_s)
            _ticket_engines[bind] = engine
        return engine.sync_engine
    return None


def holds_write_ticket(session: Session) -> bool:
    """Does ``session``'s current transaction hold the write ticket?"""
    held = session.info.get(_HELD)
    return held is not None and held.transaction is session.get_transaction()


def take_write_ticket(session: Session) -> None:
    """Take the SQLite write ticket for ``session``'s transaction (no-op if held).

    Called by shardlib before a session's first write; call it yourself
    before writing with ``text()`` SQL: ``await session.run_sync(take_write_ticket)``.
    Waits up to the busy timeout; raises :class:`shardlib.ShardLockTimeout`
    (retryable) if the ticket stayed taken that long.
    """
    if session.info.get(ENABLED_KEY) is False or holds_write_ticket(session):
        return
    engine = ticket_engine(session)
    if engine is None:  # servers lock rows; in-memory files are private
        return
    _release(session)  # a ticket left from an earlier transaction (should not happen)
    wait_s = float(getattr(engine, "shardlib_lock_wait_s", DEFAULT_WAIT_S))
    why = (f"while taking shardlib's SQLite write ticket ({engine.url.database}): every "
           f"shardlib session takes it before its first write, so that writers never "
           f"deadlock across shards (see shardlib.locking)")
    held = _Held(session.get_transaction() or session.begin(), _queue_for(engine))
    try:
        if held.queue is not None:  # first in line in this process ...
            try:
                await_only(asyncio.wait_for(held.queue.acquire(), wait_s))
            except TimeoutError:
                held.queue = None  # never acquired
                raise ShardLockTimeout(
                    f"the write ticket stayed taken by another session of this process for "
                    f"{wait_s:g} s\n{why}; the transaction is safe to run again "
                    f"(shardlib.run_transaction)", shard="write_ticket", code="TICKET_TIMEOUT",
                    statement=None, params=None, orig=TimeoutError()) from None
            held.watch(session)
        held.connection = engine.connect()  # ... then first among processes
        held.connection.exec_driver_sql("BEGIN IMMEDIATE")
    except BaseException as error:
        held.release()
        if isinstance(error, ShardConflict) and error.db_code != "TICKET_TIMEOUT":
            error.add_detail(why)
        raise
    session.info[_HELD] = held


def _release(session: Session) -> None:
    held = session.info.pop(_HELD, None)
    if held is not None:
        held.release()


def _flush_writes(session: Session) -> bool:
    if session.new or session.deleted:
        return True
    return any(session.is_modified(obj) for obj in session.dirty)


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    """First before_flush listener: take the ticket before ids are allocated."""
    if _flush_writes(session):
        take_write_ticket(session)


def _before_dml(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        take_write_ticket(state.session)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    """The shards have committed or rolled back: give the ticket back."""
    if transaction.parent is None:
        _release(session)


def install(session_class: type[Session]) -> None:
    """Make every session of ``session_class`` take the write ticket (see above):
    before every other ``before_flush`` listener, before ORM DML statements."""
    event.listen(session_class, "before_flush", _before_flush, insert=True)
    event.listen(session_class, "do_orm_execute", _before_dml, insert=True)
    event.listen(session_class, "after_transaction_end", _after_transaction_end)


__all__ = ["ENABLED_KEY", "holds_write_ticket", "install", "take_write_ticket", "ticket_engine",
           "ticket_path"]
