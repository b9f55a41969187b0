"""Per-statement overhead: shardlib against one plain AsyncSession on one unsharded database.

The peer a user would otherwise pick is not the seed example but an ordinary
``AsyncSession`` on one database. Same tables, same rows, in-memory SQLite,
interleaved rounds (A, B, C, A, B, C, ...) so machine noise hits all sides alike.
Prints throughput per workload, the ratio shardlib / unsharded (1.00 = no
overhead; the issue's target is >= 0.90) with its spread over rounds, and the
seed's choosers (``routing_rules="upstream"``) for comparison.

Run: ``python benchmarks/overhead.py [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import shardlib
from shardlib import Base, Report, WeatherLocation

CONTINENTS = list(shardlib.CONTINENTS)
LOCATIONS = 4000
GETS = 2000
FILTERS = 1000


def locations() -> list[WeatherLocation]:
    made = []
    for n in range(LOCATIONS):
        location = WeatherLocation(CONTINENTS[n % 4], f"city {n}")
        location.reports.append(Report(float(n % 40)))
        made.append(location)
    return made


class Plain:
    """One unsharded database with the same schema; ids given as shardlib would."""

    def __init__(self) -> None:
        self.engine = create_async_engine("sqlite+aiosqlite://")
        self.Session = async_sessionmaker(self.engine, expire_on_commit=False)
        self.next_id = 1

    async def setup(self) -> None:
        async with self.engine.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)

    async def add_all(self) -> list[int]:
        batch = locations()
        for location in batch:
            location.id = self.next_id
            self.next_id += 1
        async with self.Session() as session:
            session.add_all(batch)
            await session.commit()
        return [b.id for b in batch]


class Sharded:
    def __init__(self, routing_rules: str = "shardlib") -> None:
        self.routing_rules = routing_rules
        self.engines = shardlib.make_engines(urls={s: "sqlite+aiosqlite://" for s in shardlib.SHARD_IDS})
        self.Session = shardlib.make_sessionmaker(self.engines, routing_rules=routing_rules)

    async def setup(self) -> None:
        await shardlib.reset(self.engines)

    async def add_all(self) -> list[int]:
        batch = locations()
        async with self.Session() as session:
            session.add_all(batch)
            await session.commit()
        return [b.id for b in batch]


async def workloads(side: Plain | Sharded, ids: list[int]) -> dict[str, Callable[[], Awaitable[Any]]]:
    async def add_all() -> tuple[int, float]:  # into a fresh database of the same kind: tables stay the same size
        fresh = type(side)() if isinstance(side, Plain) else Sharded(side.routing_rules)
        await fresh.setup()
        start = time.perf_counter()
        await fresh.add_all()
        elapsed = time.perf_counter() - start
        await (fresh.engine.dispose() if isinstance(fresh, Plain) else shardlib.dispose(fresh.engines))
        return LOCATIONS, elapsed

    async def get() -> tuple[int, float]:
        start = time.perf_counter()
        for location_id in ids[:GETS]:
            async with side.Session() as session:
                await session.get(WeatherLocation, location_id)
        return GETS, time.perf_counter() - start

    async def filter_one_shard() -> tuple[int, float]:
        start = time.perf_counter()
        async with side.Session() as session:
            for n in range(FILTERS):
                statement = select(WeatherLocation).where(WeatherLocation.continent == CONTINENTS[n % 4]).limit(5)
                (await session.execute(statement)).scalars().all()
        return FILTERS, time.perf_counter() - start

    return {"add_all + commit (4,000 locations, a report each)": add_all,
            "session.get(WeatherLocation, id), fresh session each": get,
            "select ... where continent = X limit 5, one session": filter_one_shard}


async def main(rounds: int) -> None:
    sides = {"unsharded": Plain(), "shardlib": Sharded(), "seed choosers": Sharded("upstream")}
    ids = {}
    for name, side in sides.items():
        await side.setup()
        ids[name] = await side.add_all()
    rates: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, side in sides.items():
            for label, work in (await workloads(side, ids[name])).items():
                count, elapsed = await work()
                rates.setdefault((label, name), []).append(count / elapsed)
    labels = list((await workloads(sides["unsharded"], ids["unsharded"])).keys())
    print(f"median of {rounds} interleaved rounds, in-memory SQLite; ratio = side / unsharded (spread: min-max of per-round ratios)")
    print(f"{'workload':<55} {'side':<14} {'ops/s':>10} {'ratio':>6}  spread")
    for label in labels:
        base = rates[(label, "unsharded")]
        for name in sides:
            mine = rates[(label, name)]
            ratios = [m / b for m, b in zip(mine, base)]
            print(f"{label:<55} {name:<14} {statistics.median(mine):>10,.0f} {statistics.median(ratios):>6.2f}  "
                  f"{min(ratios):.2f}-{max(ratios):.2f}")
    for side in sides.values():
        if isinstance(side, Sharded):
            await shardlib.dispose(side.engines)
        else:
            await side.engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args().rounds))
