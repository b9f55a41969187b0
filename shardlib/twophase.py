"""Two-phase commit that survives crashes: a durable commit log and ``recover()``.

``make_sessionmaker(engines, twophase=True)`` makes SQLAlchemy commit in two
phases (``Session._prepare_impl`` then ``SessionTransaction.commit``)::

    phase 1   PREPARE TRANSACTION '_sa_…'   on every shard the session used
    phase 2   COMMIT PREPARED '_sa_…'       on each of them, one after another

After a PREPARE the shard has promised to commit if asked, durably: the
prepared transaction survives a crash of its server and keeps its row locks
until someone says COMMIT PREPARED or ROLLBACK PREPARED. SQLAlchemy alone
writes the decision to commit nowhere. A coordinator (your process) killed
between the phases leaves every shard prepared and nobody knowing whether the
transaction had been decided; killed after some COMMIT PREPAREDs, it leaves a
transaction committed on some shards and in doubt on others.

What this module adds (the design of Citus's ``pg_dist_transaction`` and its
maintenance daemon, and of Vitess's transaction watchdog):

1. **The decision is logged.** After every PREPARE succeeded and *before the
   first* COMMIT PREPARED, one short transaction inserts a row per participant
   into ``shardlib_commit_log`` (its prepared-transaction id, its shard, the
   global transaction id, ``decision='commit'``) and commits with
   ``synchronous_commit`` on. That commit *is* the decision: from then on the
   transaction must commit everywhere. When every participant has committed
   the rows are deleted (a failed delete is harmless: ``recover`` tidies).
2. **A decided transaction is never rolled back.** If a COMMIT PREPARED fails
   (its server died), SQLAlchemy leaves that shard prepared (it counts the
   transaction as finished) and, leaving the session, would send ROLLBACK
   PREPARED to the shards not yet committed: a half-committed transaction.
   Here, for a decided id, it sends COMMIT PREPARED instead (roll forward), and
   if that fails too the shard stays prepared for :func:`recover`.
3. **:func:`recover` finishes what crashes left.** It lists every shard's
   ``pg_prepared_xacts``, commits those whose decision is logged, and rolls
   back the others (presumed abort), but only those older than ``min_age``:
   a younger one may belong to a coordinator that is still running (and
   would otherwise race it for the same COMMIT PREPARED).

Who wins a race: ``recover`` rolls back only after inserting an *abort* row
for that id into the same table, whose primary key is the prepared id. The
coordinator's *commit* row and recover's *abort* row cannot both exist: the
first to commit wins, the other gets a unique violation (the coordinator then
rolls back everywhere and raises :class:`DecisionRefused`; ``recover`` then
commits). Abort rows are kept for
``TOMBSTONE_RETENTION_S``; a coordinator refuses to log a decision later than
``DECISION_DEADLINE_S`` after its first PREPARE, so an abort row always
outlives any coordinator that could still try to commit that id.

Where the log lives: by default in the database of the id counter's shard
(``COUNTER_SHARD``). Every writing session already depends on that database
for its ids, so the log adds no new single point of failure, and its writes
are as durable as that server (``scripts/pg.sh`` keeps ``fsync`` on). It may
be a participant: that is safe (its prepared transaction and the decision are
both durable on the same disk), but while that server is down no in-doubt
transaction can be resolved. ``make_sessionmaker(..., commit_log_engine=engine)``
puts the log elsewhere, e.g. on a replicated coordinator database, as Citus
does (then pass the same ``commit_log_engine=`` to :func:`recover`).
``commit_log_engine=False`` turns all of this off: SQLAlchemy's two-phase
commit alone, for comparison (it half-commits after a phase-2 failure).

When ``recover`` runs: in the background, every ``interval`` seconds
(:func:`recovery_task`), and once when an application starts. Not inside
``make_sessionmaker``: that function is synchronous and cheap, and runs in
every process; a crash of one coordinator must be repaired while the others
keep running, which only a periodic task does (Citus's maintenance daemon runs
it every ``citus.recover_2pc_interval``, 1 minute by default).

Observing the protocol: :func:`watch` calls a function at each protocol
point (``"prepare"``, ``"decide"``, ``"logged"``, ``"commit"``,
``"committed"``); :mod:`shardlib.crashlab` uses it to kill a coordinator at a
named point.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import Column, DateTime, MetaData, String, Table, bindparam, delete, event, func, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction

from .shards import COUNTER_SHARD, SHARD_IDS

log = logging.getLogger(__name__)

COMMIT = "commit"
ABORT = "abort"

DEFAULT_MIN_AGE_S = 30.0
"""Prepared transactions younger than this are left alone by :func:`recover`:
their coordinator may still be between its two phases."""

TOMBSTONE_RETENTION_S = 24 * 3600.0
"""How long :func:`recover` keeps an abort row after rolling its id back."""

DECISION_DEADLINE_S = TOMBSTONE_RETENTION_S / 2
"""A coordinator that reaches its decision later than this after its first
PREPARE rolls back instead (see the module docstring: races)."""

_LOCK_KEY = 0x5AD1AB2C  # pg_advisory_lock key: one recover() at a time per log database

log_metadata = MetaData()
commit_log = Table(
    "shardlib_commit_log",
    log_metadata,
    Column("xid", String, primary_key=True, comment="the participant's prepared-transaction id"),
    Column("shard", String, nullable=False),
    Column("global_id", String, nullable=False, comment="global id shared by all participants"),
    Column("decision", String, nullable=False, comment="'commit' or 'abort'"),
    Column("decided_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
)
"""One row per participant of a decided transaction (or per aborted orphan)."""

PROTOCOL_POINTS = ("prepare", "decide", "logged", "commit", "committed")
"""Where :func:`watch` observers are called, in protocol order."""


class DecisionRefused(RuntimeError):
    """The commit decision could not be logged: the transaction rolls back everywhere."""


# ------------------------------------------------------------- protocol observers

Observer = Callable[[str, dict[str, Any]], None]
_observers: list[Observer] = []


@contextmanager
def watch(observer: Observer) -> Iterator[None]:
    """Call ``observer(point, details)`` at each protocol point while the block runs.

    ``details`` has ``shard`` and ``xid`` (for ``prepare`` and ``commit``,
    the participant about to run that statement), ``done`` (participants
    already through this phase) and ``participants`` (``{shard: xid}``, known
    from ``decide`` on). Raising from the observer aborts the commit at that
    point, as a crash would, but in-process.
    """
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


def _notify(point: str, **details: Any) -> None:
    for observer in list(_observers):
        observer(point, details)


# ------------------------------------------------------------- the log

def _create_log_table(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        # two processes creating the table at once would collide in pg_type
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY + 1})
    log_metadata.create_all(connection, checkfirst=True)


@dataclass(eq=False)
class CommitLog:
    """Where decisions are written, and the shard of every participating engine."""

    engine: AsyncEngine
    shards: dict[Engine, str]
    _created: bool = False

    def ensure_table(self, connection: Connection) -> None:
        if not self._created:
            _create_log_table(connection)
            self._created = True

    def log_commit(self, transaction_id: str, participants: Mapping[str, str]) -> None:
        """Durably record the decision to commit (one short transaction)."""
        try:
            with self.engine.sync_engine.begin() as connection:
                self.ensure_table(connection)
                connection.execute(
                    insert(commit_log),
                    [dict(xid=xid, shard=shard, global_id=transaction_id, decision=COMMIT)
                     for shard, xid in participants.items()],
                )
        except IntegrityError as error:
            raise DecisionRefused(
                f"transaction {transaction_id} on {', '.join(map(repr, participants))}: "
                f"recover() already decided to roll back one of {sorted(participants.values())} "
                f"(it was prepared longer than min_age ago); rolling back everywhere"
            ) from error
        except Exception as error:
            raise DecisionRefused(
                f"transaction {transaction_id} on {', '.join(map(repr, participants))}: the "
                f"commit decision could not be written to the commit log on "
                f"{self.engine.url.render_as_string(hide_password=True)!r} "
                f"({type(error).__name__}: {error}); rolling back everywhere"
            ) from error

    def forget(self, participants: Mapping[str, str]) -> None:
        """Delete the rows of a transaction every participant committed."""
        try:
            with self.engine.sync_engine.begin() as connection:
                connection.execute(delete(commit_log).where(commit_log.c.xid.in_(list(participants.values()))))
        except Exception as error:  # harmless: recover() deletes rows of finished transactions
            log.warning("commit log rows of %s not deleted (%s); recover() will", participants, error)


def commit_log_for(engines: Mapping[str, AsyncEngine], commit_log_engine: AsyncEngine | None = None) -> CommitLog:
    """The :class:`CommitLog` for a ``twophase=True`` sessionmaker over ``engines``.

    Installs, on every shard engine, the listeners that log the decision and
    roll forward a decided transaction (idempotent).
    """
    log_engine = commit_log_engine if commit_log_engine is not None else engines[COUNTER_SHARD]
    result = CommitLog(log_engine, {engines[s].sync_engine: s for s in SHARD_IDS})
    for engine in result.shards:
        _install(engine)
    return result


# ------------------------------------------------------------- one commit

@dataclass(eq=False)
class _Commit:
    """The state of one session transaction's two-phase commit."""

    log: CommitLog
    transaction_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    prepared: dict[str, str] = field(default_factory=dict)  # shard -> xid, in PREPARE order
    committed: list[str] = field(default_factory=list)
    first_prepare: float | None = None
    decided: bool = False


