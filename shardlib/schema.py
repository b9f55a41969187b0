"""Drift detection: sessions refuse shards whose schema is not the code's.

A sharded schema is one schema in N databases, and they drift: a migration
that ran on three shards and failed on the fourth, a shard restored from last
week's backup, a new shard created by hand. Every shard records what it has
in its own ``alembic_version`` table (see :mod:`shardlib.migrations`), so
before a session touches any shard, shardlib checks that

* every shard has the code's schema head (``0004_lookups`` today), or a
  revision built on it, and
* every shard has exactly the same revisions as every other shard (an
  optional branch such as ``report_unit`` is either everywhere or nowhere),

and otherwise raises :class:`SchemaDriftError`, naming each shard and its
revisions. ``make_sessionmaker(engines, check_schema=False)`` opts out (to
look at, or repair, a drifted set of shards).

Cost: the check runs in the session's first ``after_begin`` and reads the
shards' ``alembic_version`` tables only when it has not seen them yet.
What it has seen is remembered per engine; :func:`shardlib.reset`,
:func:`shardlib.migrate` and :func:`shardlib.migrations.alembic_command`
record what they leave behind, so sessions opened afterwards run no extra
SQL (notebook traces stay as they were). A change made behind shardlib's
back (another process, raw SQL) is seen by engines created after it, or
after :func:`forget` on the running ones.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session, SessionTransaction

from .shards import SHARD_IDS

CHECK_KEY = "shardlib.check_schema"
"""``session.info[CHECK_KEY] = False`` (``make_sessionmaker(check_schema=False)``) skips the check."""

_SHARDLIB_SESSION = "shardlib.allocator"  # in the info of every session make_sessionmaker makes

_seen: weakref.WeakKeyDictionary[Engine, tuple[str, ...]] = weakref.WeakKeyDictionary()
_verified: dict[tuple[tuple[str, int], ...], tuple[Any, ...]] = {}
"""Sets of engines check() passed without reading anything: (shard, id(engine)) pairs -> weak
references to those engines (an id is only trusted while its engine is alive). Emptied whenever
what was seen changes."""


class SchemaDriftError(RuntimeError):
    """The shards are not all at the schema revision the code expects.

    ``revisions`` maps every shard to the revisions its ``alembic_version``
    holds (an empty tuple: none, e.g. tables made without migrations).
    """

    def __init__(self, expected: str, revisions: Mapping[str, tuple[str, ...]]) -> None:
        self.expected = expected
        self.revisions = dict(revisions)
        listed = "; ".join(f"{shard}={describe(revs)}" for shard, revs in self.revisions.items())
        super().__init__(
            f"shard schemas differ from this code's (every shard must have {expected!r}, or a "
            f"revision built on it, and all shards the same revisions): {listed}. Bring them in line with "
            f"`make migrate` (python -m shardlib.migrations upgrade head) or "
            f"`await shardlib.migrate(engines)`; pass check_schema=False to "
            f"make_sessionmaker() to open sessions anyway"
        )


def describe(revisions: Iterable[str]) -> str:
    """``'0001_initial'``, ``'0001_initial+0002_report_unit_expand'`` or ``'(none)'``."""
    revisions = sorted(revisions)
    return "+".join(revisions) if revisions else "(none)"


def _sync(engine: AsyncEngine | Engine) -> Engine:
    return getattr(engine, "sync_engine", engine)


def remember(engine: AsyncEngine | Engine, revisions: Iterable[str]) -> None:
    """Record the revisions a shard is known to have (called after migrating it)."""
    _seen[_sync(engine)] = tuple(sorted(revisions))
    _verified.clear()


def forget(engines: Iterable[AsyncEngine | Engine]) -> None:
    """Forget what was seen, so the next session reads ``alembic_version`` again."""
    for engine in engines:
        _seen.pop(_sync(engine), None)
    _verified.clear()


def read_revisions(connection: Connection) -> tuple[str, ...]:
    """The revisions in this database's ``alembic_version`` (sorted), ``()`` if none."""
    from alembic.runtime.migration import MigrationContext

    return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))


def problems(revisions: Mapping[str, tuple[str, ...]]) -> bool:
    """True unless all shards agree and have the code's schema head."""
    from .migrations import has_schema_head

    distinct = set(revisions.values())
    return len(distinct) != 1 or not has_schema_head(next(iter(distinct)))


def check(shards: Mapping[str, Engine], connection: Connection | None = None) -> None:
    """Raise :class:`SchemaDriftError` unless the shards agree with the code.

    Synchronous (it runs inside the session, under SQLAlchemy's greenlet);
    ``connection``, if given, is already open on one of the shards and is
    used for that shard instead of a new connection.
    """
    key = tuple((shard, id(engine)) for shard, engine in shards.items())
    verified = _verified.get(key)  # every session of a sessionmaker asks about the same engines
    if verified is not None and all(ref() is engine for ref, engine in zip(verified, shards.values())):
        return
    from .migrations import schema_head

    expected = schema_head()
    known = {shard: _seen.get(engine) for shard, engine in shards.items()}
    if all(revs is not None for revs in known.values()) and not problems(known):  # type: ignore[arg-type]
        if len(_verified) > 64:
            _verified.clear()
        _verified[key] = tuple(weakref.ref(engine) for engine in shards.values())
        return
    from .outages import ShardUnavailable

    found: dict[str, tuple[str, ...]] = {}
    for shard, engine in shards.items():
        if connection is not None and connection.engine is engine:
            found[shard] = read_revisions(connection)
        else:
            try:
                with engine.connect() as own:
                    found[shard] = read_revisions(own)
            except ShardUnavailable:
                # a shard that is down must not stop sessions that do not need it
                # (shardlib.outages); it is checked when it answers again
                continue
        _seen[engine] = found[shard]
    _verified.clear()
    if problems(found):
        raise SchemaDriftError(expected, found)


@event.listens_for(Session, "after_begin")
def _check_before_first_use(session: Session, transaction: SessionTransaction,
                            connection: Connection) -> None:
    """Every session made by :func:`shardlib.make_sessionmaker` checks its shards
    (``get_bind(shard_id=...)`` names each shard's engine) when it first connects."""
    if _SHARDLIB_SESSION in session.info and session.info.get(CHECK_KEY, True):
        binds = getattr(session, "_ShardedSession__shards", None) or {}  # what get_bind() would answer
        check({shard: binds.get(shard) or session.get_bind(shard_id=shard) for shard in SHARD_IDS}, connection)


__all__ = ["CHECK_KEY", "SchemaDriftError", "check", "describe", "forget", "read_revisions", "remember"]
