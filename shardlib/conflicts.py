"""Conflicts between concurrent transactions: which errors mean "try again".

Two transactions that want the same lock cannot both have it. A database
resolves the clash in one of a few ways, and every one of them ends with an
error in *one* transaction, whose work is rolled back, while the other goes on:

=====================  ===============================================  ==========
database               what happened                                    code
=====================  ===============================================  ==========
PostgreSQL             waited longer than ``lock_timeout``              ``55P03``
PostgreSQL             ``FOR UPDATE NOWAIT`` found the row locked       ``55P03``
PostgreSQL             the server found a deadlock among its sessions   ``40P01``
PostgreSQL             ``SERIALIZABLE``/``REPEATABLE READ`` conflict    ``40001``
SQLite                 the file stayed locked for the busy timeout      ``SQLITE_BUSY``
SQLite                 a read snapshot went stale before its first      ``SQLITE_BUSY_SNAPSHOT``
                       write (another connection committed meanwhile)
SQLite                 a table is locked inside a shared cache          ``SQLITE_LOCKED``
=====================  ===============================================  ==========

None of these says the transaction was *wrong*; run again a moment later it
will usually succeed. That is what makes them **retryable**, and it is all
:func:`shardlib.run_transaction` needs to know (:func:`is_retryable`).

Cross-shard deadlocks
---------------------
Session A writes a row on ``asia`` and then wants a row on ``europe``;
session B holds that ``europe`` row and wants A's ``asia`` row. Each server
sees only half of the cycle (one session waiting, the other idle in its
transaction), so PostgreSQL's deadlock detector never fires and both would
wait forever. ``lock_timeout`` (set on every connection by
:func:`shardlib.make_engines`) bounds the wait: after it, the waiting
statement fails with ``55P03`` and shardlib raises :class:`ShardLockTimeout`
naming the shard. On SQLite the same cycle cannot form between shardlib
sessions (:mod:`shardlib.locking` takes write locks in one global order);
what remains is waiting, bounded by the busy timeout.

What you get
------------
:func:`install_error_names` is called by :func:`shardlib.make_engines` for
every shard engine. It turns the codes above into :class:`ShardConflict`
(:class:`ShardLockTimeout` for the two "waited and gave up" cases), whose
message names the shard, says what happened, and says that a retry is safe::

    try:
        await session.commit()
    except shardlib.ShardConflict as conflict:
        print(conflict.shard, conflict.db_code)     # 'europe' '55P03'

Both are ``sqlalchemy.exc.OperationalError`` subclasses, so code that catches
SQLAlchemy's errors keeps working, and ``.orig`` is still the driver's error.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError

RETRYABLE_SQLSTATES = {
    "40001": "serialization failure",
    "40P01": "deadlock detected by the server",
    "55P03": "lock not available",
}
"""PostgreSQL SQLSTATEs after which the whole transaction may simply run again."""

SQLITE_BUSY, SQLITE_LOCKED, SQLITE_BUSY_SNAPSHOT = 5, 6, 517
"""SQLite result codes (``sqlite3.Error.sqlite_errorcode``); 517 = BUSY | (2 << 8)."""

_RETRY_ADVICE = (
    "the statement was undone and this session's transaction must be rolled back; the whole "
    "transaction is safe to run again: shardlib.run_transaction(Session, fn) rolls back, waits "
    "a little and retries"
)


class ShardConflict(OperationalError):
    """A transaction lost a conflict with a concurrent one on ``shard``: retryable.

    ``shard`` names the shard, ``db_code`` is the SQLSTATE or SQLite code name,
    ``orig`` the driver's exception. :func:`is_retryable` says ``True``.
    """

    retryable = True

    def __init__(self, message: str, *, shard: str, code: str, statement: str | None,
                 params: Any, orig: BaseException, hide_parameters: bool = False) -> None:
        # StatementError.__init__, not DBAPIError's: we choose the message.
        super(DBAPIError, self).__init__(message, statement, params, orig, hide_parameters)
        self.shard = shard
        self.db_code = code

    def _code_str(self) -> str:  # SQLAlchemy would append a link for ``code``
        return ""

    def __reduce__(self) -> Any:  # picklable, e.g. back from a worker process
        return (
            _rebuild,
            (type(self), self.args[0], self.shard, self.db_code, self.statement, self.params,
             self.orig, self.hide_parameters),
        )


class ShardLockTimeout(ShardConflict):
    """Waited the configured time for a lock on ``shard`` and gave up: retryable.

    On PostgreSQL this is ``lock_timeout`` (``55P03``), the bound that ends a
    cross-shard deadlock; on SQLite the busy timeout (``SQLITE_BUSY``).
    """


def _rebuild(cls: type[ShardConflict], message: str, shard: str, code: str, statement: Any,
             params: Any, orig: BaseException, hide: bool) -> ShardConflict:
    return cls(message, shard=shard, code=code, statement=statement, params=params, orig=orig,
               hide_parameters=hide)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def sqlstate_of(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by ``exc`` or its causes, if any."""
    for error in _chain(exc):
        for attribute in ("sqlstate", "pgcode"):
            value = getattr(error, attribute, None)
            if isinstance(value, str) and len(value) == 5:
                return value
        orig = getattr(error, "orig", None)
        if orig is not None and orig is not error:
            found = sqlstate_of(orig)
            if found:
                return found
    return None