_by_connection: weakref.WeakKeyDictionary[Connection, _Commit] = weakref.WeakKeyDictionary()
_by_transaction: weakref.WeakKeyDictionary[SessionTransaction, _Commit] = weakref.WeakKeyDictionary()
_decided_xids: set[str] = set()  # this process's decided, not yet committed prepared ids
_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def _shard(state: _Commit, connection: Connection) -> str:
    return state.log.shards.get(connection.engine, str(connection.engine.url.database))


@event.listens_for(Session, "after_begin")
def _track(session: Session, transaction: SessionTransaction, connection: Connection) -> None:
    commit_log_ = session.info.get("shardlib.commit_log")
    if commit_log_ is None or not session.twophase:
        return
    root = transaction
    while root.parent is not None:
        root = root.parent
    state = _by_transaction.get(root)
    if state is None:
        state = _by_transaction[root] = _Commit(commit_log_)
    _by_connection[connection] = state


@event.listens_for(Session, "after_commit")
def _forget(session: Session) -> None:
    transaction = session.get_transaction()
    state = _by_transaction.pop(transaction, None) if transaction is not None else None
    if state is None or not state.decided:
        return
    _notify("committed", participants=dict(state.prepared), done=len(state.committed))
    _decided_xids.difference_update(state.prepared.values())
    state.log.forget(state.prepared)


