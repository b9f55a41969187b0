"""Shared fixtures: a fresh set of four file-backed shards per test.

Async code runs on one event loop per test (``run``); engines belong to it.
With ``SHARDLIB_URLS`` set, the same tests run against those servers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from typing import Any

import pytest

import shardlib
from shardlib import Report, WeatherLocation

FIXED_TIME = datetime.datetime(2024, 1, 1, 12, 0, 0)

SEED_CITIES = [
    ("Asia", "Tokyo"),
    ("North America", "New York"),
    ("North America", "Toronto"),
    ("Europe", "London"),
    ("Europe", "Dublin"),
    ("South America", "Brasilia"),
    ("South America", "Quito"),
]


def seed_locations() -> list[WeatherLocation]:
    """The seed's seven cities, with its three reports (fixed report times)."""
    locations = {city: WeatherLocation(continent, city) for continent, city in SEED_CITIES}
    locations["Tokyo"].reports.append(Report(80.0, FIXED_TIME))
    locations["New York"].reports.append(Report(75, FIXED_TIME))
    locations["Quito"].reports.append(Report(85, FIXED_TIME))
    return list(locations.values())


@pytest.fixture(autouse=True)
def _default_shard_map() -> Iterator[None]:
    """Each test starts routing by the default map (one process, one active map:
    a test that moved a continent must not decide where the next test's rows go).
    Worlds with a catalog re-activate their own map whenever a session routes."""
    shardlib.shards.activate(shardlib.shards.DEFAULT_MAP)
    yield


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class World:
    """Engines, a sessionmaker and the loop they live on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, data_dir: str) -> None:
        self.loop = loop
        self.engines = shardlib.make_engines(data_dir=data_dir)
        self.Session = shardlib.make_sessionmaker(self.engines)
        self.run(shardlib.reset(self.engines))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(shardlib.dispose(self.engines))


@contextmanager
def standalone_world() -> Iterator[World]:
    """A World with its own loop and directory, for module-scoped fixtures."""
    loop = asyncio.new_event_loop()
    with tempfile.TemporaryDirectory() as tmp:
        world = World(loop, tmp)
        try:
            yield world
        finally:
            world.close()
    loop.close()


@pytest.fixture
def world(loop: asyncio.AbstractEventLoop, tmp_path: Any) -> Iterator[World]:
    w = World(loop, str(tmp_path / "shards"))
    yield w
    w.close()


def on_postgres() -> bool:
    return bool(os.environ.get("SHARDLIB_URLS", "").strip())


class Unsharded:
    """One ordinary database holding the same rows: the oracle.

    SQLite in memory by default; with ``SHARDLIB_ORACLE_URL`` (set by
    ``scripts/pg.sh``) the same server type as the shards, so that NULL
    ordering and collation match.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine

        self.loop = loop
        url = os.environ.get("SHARDLIB_ORACLE_URL", "").strip() if on_postgres() else ""
        self.engine = create_async_engine(url or "sqlite+aiosqlite://")

        async def create() -> None:
            async with self.engine.begin() as conn:
                await conn.run_sync(shardlib.Base.metadata.drop_all)
                await conn.run_sync(shardlib.Base.metadata.create_all)

        loop.run_until_complete(create())

    def insert(self, model: Any, rows: list[dict[str, Any]]) -> None:
        from sqlalchemy import insert

        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(insert(model), rows)

        self.loop.run_until_complete(go())

    def rows(self, statement: Any, params: Any = None) -> list[Any]:
        async def go() -> list[Any]:
            async with self.engine.connect() as conn:
                return (await conn.execute(statement, params or {})).all()

        return self.loop.run_until_complete(go())

    def rows_write(self, statement: Any, params: Any = None) -> None:
        """Run a write (UPDATE/DELETE) on the oracle and commit it."""
        async def go() -> None:
            async with self.engine.begin() as conn:
                await conn.execute(statement, params or {})

        self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.dispose())


def locations_by_shard(world: World, columns: str = "id, continent, city") -> dict[str, list[tuple[Any, ...]]]:
    """Each shard's ``(id, continent, city)`` rows (or other ``columns``), read straight
    from its engine (plain SQL, no shardlib routing): the independent reader for write tests."""
    from sqlalchemy import text

    async def go() -> dict[str, list[tuple[Any, ...]]]:
        found = {}
        for shard, engine in world.engines.items():
            async with engine.connect() as conn:
                found[shard] = [tuple(r) for r in await conn.execute(
                    text(f"SELECT {columns} FROM weather_locations ORDER BY id"))]
        return found

    return world.run(go())


@contextmanager
def loaded_world(data: list[tuple[str, str, list[float]]]) -> Iterator[tuple[World, Unsharded]]:
    """A sharded world and one unsharded database holding the same rows.

    ``data`` is ``(continent, city, temperatures)`` per location; reports get
    :data:`FIXED_TIME`. Report ids are shard-local, so the unsharded copy gets
    its own (tests compare through ``location_id``, which is global).
    """
    with standalone_world() as world:

        async def load() -> list[tuple[int, list[float]]]:
            async with world.Session() as session:
                locations = []
                for continent, city, temps in data:
                    location = WeatherLocation(continent, city)
                    location.reports.extend(Report(t, FIXED_TIME) for t in temps)
                    locations.append(location)
                session.add_all(locations)
                await session.commit()
                return [(location.id, temps) for location, (_, _, temps) in zip(locations, data)]

        stored = world.run(load())
        unsharded = Unsharded(world.loop)
        unsharded.insert(WeatherLocation, [dict(id=i, continent=c, city=city)
                                           for (i, _), (c, city, _) in zip(stored, data)])
        reports = [dict(location_id=i, temperature=t, report_time=FIXED_TIME) for i, ts in stored for t in ts]
        if reports:
            unsharded.insert(Report, reports)
        try:
            yield world, unsharded
        finally:
            unsharded.close()
