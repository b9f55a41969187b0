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

Waiting for locks, bounded
--------------------------
``lock_timeout=`` (seconds) bounds how long any statement waits for a lock
held by another transaction. On SQLite it is the busy timeout (default
``SQLITE_BUSY_TIMEOUT_S``); on PostgreSQL it is the server's ``lock_timeout``
setting, sent when each connection opens (default ``PG_LOCK_TIMEOUT_S``).
That bound is what ends a deadlock between shards, which no single server can
see (see :mod:`shardlib.conflicts`)::

    engines = make_engines(lock_timeout=2)      # give up after 2 s of waiting

A statement that waited that long raises :class:`shardlib.ShardLockTimeout`,
naming the shard; other conflicts raise :class:`shardlib.ShardConflict`.
Both are retryable: :func:`shardlib.run_transaction` runs the transaction
again. ``lock_timeout=0`` on PostgreSQL means "wait forever" (the server's
own meaning of 0), and a cross-shard deadlock then hangs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .conflicts import install_error_names
from .ids import forget_allocations
from .outages import name_outages
from .retry import watch_commits
from .catalog import Catalog, load_blocking
from .shards import COUNTER_SHARD, SHARD_IDS, ShardMap
from .shards import current as current_map

SQLITE_BUSY_TIMEOUT_S = 30
"""Default seconds a SQLite statement waits for a file lock (the busy timeout)."""

PG_LOCK_TIMEOUT_S = 10
"""Default seconds a PostgreSQL statement waits for a lock (``lock_timeout``)."""


def check_engines(mapping: Mapping[str, Any]) -> None:
    """``ValueError`` unless ``mapping`` names exactly the shards in ``SHARD_IDS``
    (:class:`ShardEngines` may also hold databases an older map named)."""
    missing = [s for s in SHARD_IDS if s not in mapping]
    unknown = [] if isinstance(mapping, ShardEngines) else sorted(str(k) for k in mapping if k not in SHARD_IDS)
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


def _lock_wait_settings(url: str, lock_timeout: float | None, kw: dict[str, Any]) -> float | None:
    """Put the lock wait into the driver's connect arguments; return it (seconds)."""
    if lock_timeout is not None and (isinstance(lock_timeout, bool) or lock_timeout < 0):
        raise ValueError(f"lock_timeout must be a number of seconds >= 0, got {lock_timeout!r}")
    connect_args = kw.setdefault("connect_args", {})
    if url.startswith("sqlite"):
        if lock_timeout is not None:
            connect_args["timeout"] = lock_timeout
        return float(connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S))
    if url.startswith("postgresql"):
        seconds = PG_LOCK_TIMEOUT_S if lock_timeout is None else lock_timeout
        milliseconds = str(round(seconds * 1000))
        if "+asyncpg" in url.split("://", 1)[0]:
            connect_args.setdefault("server_settings", {})["lock_timeout"] = milliseconds
        else:  # libpq drivers (psycopg): options="-c lock_timeout=..."
            options = connect_args.get("options", "")
            connect_args["options"] = f"{options} -c lock_timeout={milliseconds}".strip()
        return float(seconds) if seconds else None
    return lock_timeout


def make_engine(url: str, *, shard: str | None = None, lock_timeout: float | None = None,
                **kw: Any) -> AsyncEngine:
    """One async engine, with shardlib's SQLite settings when the URL is SQLite.

    ``lock_timeout`` bounds lock waits (seconds; module docstring); ``shard``
    names the engine in the errors of :mod:`shardlib.conflicts`.
    """
    wait_s = _lock_wait_settings(url, lock_timeout, kw)
    engine = create_async_engine(url, **kw)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine)
    engine.sync_engine.shardlib_lock_wait_s = wait_s  # type: ignore[attr-defined]  # read by locking
    name = shard or str(engine.url.database)
    install_error_names(engine.sync_engine, name, wait_s)
    watch_commits(engine.sync_engine, name)
    return engine


class ShardEngines(dict[str, AsyncEngine]):
    """``make_engines()``'s result: ``{database: AsyncEngine}`` for every database
    in the current shard map, plus the :attr:`catalog` the map is stored in.

    When a session finds a newer map in the catalog (:meth:`refresh`), a
    database it names for the first time gets its engine here, and every
    session made by :func:`shardlib.make_sessionmaker` over these engines can
    use it (:attr:`sync_shards` is the live dict the sessions are given).
    """

    def __init__(self, engines: Mapping[str, AsyncEngine], *, catalog: Catalog | None,
                 factory: Any) -> None:
        super().__init__(engines)
        self.catalog = catalog
        self._factory = factory
        self.sync_shards: dict[str, Any] = {name: e.sync_engine for name, e in engines.items()}
        self.data_dir: Path | None = None
        self._ensured_for: ShardMap | None = None  # the map ensure() last saw

    def ensure(self, shard_map: ShardMap) -> list[str]:
        """Make engines for databases of ``shard_map`` that have none yet; return their names."""
        added = []
        for name, url in shard_map.databases.items():
            if name not in self:
                engine = self._factory(name, url)
                self[name] = engine
                self.sync_shards[name] = engine.sync_engine
                added.append(name)
        self._ensured_for = shard_map  # only once every engine exists
        return added

    async def drop_others(self, shard_map: ShardMap) -> list[str]:
        """Dispose of the engines of databases ``shard_map`` does not name (after a
        reset to the default map); return their names."""
        gone = [name for name in self if name not in shard_map.databases]
        for name in gone:
            self.sync_shards.pop(name, None)
            await self.pop(name).dispose()
        return gone

    def refresh(self) -> ShardMap:
        """Activate the catalog's current map if it changed (cheap otherwise; see
        :mod:`shardlib.catalog`) and make engines for new databases."""
        if self.catalog is None:
            return current_map()
        shard_map = self.catalog.refresh()
        if shard_map is not self._ensured_for:  # a new map: once, not on every statement
            self.ensure(shard_map)
        return shard_map