def _on_prepare(connection: Connection, xid: str) -> None:
    state = _by_connection.get(connection)
    if state is None:
        return
    shard = _shard(state, connection)
    if state.first_prepare is None:
        state.first_prepare = time.monotonic()
    _notify("prepare", shard=shard, xid=xid, done=len(state.prepared))
    state.prepared[shard] = xid


def _on_commit(connection: Connection, xid: str, is_prepared: bool) -> None:
    state = _by_connection.get(connection)
    if state is None or not is_prepared:
        return
    shard = _shard(state, connection)
    if not state.decided:
        participants = dict(state.prepared)
        _notify("decide", participants=participants, done=len(participants))
        waited = time.monotonic() - (state.first_prepare or time.monotonic())
        try:
            if waited > DECISION_DEADLINE_S:
                raise DecisionRefused(
                    f"transaction {state.transaction_id} on {', '.join(map(repr, participants))}: "
                    f"{waited:.0f} s since its first PREPARE (limit DECISION_DEADLINE_S = "
                    f"{DECISION_DEADLINE_S:.0f} s); recover() may have rolled a participant back"
                )
            state.log.log_commit(state.transaction_id, participants)
        except DecisionRefused:
            # SQLAlchemy counts this participant's transaction as finished once its commit
            # raised, and would leave it prepared (holding its locks until recover()):
            # roll it back here; leaving the session rolls back the others
            try:
                connection.engine.dialect.do_rollback_twophase(connection, xid, True)
            except Exception as error:
                log.warning("%s on %s left prepared for recover(): %s", xid, shard, error)
            raise
        state.decided = True
        _decided_xids.update(participants.values())
        _notify("logged", participants=participants, done=0)
    _notify("commit", shard=shard, xid=xid, done=len(state.committed), participants=dict(state.prepared))
    state.committed.append(shard)


def _install(engine: Engine) -> None:
    """Listen to one shard engine's two-phase events; make its rollback respect decisions."""
    if engine in _installed:
        return
    _installed.add(engine)
    event.listen(engine, "prepare_twophase", _on_prepare)
    event.listen(engine, "commit_twophase", _on_commit)
    dialect = engine.dialect
    rollback = dialect.do_rollback_twophase
    commit = dialect.do_commit_twophase

    def do_rollback_twophase(connection: Connection, xid: Any, is_prepared: bool = True,
                             recover: bool = False) -> None:
        """SQLAlchemy rolls back what is left after a failed COMMIT PREPARED; a decided
        transaction must commit instead (roll forward), or stay prepared for recover()."""
        if not (is_prepared and xid in _decided_xids):
            try:
                return rollback(connection, xid, is_prepared, recover)
            except DBAPIError as error:
                if not _gone(error):
                    raise
                # recover() rolled it back already (its abort row refused our decision)
                dialect.do_rollback(connection.connection)
                return None
        try:
            commit(connection, xid, True, recover)
            _decided_xids.discard(xid)
        except Exception as error:
            log.warning("decided transaction %s left prepared for recover(): %s", xid, error)

    dialect.do_rollback_twophase = do_rollback_twophase  # type: ignore[method-assign]


