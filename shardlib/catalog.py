"""The catalog: the shard map stored durably, with its history of versions.

The map (:class:`shardlib.shards.ShardMap`) is data, so it must live
somewhere every process can read it and nobody can lose it:

* with SQLite shards, in ``catalog.db`` beside them in the data directory;
* with servers, in the database ``$SHARDLIB_CATALOG_URL`` names, by default
  the id counter's database (``COUNTER_SHARD``), which every writer already
  depends on.

One table, ``shardlib_shard_map``, holds **every** version, never updated in
place: the current map is the row with the highest version. Publishing a
change inserts version ``n + 1``; if another process published ``n + 1``
first, the primary key refuses the second insert and the loser gets
:class:`StaleMapError` (compare-and-swap, the way etcd or ZooKeeper back
Vitess's topology)::

    catalog = engines.catalog
    shard_map = await catalog.load()                        # version 1
    await catalog.publish(shard_map.with_placement("Europe", "asia"),
                          reason="move Europe to asia")     # version 2
    await catalog.history()                                 # a DataFrame

How a process notices a new version
-----------------------------------
Every session asks :meth:`Catalog.refresh` before it routes (from shardlib's
execution hook and before each flush). On SQLite that is one ``os.stat`` of
``catalog.db`` (a commit changes the file: the catalog keeps a rollback
journal, not WAL), a few microseconds; the map is re-read only when the file
changed. On servers a query would cost a round trip per statement, so the
version is read at most every ``refresh_interval`` seconds (0.5 by default).
Between the move and that read, a stale process would write to the old
database: the **fence** there refuses the write with a retryable
:class:`shardlib.ContinentMoved` and marks the catalog stale, so the retry
routes by the new map (:mod:`shardlib.resharding`). Never a silent stray write.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, Text, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from . import shards
from .shards import DEFAULT_MAP, ShardMap

catalog_metadata = MetaData()

shard_map_table = Table(
    "shardlib_shard_map",
    catalog_metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("body", Text, nullable=False),
    Column("reason", String(200), nullable=False),
    Column("published_at", DateTime, nullable=False),
)
"""Every version of the shard map (``body``: :meth:`ShardMap.to_json`)."""

REFRESH_INTERVAL_S = 0.5
"""On servers, how often (at most) a process reads the catalog's current version."""

_CREATE_SQLITE = """CREATE TABLE IF NOT EXISTS shardlib_shard_map (
    version INTEGER PRIMARY KEY, body TEXT NOT NULL, reason VARCHAR(200) NOT NULL,
    published_at DATETIME NOT NULL)"""