def sqlite_code_of(exc: BaseException) -> int | None:
    """The SQLite extended result code carried by ``exc`` or its causes, if any."""
    for error in _chain(exc):
        value = getattr(error, "sqlite_errorcode", None)
        if isinstance(value, int):
            return value
        orig = getattr(error, "orig", None)
        if orig is not None and orig is not error:
            found = sqlite_code_of(orig)
            if found is not None:
                return found
    return None


def is_retryable(exc: BaseException) -> bool:
    """``True`` if ``exc`` says "a concurrent transaction won; run yours again".

    :class:`ShardConflict` and the raw codes in this module's table (for
    engines not made by :func:`shardlib.make_engines`). Anything else, an
    ``IntegrityError``, a ``ValueError`` from validation, a bug, is not: running
    it again would fail the same way, or worse, do it twice.
    """
    if isinstance(exc, ShardConflict):
        return True
    if not isinstance(exc, DBAPIError):  # not from the database: never a conflict
        return False
    if sqlstate_of(exc) in RETRYABLE_SQLSTATES:
        return True
    code = sqlite_code_of(exc)
    return code is not None and code & 0xFF in (SQLITE_BUSY, SQLITE_LOCKED)


def describe(shard: str, exc: DBAPIError, wait_s: float | None) -> ShardConflict | None:
    """The :class:`ShardConflict` for a driver error on ``shard``, or ``None``."""
    from .resharding import fence_error  # a continent that moved away (shardlib.resharding)

    moved = fence_error(shard, exc)
    if moved is not None:
        from .catalog import mark_all_stale

        mark_all_stale()  # the retry reads the catalog's newest map
        return moved
    state = sqlstate_of(exc)
    sqlite_code = sqlite_code_of(exc)
    waited = f"{wait_s:g} s" if wait_s is not None else "the configured time"
    cls: type[ShardConflict] = ShardConflict
    if state == "55P03":
        cls, code = ShardLockTimeout, state
        what = (f"gave up waiting for a lock after {waited} (PostgreSQL lock_timeout, or NOWAIT; "
                f"SQLSTATE 55P03). Another transaction holds it; when that one waits for a lock "
                f"this transaction holds on another shard, it is a cross-shard deadlock that no "
                f"single server can see, and this timeout is what ends it")
    elif state in RETRYABLE_SQLSTATES:
        code = state
        what = f"{RETRYABLE_SQLSTATES[state]} (SQLSTATE {state})"
    elif sqlite_code == SQLITE_BUSY_SNAPSHOT:
        code = "SQLITE_BUSY_SNAPSHOT"
        what = ("this transaction began reading an older version of the file and another "
                "connection has committed since, so it cannot start writing (SQLITE_BUSY_SNAPSHOT)")
    elif sqlite_code is not None and sqlite_code & 0xFF == SQLITE_BUSY:
        cls, code = ShardLockTimeout, "SQLITE_BUSY"
        what = (f"the database file stayed locked by another writer for {waited} "
                f"(SQLite busy timeout, SQLITE_BUSY: database is locked)")
    elif sqlite_code is not None and sqlite_code & 0xFF == SQLITE_LOCKED:
        code = "SQLITE_LOCKED"
        what = "a table is locked by another connection sharing the cache (SQLITE_LOCKED)"
    else:
        return None
    # the driver's own first line stays first (it is what people search for)
    return cls(f"{exc.args[0]}\nshard {shard!r}: {what}; {_RETRY_ADVICE}", shard=shard, code=code,
               statement=exc.statement, params=exc.params, orig=exc.orig,
               hide_parameters=exc.hide_parameters)


def install_error_names(engine: Engine, shard: str, wait_s: float | None) -> None:
    """Raise :class:`ShardConflict` (naming ``shard``) for conflicts on ``engine``.

    ``wait_s`` is the lock wait configured for the engine, quoted in messages.
    Idempotent per engine.
    """
    if engine.dialect.name not in ("sqlite", "postgresql"):
        return
    if getattr(engine, "_shardlib_error_names", None) == shard:
        return
    engine._shardlib_error_names = shard  # type: ignore[attr-defined]

    @event.listens_for(engine, "handle_error")
    def _name_conflict(context: Any) -> Any:
        error = context.sqlalchemy_exception
        if isinstance(error, DBAPIError) and not isinstance(error, ShardConflict):
            return describe(shard, error, wait_s)
        return None


__all__ = [
    "RETRYABLE_SQLSTATES", "ShardConflict", "ShardLockTimeout", "describe", "install_error_names",
    "is_retryable", "sqlite_code_of", "sqlstate_of",
]
