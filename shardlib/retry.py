"""Run a transaction function again when it loses a conflict: ``run_transaction``.

Concurrent transactions sometimes collide, and the database settles it by
failing one of them (:mod:`shardlib.conflicts` lists how). The loser did
nothing wrong; run again a moment later it will usually succeed. Retrying
by hand is easy to get subtly wrong, so shardlib follows CockroachDB's
``run_transaction``: you write the transaction as a function of a session,
and the helper owns the session, the commit and the retries::

    async def book_reading(session):
        tokyo = await session.get(WeatherLocation, tokyo_id)
        tokyo.reports.append(Report(21.5))
        return tokyo.id

    location_id = await shardlib.run_transaction(Session, book_reading)

Each attempt:

1. opens a **new** session (``Session()``) and calls ``await fn(session)``;
2. commits it; on success, returns what ``fn`` returned;
3. on an error, rolls the session back and closes it, so that no lock,
   connection or half-done object survives into the next attempt;
4. retries only if :func:`shardlib.is_retryable` says the error was a lost
   conflict (SQLite busy/locked, PostgreSQL ``40001``, ``40P01``, ``55P03``,
   :class:`shardlib.ShardLockTimeout`), and fewer than ``max_attempts`` were
   made; anything else (a ``ValueError``, an ``IntegrityError``, your own
   bug) is raised at once, untouched;
5. before retrying, sleeps a random time between 0 and
   ``min(max_backoff, backoff * 2 ** (attempt - 1))`` seconds ("full
   jitter"): two transactions that collided once must not collide again in
   lockstep.

Rules for ``fn``
----------------
* It may run several times: do everything through ``session``, and keep
  side effects outside the database (sending mail, appending to a list
  outside the function) until ``run_transaction`` has returned.
* Do not commit or roll back inside it; ``session.flush()`` is fine.
* Objects it returns come from the last, committed attempt
  (``expire_on_commit=False`` in :func:`shardlib.make_sessionmaker`).

A commit that reached some shards
---------------------------------
Without two-phase commit the shards commit one after another. If a later
shard's COMMIT fails with a conflict after an earlier one has committed,
running ``fn`` again would apply its writes twice on that earlier shard. So
``run_transaction`` does not retry then: instead of the retryable error it
raises :class:`PartialCommitError` naming the shards that committed and the
one that failed (it sees COMMITs through events on its own session's
connections, named after the shards of :func:`shardlib.make_engines`; a
SQLite connection that only read does not count). With ``twophase=True`` (PostgreSQL) conflicts surface at PREPARE,
before any shard commits.
"""

from __future__ import annotations

import asyncio
import time
import contextvars
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from .conflicts import is_retryable

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 5
DEFAULT_BACKOFF_S = 0.05
DEFAULT_MAX_BACKOFF_S = 2.0

MOVED_POLL_S = 0.005
"""While a continent is being cut over to another database, how often a refused
transaction runs again (it waits for the new shard map, not for another writer)."""

MOVED_WAIT_S = 10.0
"""How long :func:`run_transaction` keeps re-running a transaction refused because its
continent is moving (:class:`shardlib.ContinentMoved`), without counting attempts: the
router-side buffering Vitess does during a traffic switch (its default window is 10 s)."""

_commits: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar(
    "shardlib_commits", default=None
)
_attempting: contextvars.ContextVar[bool] = contextvars.ContextVar("shardlib_attempting", default=False)


class PartialCommitError(SQLAlchemyError):
    """A commit failed on one shard after others had committed: not retryable.

    ``committed`` lists the shards whose COMMIT had already run (their writes
    are permanent), ``failed`` the shard whose COMMIT failed. The cause is
    chained as ``__cause__``.
    """

    def __init__(self, committed: list[str], failed: str | None, cause: BaseException) -> None:
        self.committed, self.failed = committed, failed
        super().__init__(
            f"commit failed on shard {failed!r} after {', '.join(map(repr, committed))} had "
            f"committed; the transaction is half applied, so running it again could apply it "
            f"twice there. Not retried. Check those shards, or use twophase=True "
            f"(PostgreSQL) so that a failed commit leaves every shard unchanged. Cause: "
            f"{str(cause).splitlines()[0] if str(cause) else type(cause).__name__}"
        )