class StaleMapError(RuntimeError):
    """Someone published a newer shard map first: reload and decide again."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


_OPEN: weakref.WeakSet[Catalog] = weakref.WeakSet()


def mark_all_stale() -> None:
    """Every catalog of this process reads its newest map at the next refresh."""
    for catalog in list(_OPEN):
        catalog.mark_stale()


class Catalog:
    """The shard map's durable home (module docstring)."""

    def __init__(self, url: str, *, refresh_interval: float = REFRESH_INTERVAL_S) -> None:
        _OPEN.add(self)
        self.url = url
        self.refresh_interval = refresh_interval
        self._lock = threading.Lock()
        self._stamp: Any = None          # SQLite: the file's (mtime, size, inode) when last read
        self._checked_at = float("-inf")  # servers: monotonic time of the last version read
        self._stale = False
        self._map: ShardMap | None = None  # the map this catalog last activated
        self.path: Path | None = None
        self._engine: AsyncEngine | None = None
        if url.startswith("sqlite"):
            database = url.split("///", 1)[1] if "///" in url else ""
            if not database or database == ":memory:":
                raise ValueError(f"a catalog must be durable: give a file, not {url!r}")
            self.path = Path(database)

    # ---------------------------------------------------------------- opening
    @classmethod
    def for_sqlite_dir(cls, data_dir: str | os.PathLike[str]) -> Catalog:
        return cls(f"sqlite:///{Path(data_dir) / 'catalog.db'}")

    @property
    def engine(self) -> AsyncEngine:
        """The async engine on a server catalog (made on first use, in the caller's loop)."""
        if self._engine is None:
            self._engine = create_async_engine(self.url, pool_size=2, max_overflow=2)
        return self._engine

    async def dispose(self) -> None:
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    # ---------------------------------------------------------------- SQLite
    def _sqlite(self) -> sqlite3.Connection:
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=DELETE")  # a commit changes catalog.db itself
        conn.execute(_CREATE_SQLITE)
        return conn

    def _sqlite_stamp(self) -> Any:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _sqlite_latest(self) -> tuple[int, str] | None:
        conn = self._sqlite()
        try:
            row = conn.execute("SELECT version, body FROM shardlib_shard_map "
                               "ORDER BY version DESC LIMIT 1").fetchone()
        finally:
            conn.close()
        return (int(row[0]), row[1]) if row else None

    def _sqlite_publish(self, new: ShardMap, reason: str, *, expected: int | None) -> None:
        conn = self._sqlite()
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT max(version) FROM shardlib_shard_map").fetchone()
            latest = row[0] or 0
            if expected is not None and latest != expected:
                conn.execute("ROLLBACK")
                raise StaleMapError(f"the catalog is at version {latest}, not {expected}: another "
                                    f"change was published first; reload the map and try again")
            conn.execute("INSERT INTO shardlib_shard_map (version, body, reason, published_at) "
                         "VALUES (?, ?, ?, ?)", (new.version, new.to_json(), reason[:200],
                                                 _now().isoformat(sep=" ")))
            conn.execute("COMMIT")
        finally:
            conn.close()

    def _sqlite_reset(self, first: ShardMap) -> None:
        conn = self._sqlite()
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM shardlib_shard_map")
            conn.execute("INSERT INTO shardlib_shard_map (version, body, reason, published_at) "
                         "VALUES (?, ?, ?, ?)", (first.version, first.to_json(), "reset",
                                                 _now().isoformat(sep=" ")))
            conn.execute("COMMIT")
        finally:
            conn.close()

    # ---------------------------------------------------------------- servers (sync, in a greenlet)
    def _server_latest_sync(self, connection: Any) -> tuple[int, str] | None:
        catalog_metadata.create_all(connection, checkfirst=True)
        row = connection.execute(select(shard_map_table.c.version, shard_map_table.c.body)
                                 .order_by(shard_map_table.c.version.desc()).limit(1)).first()
        return (int(row[0]), row[1]) if row else None

    # ---------------------------------------------------------------- the API
    async def load(self) -> ShardMap:
        """The current map (version 1, the default, is written if the catalog is empty),
        activated for this process."""
        if self.path is not None:
            return self._load_sqlite()
        async with self.engine.begin() as conn:
            latest = await conn.run_sync(self._server_latest_sync)
            if latest is None:
                await conn.execute(insert(shard_map_table).values(
                    version=DEFAULT_MAP.version, body=DEFAULT_MAP.to_json(),
                    reason="initial map", published_at=_now()))
                latest = (DEFAULT_MAP.version, DEFAULT_MAP.to_json())
        self._checked_at = time.monotonic()
        return self._activate(*latest)

    def _load_sqlite(self) -> ShardMap:
        """:meth:`load` for a SQLite catalog: synchronous, so usable outside an event loop."""
        latest = self._sqlite_latest()
        if latest is None:
            self._sqlite_publish(DEFAULT_MAP, "initial map", expected=0)
            latest = self._sqlite_latest()
        self._stamp = self._sqlite_stamp()
        assert latest is not None
        return self._activate(*latest)

    def _activate(self, version: int, body: str) -> ShardMap:
        current = shards.current()
        if current.version == version and current.to_json() == body:
            shard_map = current
        else:
            shard_map = ShardMap.from_json(version, body)
            shards.activate(shard_map)
        self._map = shard_map
        self._stale = False
        return shard_map

    def use(self) -> ShardMap:
        """Route this process by the map this catalog last read (no I/O): for a
        process that works with two sets of shards in turn, e.g. tests."""
        if self._map is None:
            raise RuntimeError("this catalog has not been read yet: await catalog.load()")
        shards.activate(self._map)
        return self._map

    def mark_stale(self) -> None:
        """The next :meth:`refresh` reads the catalog (a fence said the map moved on)."""
        self._stale = True

    def refresh(self, connection_factory: Any = None) -> ShardMap:
        """Activate the catalog's current map if it changed; cheap when it did not.

        Runs in synchronous code (session hooks). On servers it needs a
        greenlet context (inside an ``AsyncSession`` call), where the async
        engine can be used synchronously."""
        if self._map is not None and shards.current() is not self._map:
            shards.activate(self._map)  # another catalog's map was active (two worlds, one process)
        if self.path is not None:
            stamp = self._sqlite_stamp()
            if stamp == self._stamp and not self._stale:
                return shards.current()
            with self._lock:
                latest = self._sqlite_latest()
                self._stamp = stamp
            return self._activate(*latest) if latest else shards.current()
        now = time.monotonic()
        if not self._stale and now - self._checked_at < self.refresh_interval:
            return shards.current()
        try:
            with self.engine.sync_engine.connect() as conn:
                latest = self._server_latest_sync(conn)
                conn.commit()
        except Exception:  # the catalog's server is down: route by the last map read
            self._checked_at = now  # (fences keep that safe) and try again an interval later
            return shards.current()
        self._checked_at = now
        return self._activate(*latest) if latest else shards.current()

    async def publish(self, new: ShardMap, *, reason: str) -> ShardMap:
        """Store ``new`` as the next version (it must be exactly one newer than the
        stored current version) and activate it. :class:`StaleMapError` if another
        process published first."""
        expected = new.version - 1
        if self.path is not None:
            self._sqlite_publish(new, reason, expected=expected)
        else:
            try:
                async with self.engine.begin() as conn:
                    latest = await conn.run_sync(self._server_latest_sync)
                    if (latest[0] if latest else 0) != expected:
                        raise StaleMapError(
                            f"the catalog is at version {latest[0] if latest else 0}, not "
                            f"{expected}: another change was published first; reload and retry")
                    await conn.execute(insert(shard_map_table).values(
                        version=new.version, body=new.to_json(), reason=reason[:200],
                        published_at=_now()))
            except IntegrityError:
                raise StaleMapError(f"version {new.version} was published by someone else "
                                    f"first; reload the map and try again") from None
        return self._wrote(new)

    def _wrote(self, shard_map: ShardMap) -> ShardMap:
        """After this process wrote ``shard_map`` to the catalog: route by it, and do
        not read the catalog again for it (file stamp, or the server's interval)."""
        if self.path is not None:
            self._stamp = self._sqlite_stamp()
        else:
            self._checked_at = time.monotonic()
        shards.activate(shard_map)
        self._map = shard_map
        return shard_map

    async def reset(self) -> ShardMap:
        """Forget every version; the map is :data:`~shardlib.shards.DEFAULT_MAP` again."""
        if self.path is not None:
            self._sqlite_reset(DEFAULT_MAP)
        else:
            async with self.engine.begin() as conn:
                await conn.run_sync(lambda c: catalog_metadata.create_all(c, checkfirst=True))
                await conn.execute(shard_map_table.delete())
                await conn.execute(insert(shard_map_table).values(
                    version=DEFAULT_MAP.version, body=DEFAULT_MAP.to_json(), reason="reset",
                    published_at=_now()))
        return self._wrote(DEFAULT_MAP)

    async def history(self) -> Any:
        """Every version as a DataFrame: version, reason, when, and where each continent was."""
        import pandas as pd

        if self.path is not None:
            conn = self._sqlite()
            try:
                rows = conn.execute("SELECT version, body, reason, published_at FROM "
                                    "shardlib_shard_map ORDER BY version").fetchall()
            finally:
                conn.close()
        else:
            async with self.engine.connect() as conn:
                result = await conn.execute(select(shard_map_table).order_by(shard_map_table.c.version))
                rows = [(r.version, r.body, r.reason, r.published_at) for r in result]
        records = []
        for version, body, reason, _published in rows:
            shard_map = ShardMap.from_json(int(version), body)
            records.append({"version": int(version), "reason": reason,
                            **{c: shard_map.placement[c] for c in shard_map.placement}})
        return pd.DataFrame(records)