# ------------------------------------------------------------- recovery

RECOVER_COLUMNS = ["shard", "xid", "age_s", "decision", "action"]


async def _prepared_on(engine: AsyncEngine) -> list[tuple[str, float]]:
    async with engine.connect() as conn:
        rows = await conn.execute(text(
            "SELECT gid, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts "
            "WHERE database = current_database() ORDER BY prepared"
        ))
        return [(gid, float(age)) for gid, age in rows]


def _gone(error: DBAPIError) -> bool:
    """The prepared transaction named in a COMMIT/ROLLBACK PREPARED no longer exists."""
    return getattr(error.orig, "sqlstate", None) == "42704" or "does not exist" in str(error.orig)


async def _finish(engine: AsyncEngine, xid: str, decision: str) -> str:
    """COMMIT PREPARED or ROLLBACK PREPARED ``xid``; say what happened."""
    verb = "COMMIT" if decision == COMMIT else "ROLLBACK"
    async with engine.connect() as conn:
        await conn.execution_options(isolation_level="AUTOCOMMIT")
        try:
            await conn.execute(text(f"{verb} PREPARED :xid").bindparams(bindparam("xid", xid, literal_execute=True)))
        except DBAPIError as error:
            if _gone(error):
                return "already finished by another process"
            raise
    return "committed" if decision == COMMIT else "rolled back"


async def recover(
    engines: Mapping[str, AsyncEngine],
    *,
    min_age: float = DEFAULT_MIN_AGE_S,
    commit_log_engine: AsyncEngine | None = None,
    tombstone_retention: float = TOMBSTONE_RETENTION_S,
) -> pd.DataFrame:
    """Finish every prepared transaction a crash left behind, on every shard.

    A prepared transaction (``pg_prepared_xacts``) made by SQLAlchemy (id
    ``_sa_…``) and older than ``min_age`` seconds is committed if the commit
    log holds the decision to commit it, and rolled back otherwise (after an
    abort row is logged, so a late coordinator cannot commit it). Younger
    ones are skipped (their coordinator may be running); ids not made by
    SQLAlchemy are reported and left alone. A shard that cannot be reached is
    reported and skipped: its transactions wait for the next run. Rows of
    finished transactions are deleted from the log.

    Idempotent, and safe to run in several processes at once: each run holds
    an advisory lock on the log database, and every COMMIT/ROLLBACK PREPARED
    that finds its id already gone is reported as such.

    Returns one row per prepared transaction seen: ``shard``, ``xid``,
    ``age_s``, ``decision`` (logged, or ``None``) and ``action``.
    """
    log_engine = commit_log_engine if commit_log_engine is not None else engines[COUNTER_SHARD]
    if log_engine.dialect.name != "postgresql":
        return pd.DataFrame(columns=RECOVER_COLUMNS)  # SQLite has no PREPARE TRANSACTION
    rows: list[dict[str, Any]] = []
    async with log_engine.connect() as lock:
        await lock.execution_options(isolation_level="AUTOCOMMIT")
        await lock.run_sync(_create_log_table)
        await lock.execute(text("SELECT pg_advisory_lock(:k)"), {"k": _LOCK_KEY})
        try:
            await _recover_locked(engines, lock, min_age, tombstone_retention, rows)
        finally:
            await lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
    return pd.DataFrame(rows, columns=RECOVER_COLUMNS)


