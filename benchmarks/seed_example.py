"""The upstream example's write path, reproduced for measurement.

Its own declarative base, tables, id generator (a column default that opens a
transaction on shard #1 for every row) and ``ShardedSession`` configuration,
as in ``examples/sharding/asyncio.py``. Used by ``benchmarks/loading.py`` and
the loading notebook as the baseline; nothing else should import it.

On in-memory aiosqlite engines (the seed's own set-up) every engine hands out
one shared connection (``StaticPool``), so the generator's "separate"
transaction actually commits the session's half-done flush: the baseline is
measured with broken atomicity, which flatters it. On file-backed shards the
generator waits for the session's own write lock: a deadlock.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, Table, insert
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.ext.horizontal_shard import ShardedSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from shardlib import SHARD_FOR_CONTINENT, SHARD_IDS


class SeedBase(DeclarativeBase):
    pass


seed_ids = Table("ids", SeedBase.metadata, Column("nextid", Integer, nullable=False))

_id_engine: list[Any] = []


def id_generator(ctx: Any) -> int:
    """The seed's generator: one transaction per new row."""
    with _id_engine[0].sync_engine.begin() as conn:
        nextid = conn.scalar(seed_ids.select().with_for_update())
        conn.execute(seed_ids.update().values({seed_ids.c.nextid: seed_ids.c.nextid + 1}))
    return nextid


class SeedLocation(SeedBase):
    __tablename__ = "weather_locations"

    id: Mapped[int] = mapped_column(primary_key=True, default=id_generator)
    continent: Mapped[str]
    city: Mapped[str]
    reports: Mapped[list["SeedReport"]] = relationship(back_populates="location")

    def __init__(self, continent: str, city: str) -> None:
        self.continent = continent
        self.city = city


class SeedReport(SeedBase):
    __tablename__ = "weather_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    location_id: Mapped[int] = mapped_column(ForeignKey("weather_locations.id"))
    temperature: Mapped[float]
    location: Mapped[SeedLocation] = relationship(back_populates="reports")


def _shard_chooser(mapper: Any, instance: Any, clause: Any = None) -> str:
    if isinstance(instance, SeedLocation):
        return SHARD_FOR_CONTINENT[instance.continent]
    return _shard_chooser(mapper, instance.location)


def _identity_chooser(mapper: Any, primary_key: Any, *, lazy_loaded_from: Any, **kw: Any) -> list[str]:
    return [lazy_loaded_from.identity_token] if lazy_loaded_from else list(SHARD_IDS)


def _execute_chooser(context: Any) -> list[str]:
    return list(SHARD_IDS)  # what the seed's chooser amounts to (its visitor never fires)


async def seed_setup(engines: dict[str, AsyncEngine]) -> async_sessionmaker[Any]:
    """Create the seed's tables and id counter; return its sessionmaker."""
    for engine in engines.values():
        async with engine.begin() as conn:
            await conn.run_sync(SeedBase.metadata.drop_all)
            await conn.run_sync(SeedBase.metadata.create_all)
    async with engines[SHARD_IDS[0]].begin() as conn:
        await conn.execute(insert(seed_ids), {"nextid": 1})
    _id_engine[:] = [engines[SHARD_IDS[0]]]
    return async_sessionmaker(
        sync_session_class=ShardedSession,
        expire_on_commit=False,
        shards={s: engines[s].sync_engine for s in SHARD_IDS},
        shard_chooser=_shard_chooser,
        identity_chooser=_identity_chooser,
        execute_chooser=_execute_chooser,
    )