def load_blocking(catalog: Catalog) -> ShardMap:
    """``await catalog.load()`` from synchronous code, even inside a running event
    loop (a notebook cell): on SQLite directly; on servers in a short-lived
    thread with its own loop and its own engine."""
    if catalog.path is not None:
        return catalog._load_sqlite()
    result: dict[str, Any] = {}

    def work() -> None:
        probe = Catalog(catalog.url, refresh_interval=catalog.refresh_interval)

        async def go() -> ShardMap:
            try:
                return await probe.load()
            finally:
                await probe.dispose()

        try:
            result["map"] = asyncio.run(go())
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=work, name="shardlib-catalog-load")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    catalog._checked_at = time.monotonic()
    catalog._map = result["map"]
    return result["map"]  # type: ignore[no-any-return]


ENGINES_KEY = "shardlib.engines"
"""``session.info`` key: the :class:`shardlib.engines.ShardEngines` a session was made over."""


def refresh_map(session: Any) -> None:
    """Route ``session`` by the catalog's current shard map: cheap when it has not
    changed; a database new to this session is bound to it."""
    engines = session.info.get(ENGINES_KEY)
    if engines is None or engines.catalog is None:
        return
    engines.refresh()
    known = session._ShardedSession__shards
    if len(known) != len(engines.sync_shards):
        for name, engine in engines.sync_shards.items():
            if name not in known:
                session.bind_shard(name, engine)


__all__ = ["Catalog", "ENGINES_KEY", "refresh_map", "REFRESH_INTERVAL_S", "StaleMapError", "load_blocking", "shard_map_table"]