def watch_commits(engine: Engine, shard: str) -> None:
    """Let :func:`run_transaction` see which shards a commit reached, under the name ``shard``.

    The COMMITs are watched on the connections of :func:`run_transaction`'s
    own sessions only (:func:`_watch_connection`): a listener on the engine
    would make every statement of every connection dispatch its events.
    """
    engine._shardlib_commit_watch = shard  # type: ignore[attr-defined]


def _record(connection: Any, *args: Any) -> None:  # runs just before the COMMIT
    log = _commits.get()
    if log is None:
        return
    if connection.dialect.name == "sqlite":  # a connection that only read commits nothing
        driver = connection.connection.driver_connection
        if not getattr(driver, "in_transaction", True):
            return
    shard = getattr(connection.engine, "_shardlib_commit_watch", None)
    if shard is not None:  # engines made by shardlib.make_engines
        log.append(shard)


@event.listens_for(Session, "after_begin")
def _watch_connection(session: Session, transaction: Any, connection: Any) -> None:
    """Inside :func:`run_transaction`, watch this connection's COMMIT (only there)."""
    if _attempting.get():
        event.listen(connection, "commit", _record)
        event.listen(connection, "commit_twophase", _record)


def _backoff_delay(attempt: int, backoff: float, max_backoff: float) -> float:
    """Full jitter: uniform in ``[0, min(max_backoff, backoff * 2**(attempt-1))]``."""
    return random.uniform(0.0, min(max_backoff, backoff * 2 ** (attempt - 1)))


async def run_transaction(
    Session: Callable[[], Any],
    fn: Callable[[Any], Awaitable[T]],
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    backoff: float = DEFAULT_BACKOFF_S,
    max_backoff: float = DEFAULT_MAX_BACKOFF_S,
    retryable: Callable[[BaseException], bool] = is_retryable,
) -> T:
    """Run ``await fn(session)`` in a fresh session and commit; retry lost conflicts.

    ``Session`` is an ``async_sessionmaker`` (e.g. from
    :func:`shardlib.make_sessionmaker`). Returns ``fn``'s result. Raises the
    last error when it is not retryable or ``max_attempts`` attempts failed.
    See the module docstring for the rules ``fn`` must follow.
    """
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or max_attempts < 1:
        raise ValueError(f"max_attempts must be an int >= 1, got {max_attempts!r}")
    if backoff < 0 or max_backoff < 0:
        raise ValueError(f"backoff and max_backoff must be >= 0, got {backoff!r}, {max_backoff!r}")
    attempt = 0
    moved_since: float | None = None
    while True:
        attempt += 1
        attempting = _attempting.set(True)
        try:  # this attempt's sessions watch their COMMITs (_watch_connection)
            async with Session() as session:
                committing = False
                log: list[str] = []
                try:
                    result = await fn(session)
                    committing = True
                    token = _commits.set(log)
                    try:
                        await session.commit()
                    finally:
                        _commits.reset(token)
                    return result
                except BaseException as error:
                    await _roll_back(session, error)
                    if not isinstance(error, Exception) or not retryable(error):
                        raise
                    if committing and len(log) > 1:  # the last shard failed, the others committed
                        raise PartialCommitError(log[:-1], log[-1], error) from error
                    moving = getattr(error, "db_code", None) in ("shardlib_fenced", "shardlib_moved")
                    if moving:  # a cut-over in progress: poll for the new map, for a while
                        moved_since = moved_since if moved_since is not None else time.monotonic()
                        if time.monotonic() - moved_since < MOVED_WAIT_S:
                            attempt -= 1
                        else:
                            error.add_note(f"run_transaction: the continent was still moving after {MOVED_WAIT_S} s")
                            raise
                    elif attempt >= max_attempts:
                        error.add_note(f"run_transaction: gave up after {attempt} attempts")
                        raise
        finally:
            _attempting.reset(attempting)
        await asyncio.sleep(MOVED_POLL_S if moving else _backoff_delay(attempt, backoff, max_backoff))


async def _roll_back(session: Any, error: BaseException) -> None:
    """Roll back; a failure here must not hide the error that caused it."""
    try:
        await session.rollback()
    except Exception as rollback_error:  # e.g. the connection died with the error
        error.add_note(f"(rollback after it also failed: {rollback_error!r})")


__all__ = ["PartialCommitError", "run_transaction", "watch_commits"]