def make_engines(
    urls: Mapping[str, str] | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    lock_timeout: float | None = None,
    catalog_url: str | None = None,
    **engine_kw: Any,
) -> ShardEngines:
    """One ``AsyncEngine`` per database of the shard map, which is read from the catalog.

    ``urls`` (or ``$SHARDLIB_URLS``) picks real servers; otherwise each database
    is a SQLite file ``<data_dir>/<database>.db``, ``data_dir`` defaulting to
    ``$SHARDLIB_DATA_DIR`` or ``shard_data`` under the working directory.
    The catalog (:mod:`shardlib.catalog`) is ``<data_dir>/catalog.db`` with SQLite;
    with servers ``catalog_url``, ``$SHARDLIB_CATALOG_URL`` or the counter's
    database. A database the map names but ``urls`` does not (one added by a
    move) is opened at the URL the map stores for it.
    ``lock_timeout``: seconds a statement may wait for a lock (module docstring).
    """
    if urls is None and os.environ.get("SHARDLIB_URLS", "").strip():
        urls = parse_urls(os.environ["SHARDLIB_URLS"])
    directory: Path | None = None
    if urls is None:
        directory = Path(data_dir or os.environ.get("SHARDLIB_DATA_DIR") or "shard_data")
        directory.mkdir(parents=True, exist_ok=True)
        catalog = Catalog(catalog_url) if catalog_url else Catalog.for_sqlite_dir(directory)
    else:
        urls = dict(urls)
        catalog_url = catalog_url or os.environ.get("SHARDLIB_CATALOG_URL", "").strip() or None
        counter_url = urls.get(COUNTER_SHARD, "")
        if catalog_url is None and counter_url.startswith("sqlite"):
            database = counter_url.split("///", 1)[1] if "///" in counter_url else ""
            if database and database != ":memory:":  # a file: the catalog goes beside it
                catalog_url = f"sqlite:///{Path(database).parent / 'catalog.db'}"
        elif catalog_url is None and counter_url:
            catalog_url = counter_url  # a server: beside the id counter
        catalog = Catalog(catalog_url) if catalog_url else None  # in-memory: the map stays in code
    try:
        shard_map = load_blocking(catalog) if catalog is not None else current_map()
    except (OSError, DBAPIError) as error:
        raise RuntimeError(
            f"cannot read the shard map from its catalog at {catalog.url if catalog else None!r}: "
            f"{error!r}. Without it this process cannot know which database stores each continent; "
            f"start the catalog's server, or point SHARDLIB_CATALOG_URL at it") from error

    def url_for(name: str, stored: str | None, shard_map: ShardMap = shard_map) -> str:
        if urls is not None and name in urls:
            return urls[name]
        if stored:
            return stored
        if directory is not None:
            return f"sqlite+aiosqlite:///{directory / f'{name}.db'}"
        raise ValueError(f"the shard map (version {shard_map.version}) names database {name!r}, "
                         f"which has no URL in the map or in SHARDLIB_URLS; add {name}=<url>")

    def factory(name: str, stored: str | None) -> AsyncEngine:
        engine = make_engine(url_for(name, stored), shard=name, lock_timeout=lock_timeout,
                             **{**engine_kw, "connect_args": dict(engine_kw.get("connect_args", {}))})
        name_outages(engine, name)  # a shard that is down fails fast, named (shardlib.outages)
        return engine

    if urls is not None:
        unknown = [k for k in urls if k not in shard_map.databases]
        missing = [d for d, stored in shard_map.databases.items() if d not in urls and not stored]
        if unknown or missing:
            check_engines({k: v for k, v in urls.items() if k not in missing})  # names them all
    engines = ShardEngines({}, catalog=catalog, factory=factory)
    engines.data_dir = directory  # SQLite files live here; None with servers
    engines.ensure(shard_map)
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

    catalog = getattr(engines, "catalog", None)
    if catalog is not None:  # back to the default map, before the shards are rebuilt for it
        await engines.drop_others(await catalog.reset())  # type: ignore[attr-defined]
    check_engines(engines)
    for shard in SHARD_IDS:  # a database only an older map named is emptied when it is added again
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
    for engine in list(engines.values()):
        await engine.dispose()
    catalog = getattr(engines, "catalog", None)
    if catalog is not None:
        await catalog.dispose()
