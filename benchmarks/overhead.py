"""Per-statement overhead: shardlib against one plain AsyncSession on one unsharded database.

The peer a user would otherwise pick is not the seed example but an ordinary
``AsyncSession`` on one database. Same tables, same rows, in-memory SQLite,
interleaved rounds (A, B, C, A, B, C, ...) so machine noise hits all sides alike.
Prints throughput per workload, the ratio shardlib / unsharded (1.00 = no
overhead; the issue's target is >= 0.90) with its spread over rounds, and the
seed's choosers (``routing_rules="upstream"``) for comparison.

Each round runs one workload on every side, back to back, each side going
first in turn; many short rounds rather than a few long ones, so that a burst
of load from other programs hits one round, not one side. Ratios are taken
within a round, then the median over rounds is shown with its spread.

Run: ``python benchmarks/overhead.py [--rounds 15] [--add-all-rounds 5]``.
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
GETS = 300
FILTERS = 300


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
    """Each workload returns (operations, wall seconds, CPU seconds of this process)."""

    async def add_all() -> tuple[int, float, float]:  # into a fresh database of the same kind: tables stay the same size
        fresh = type(side)() if isinstance(side, Plain) else Sharded(side.routing_rules)
        await fresh.setup()
        start, cpu = time.perf_counter(), time.process_time()
        await fresh.add_all()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
        await (fresh.engine.dispose() if isinstance(fresh, Plain) else shardlib.dispose(fresh.engines))
        return LOCATIONS, elapsed, cpu

    async def get() -> tuple[int, float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for location_id in ids[:GETS]:
            async with side.Session() as session:
                await session.get(WeatherLocation, location_id)
        return GETS, time.perf_counter() - start, time.process_time() - cpu

    async def filter_one_shard() -> tuple[int, float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        async with side.Session() as session:
            for n in range(FILTERS):
                statement = select(WeatherLocation).where(WeatherLocation.continent == CONTINENTS[n % 4]).limit(5)
                (await session.execute(statement)).scalars().all()
        return FILTERS, time.perf_counter() - start, time.process_time() - cpu

    return {"add_all + commit (4,000 locations, a report each)": add_all,
            "session.get(WeatherLocation, id), fresh session each": get,
            "select ... where continent = X limit 5, one session": filter_one_shard}


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    quartile = lambda q: ordered[round(q * (len(ordered) - 1))]  # noqa: E731
    return f"{quartile(0.25):.2f}-{quartile(0.75):.2f} ({ordered[0]:.2f}-{ordered[-1]:.2f})"


async def main(rounds: int, add_all_rounds: int) -> None:
    sides = {"unsharded": Plain(), "shardlib": Sharded(), "seed choosers": Sharded("upstream")}
    ids = {}
    for name, side in sides.items():
        await side.setup()
        ids[name] = await side.add_all()
    work = {name: await workloads(side, ids[name]) for name, side in sides.items()}
    labels = list(work["unsharded"])
    # (label, side) -> per round: (ops/s wall, ops/s CPU)
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for label in labels:
        for round_ in range(add_all_rounds if label.startswith("add_all") else rounds):
            names = list(sides)
            names = names[round_ % len(names):] + names[:round_ % len(names)]  # each side goes first in turn
            for name in names:
                count, elapsed, cpu = await work[name][label]()
                rates.setdefault((label, name), []).append((count / elapsed, count / cpu))
    print(f"in-memory SQLite; interleaved rounds (each side first in turn); ratio = side / unsharded in "
          f"the same round, median; spread = 25th-75th percentile (min-max)")
    print(f"wall: throughput by the clock; cpu: by this process's CPU time (less sensitive to other "
          f"programs on the machine)")
    print(f"{'workload':<55} {'side':<14} {'rounds':>6} {'ops/s':>8} {'wall ratio':>10}  {'spread':<22}"
          f" {'cpu ratio':>9}  spread")
    for label in labels:
        base = rates[(label, "unsharded")]
        for name in sides:
            mine = rates[(label, name)]
            wall = [m[0] / b[0] for m, b in zip(mine, base)]
            cpu = [m[1] / b[1] for m, b in zip(mine, base)]
            print(f"{label:<55} {name:<14} {len(mine):>6} {statistics.median(m[0] for m in mine):>8,.0f} "
                  f"{statistics.median(wall):>10.2f}  {_spread(wall):<22} {statistics.median(cpu):>9.2f}  "
                  f"{_spread(cpu)}")
    for side in sides.values():
        if isinstance(side, Sharded):
            await shardlib.dispose(side.engines)
        else:
            await side.engine.dispose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15, help="rounds of get() and of the filter")
    parser.add_argument("--add-all-rounds", type=int, default=5, help="rounds of add_all (a fresh database each)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.add_all_rounds))
