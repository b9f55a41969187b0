"""Engines: one database per shard, embedded SQLite files by default.

``make_engines()`` with no arguments gives four SQLite files in the data
directory (``$SHARDLIB_DATA_DIR``, default ``shard_data/``)::

    shard_data/north_america.db   shard_data/asia.db   ...

Open one with ``sqlite3 shard_data/asia.db`` and you will find only Asian
cities: the shards really are separate databases.

Real servers are chosen by URL, either passed in or from ``$SHARDLIB_URLS``::

    export SHARDLIB_URLS="north_america=postgresql+asyncpg://.../na,asia=...,europe=...,south_america=..."

SQLite settings: WAL journaling (readers never block the writer), a 30 s
busy timeout (a writer waits for the file lock instead of failing with
"database is locked"), and foreign keys switched on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .ids import forget_allocations
from .outages import name_outages
from .shards import COUNTER_SHARD, SHARD_IDS

SQLITE_BUSY_TIMEOUT_S = 30


def check_engines(mapping: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``mapping`` names exactly the shards in ``SHARD_IDS``."""
    missing = [s for s in SHARD_IDS if s not in mapping]
    unknown = sorted(str(k) for k in mapping if k not in SHARD_IDS)
    if missing or unknown:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(map(repr, missing))}")
        if unknown:
            problems.append(f"unknown {', '.join(map(repr, unknown))}")
        raise ValueError(
            f"shard mapping must name exactly {', '.join(map(repr, SHARD_IDS))}: "
            + "; ".join(problems)
        )


def parse_urls(text: str) -> dict[str, str]:
    """Parse ``"shard=url,shard=url"`` (the ``SHARDLIB_URLS`` format)."""
    urls: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        shard, sep, url = part.partition("=")
        if not sep or not url.strip():
            raise ValueError(
                f"bad SHARDLIB_URLS entry {part!r}; expected shard_id=url, e.g. "
                f"'asia=postgresql+asyncpg://localhost/asia'"
            )
        urls[shard.strip()] = url.strip()
    return urls


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _pragmas(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        if engine.url.database not in (None, "", ":memory:"):
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()


def make_engine(url: str, **kw: Any) -> AsyncEngine:
    """One async engine, with shardlib's SQLite settings when the URL is SQLite."""
    if url.startswith("sqlite"):
        kw.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    return engine


def make_engines(
    urls: Mapping[str, str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    **engine_kw: Any,
) -> dict[str, AsyncEngine]:
    """One ``AsyncEngine`` per shard id.

    ``urls`` (or ``$SHARDLIB_URLS``) picks real servers; otherwise each shard is
    a SQLite file ``<data_dir>/<shard_id>.db``, ``data_dir`` defaulting to
    ``$SHARDLIB_DATA_DIR`` or ``shard_data`` under the working directory.
    """
    if urls is None and os.environ.get("SHARDLIB_URLS", "").strip():
        urls = parse_urls(os.environ["SHARDLIB_URLS"])
    if urls is None:
        directory = Path(data_dir or os.environ.get("SHARDLIB_DATA_DIR") or "shard_data")
        directory.mkdir(parents=True, exist_ok=True)
        urls = {s: f"sqlite+aiosqlite:///{directory / f'{s}.db'}" for s in SHARD_IDS}
    check_engines(urls)
    engines = {shard: make_engine(urls[shard], **engine_kw) for shard in SHARD_IDS}
    for shard, engine in engines.items():
        name_outages(engine, shard)  # a shard that is down fails fast, named (shardlib.outages)
    return engines


async def reset(engines: Mapping[str, AsyncEngine], *, first_sequence_number: int = 1) -> None:
    """Drop every table on every shard, re-create them through the migrations
    (Alembic, up to the schema head) and restart the id counter.

    The counter table exists only on ``COUNTER_SHARD``. Each shard is rebuilt
    in one transaction. Afterwards every notebook and test starts from the
    same empty, deterministic state, with each shard's ``alembic_version``
    at the code's schema head (see :mod:`shardlib.migrations`).
    """
    from .migrations import rebuild  # migrations imports this module

    check_engines(engines)
    for shard in SHARD_IDS:
        await rebuild(engines[shard], shard, first_sequence_number=first_sequence_number)
    forget_allocations(engines[COUNTER_SHARD].sync_engine)


def refuse_in_doubt_transactions(conn: Connection, shard: str) -> None:
    """A prepared (two-phase) transaction nobody finished holds its locks, and
    ``DROP TABLE`` would wait for them forever: say so instead of hanging."""
    gids = (
        conn.execute(text("SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"))
    ).scalars().all()
    if gids:
        raise RuntimeError(
            f"{shard}: prepared (in-doubt) transactions {list(gids)} hold locks that "
            f"DROP TABLE would wait for forever; run await shardlib.recover(engines) (commits "
            f"those whose decision is logged, rolls back the rest) or finish each with COMMIT "
            f"PREPARED 'gid' or ROLLBACK PREPARED 'gid', and call reset() again"
        )


async def dispose(engines: Mapping[str, AsyncEngine]) -> None:
    """Close every engine's connections (end of a notebook or test)."""
    for engine in engines.values():
        await engine.dispose()
