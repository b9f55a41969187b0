"""A shard server that is down: fail fast, and say which shard.

With one server per shard, one of them can be down while the others run.
What shardlib promises then:

* statements that do not need that shard keep working (routing sends them
  elsewhere; nothing connects to the dead shard);
* a statement that needs it fails within ``CONNECT_TIMEOUT_S`` seconds (a
  server that is up but not answering, e.g. stopped or unreachable, would
  otherwise keep asyncpg waiting 60 s) with :class:`ShardUnavailable`, whose
  message and ``.shard`` name the shard and its address; a server that stops
  answering in the middle of a statement, within ``STATEMENT_TIMEOUT_S``;
* a pooled connection that dies under a statement (the server crashed) is
  discarded by the pool and reported the same way; the next statement
  reconnects, or fails fast while the server is down.

:func:`shardlib.gather` runs each shard in its own task, so its error is the
first failing shard's :class:`ShardUnavailable`.

The id counter's shard (``COUNTER_SHARD``) down
-----------------------------------------------
New ``WeatherLocation`` rows need ids from the counter. Each process holds a
block of ids (hi/lo, ``shardlib.ids``): while its block lasts, inserts on
every *other* shard go on. When it runs out, a flush that needs ids raises
:class:`ShardUnavailable` naming the counter's shard, before any row is
written. Reads, updates, deletes and reports for existing locations never
touch the counter. That is a single point of failure for inserts, as in the
seed. What production systems do instead:

* a sequence per shard (ids that carry their shard, e.g. ``make_id`` with a
  per-shard counter): each shard's inserts depend on that shard only;
* bigger blocks held ahead of time (hi/lo with a refill in the background
  when half is used), so a counter outage lasts longer than any block;
* ids made without coordination: Snowflake-style (time + machine + sequence),
  UUIDv7 / ULID.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

CONNECT_TIMEOUT_S = 5.0
"""Seconds a new connection to a PostgreSQL shard may take before the shard counts as down."""

STATEMENT_TIMEOUT_S = 120.0
"""Seconds one statement may wait for a PostgreSQL shard's answer (asyncpg's
``command_timeout``) before the connection is dropped and the shard counts as
down: a server that hangs (stopped, or its host unreachable with the TCP
connection still open) never answers, and without a bound the statement
would wait forever. Generous, because a slow statement is not an outage;
lower it where statements are known to be short (tests use 1 s)."""


class ShardUnavailable(ConnectionError):
    """A shard's server could not be reached. ``.shard`` names it; ``__cause__`` is the driver's error."""

    def __init__(self, shard: str, address: str, error: BaseException, when: str) -> None:
        super().__init__(
            f"shard {shard!r} is unavailable ({address}): {when}: {type(error).__name__}: {error}. "
            f"Statements that need only the other shards still run; this one needs {shard!r}"
        )
        self.shard = shard
        self.address = address


def _address(engine: Any) -> str:
    url = engine.url
    return f"{url.host}:{url.port}/{url.database}" if url.host else str(url.database)


def name_outages(engine: AsyncEngine, shard: str, connect_timeout: float | None = None) -> None:
    """Make ``engine``'s connection failures raise :class:`ShardUnavailable` naming ``shard``.

    Installs two listeners on the engine: ``do_connect`` (bounds the connect
    time for asyncpg to ``connect_timeout``, by default ``CONNECT_TIMEOUT_S``
    as it is when the connection is made; wraps a failed connect) and
    ``handle_error`` (a statement that lost its connection).
    """
    sync_engine = engine.sync_engine
    address = _address(sync_engine)
    asyncpg = sync_engine.dialect.driver == "asyncpg"

    @event.listens_for(sync_engine, "do_connect")
    def _connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
        if asyncpg:
            cparams.setdefault("timeout", CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout)
            cparams.setdefault("command_timeout", STATEMENT_TIMEOUT_S)
        try:
            return dialect.connect(*cargs, **cparams)
        except Exception as error:
            raise ShardUnavailable(shard, address, error, "connect failed") from error

    @event.listens_for(sync_engine, "handle_error")
    def _lost(context: Any) -> None:
        if context.is_disconnect and not context.is_pre_ping:
            error = context.original_exception
            timed_out = any(isinstance(e, TimeoutError) for e in (error, error.__cause__, error.__context__))
            when = ("no answer within the statement timeout (outages.STATEMENT_TIMEOUT_S)" if timed_out
                    else "connection lost during a statement")
            raise ShardUnavailable(shard, address, error, when) from context.sqlalchemy_exception