async def _recover_locked(engines: Mapping[str, AsyncEngine], lock: Any, min_age: float,
                          tombstone_retention: float, rows: list[dict[str, Any]]) -> None:
    listed = await asyncio.gather(*(_prepared_on(engines[s]) for s in SHARD_IDS), return_exceptions=True)
    reachable: dict[str, set[str]] = {}
    for shard, found in zip(SHARD_IDS, listed):
        if isinstance(found, BaseException):
            rows.append(dict(shard=shard, xid=None, age_s=None, decision=None,
                             action=f"unreachable ({type(found).__name__}): retry later"))
            continue
        reachable[shard] = {xid for xid, _ in found}
        for xid, age in found:
            row = dict(shard=shard, xid=xid, age_s=round(age, 1), decision=None, action="")
            rows.append(row)
            if not xid.startswith("_sa_"):
                row["action"] = "left alone: not made by SQLAlchemy"
                continue
            if age < min_age:
                row["action"] = f"skipped: younger than min_age={min_age:g} s (may be running)"
                continue
            decision = (await lock.execute(select(commit_log.c.decision).where(commit_log.c.xid == xid))).scalar()
            if decision is None:  # presumed abort, but only if no coordinator logs a commit first
                await lock.execute(
                    text("INSERT INTO shardlib_commit_log (xid, shard, global_id, decision) "
                         "VALUES (:x, :s, 'recover()', :d) ON CONFLICT (xid) DO NOTHING"),
                    {"x": xid, "s": shard, "d": ABORT},
                )
                decision = (await lock.execute(select(commit_log.c.decision).where(commit_log.c.xid == xid))).scalar_one()
                row["decision"] = decision if decision == COMMIT else "none (presumed abort)"
            else:
                row["decision"] = decision
            row["action"] = await _finish(engines[shard], xid, decision)
            reachable[shard].discard(xid)
    # tidy the log: rows whose prepared transaction is gone from a reachable shard
    logged = (await lock.execute(select(
        commit_log.c.xid, commit_log.c.shard, commit_log.c.decision,
        func.extract("epoch", func.now() - commit_log.c.decided_at),
    ))).all()
    for xid, shard, decision, age in logged:
        if shard not in reachable or xid in reachable[shard]:
            continue
        keep_for = min_age if decision == COMMIT else tombstone_retention
        if float(age) >= keep_for:
            await lock.execute(delete(commit_log).where(commit_log.c.xid == xid))


async def prepared_transactions(engines: Mapping[str, AsyncEngine]) -> pd.DataFrame:
    """Every shard's ``pg_prepared_xacts`` (this database's), one row each:
    ``shard``, ``xid``, ``prepared`` (when), ``age_s``. Empty on SQLite."""
    rows = []
    for shard in SHARD_IDS:
        if engines[shard].dialect.name != "postgresql":
            continue
        async with engines[shard].connect() as conn:
            found = await conn.execute(text(
                "SELECT gid, prepared, extract(epoch FROM now() - prepared)::float8 FROM pg_prepared_xacts "
                "WHERE database = current_database() ORDER BY prepared"))
            rows += [dict(shard=shard, xid=gid, prepared=when, age_s=round(age, 1)) for gid, when, age in found]
    return pd.DataFrame(rows, columns=["shard", "xid", "prepared", "age_s"])


async def logged_decisions(engines: Mapping[str, AsyncEngine],
                           commit_log_engine: AsyncEngine | None = None) -> pd.DataFrame:
    """The commit log's rows: ``xid``, ``shard``, ``global_id``, ``decision``, ``decided_at``."""
    engine = commit_log_engine if commit_log_engine is not None else engines[COUNTER_SHARD]
    columns = [c.name for c in commit_log.columns]
    if engine.dialect.name != "postgresql":
        return pd.DataFrame(columns=columns)
    async with engine.begin() as conn:
        await conn.run_sync(_create_log_table)
        found = (await conn.execute(select(commit_log).order_by(commit_log.c.decided_at, commit_log.c.shard))).all()
    return pd.DataFrame([tuple(r) for r in found], columns=columns)


async def recovery_task(engines: Mapping[str, AsyncEngine], *, interval: float = 60.0,
                        min_age: float = DEFAULT_MIN_AGE_S,
                        commit_log_engine: AsyncEngine | None = None) -> None:
    """Run :func:`recover` every ``interval`` seconds until cancelled (a maintenance daemon).

    ``task = asyncio.create_task(shardlib.recovery_task(engines))`` at start-up;
    ``task.cancel()`` at shutdown. Errors are logged and the loop goes on.
    """
    while True:
        try:
            done = await recover(engines, min_age=min_age, commit_log_engine=commit_log_engine)
            acted = done[done["action"].isin(["committed", "rolled back"])]
            if len(acted):
                log.warning("recover() finished %d in-doubt transactions:\n%s", len(acted), acted)
        except Exception:
            log.exception("recover() failed; retrying in %s s", interval)
        await asyncio.sleep(interval)
