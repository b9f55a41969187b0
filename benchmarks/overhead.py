"""Per-statement overhead: shardlib against one plain AsyncSession on one unsharded database.

The peer a user would otherwise pick is not the seed example but an ordinary
``AsyncSession`` on one database. Same tables, same rows, in-memory SQLite,
interleaved rounds (A, B, C, A, B, C, ...) so machine noise hits all sides alike.
Prints throughput per workload, the ratio shardlib / unsharded (1.00 = no
overhead; the issue's target is >= 0.90) with its spread over rounds, and the
seed's choosers (``routing_rules="upstream"``) for comparison.

``get()`` and the filter alternate sides operation by operation (unsharded,
shardlib, seed, shardlib, seed, unsharded, ...), so that a burst of load from
other programs falls on all sides alike; ``add_all`` (one long operation)
alternates round by round. Ratios are taken within a round, then the median
over rounds is shown with its spread.

Run: ``python benchmarks/overhead.py [--rounds 15] [--add-all-rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import statistics
import time
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

import shardlib
from _spread import quantile
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


async def add_all_once(side: Plain | Sharded) -> tuple[float, float]:
    """``add_all`` + commit into a fresh database of the same kind (tables stay the same size):
    (wall seconds, CPU seconds of this process)."""
    fresh = Plain() if isinstance(side, Plain) else Sharded(side.routing_rules)
    await fresh.setup()
    start, cpu = time.perf_counter(), time.process_time()
    await fresh.add_all()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await (fresh.engine.dispose() if isinstance(fresh, Plain) else shardlib.dispose(fresh.engines))
    return elapsed, cpu


def _filter(n: int) -> Any:
    return select(WeatherLocation).where(WeatherLocation.continent == CONTINENTS[n % 4]).limit(5)


async def interleaved(sides: dict[str, Plain | Sharded], ids: dict[str, list[int]], workload: str,
                      count: int) -> dict[str, tuple[float, float]]:
    """One round: ``count`` operations per side, **alternating sides operation by operation**
    (each side first in turn), so that load from other programs falls on all sides alike.
    Returns per side (operations per wall second, per CPU second)."""
    sessions = {name: side.Session() for name, side in sides.items()} if workload == "filter" else {}
    spent = {name: [0.0, 0.0] for name in sides}
    names = list(sides)
    for n in range(count):
        for name in names[n % len(names):] + names[:n % len(names)]:
            start, cpu = time.perf_counter(), time.process_time()
            if workload == "get":
                async with sides[name].Session() as session:
                    await session.get(WeatherLocation, ids[name][n % len(ids[name])])
            else:
                (await sessions[name].execute(_filter(n))).scalars().all()
            spent[name][0] += time.perf_counter() - start
            spent[name][1] += time.process_time() - cpu
    for session in sessions.values():
        await session.close()
    return {name: (count / wall, count / cpu) for name, (wall, cpu) in spent.items()}


WORKLOADS = {
    "add_all": "add_all + commit (4,000 locations, a report each)",
    "get": "session.get(WeatherLocation, id), fresh session each",
    "filter": "select ... where continent = X limit 5, one session",
}


def _spread(values: list[float]) -> str:
    ordered = sorted(values)
    quartile = functools.partial(quantile, ordered)
    return f"{quartile(0.25):.2f}-{quartile(0.75):.2f} ({ordered[0]:.2f}-{ordered[-1]:.2f})"


async def measure(rounds: int, add_all_rounds: int, operations: int = GETS
                  ) -> dict[tuple[str, str], list[tuple[float, float]]]:
    """Per (workload, side): each round's (operations per wall second, per CPU second)."""
    sides: dict[str, Plain | Sharded] = {"unsharded": Plain(), "shardlib": Sharded(),
                                          "seed choosers": Sharded("upstream")}
    ids = {}
    for name, side in sides.items():
        await side.setup()
        ids[name] = await side.add_all()
    rates: dict[tuple[str, str], list[tuple[float, float]]] = {}
    names = list(sides)
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: a full collection costs all sides the same, little
    try:
        await _rounds(sides, ids, rates, rounds, add_all_rounds, operations)
    finally:
        gc.unfreeze()
    for side in sides.values():
        await (shardlib.dispose(side.engines) if isinstance(side, Sharded) else side.engine.dispose())
    return rates


async def _rounds(sides: dict[str, Plain | Sharded], ids: dict[str, list[int]],
                  rates: dict[tuple[str, str], list[tuple[float, float]]], rounds: int, add_all_rounds: int,
                  operations: int) -> None:
    names = list(sides)
    for round_ in range(add_all_rounds):  # one long operation: sides alternate round by round
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            wall, cpu = await add_all_once(sides[name])
            rates.setdefault(("add_all", name), []).append((LOCATIONS / wall, LOCATIONS / cpu))
    for workload in ("get", "filter"):
        await interleaved(sides, ids, workload, 20)  # warm-up: pools, caches
        for _ in range(rounds):
            for name, rate in (await interleaved(sides, ids, workload, operations)).items():
                rates.setdefault((workload, name), []).append(rate)


def ratios(rates: dict[tuple[str, str], list[tuple[float, float]]], which: int = 0
           ) -> dict[tuple[str, str], list[float]]:
    """Per (workload, side): each round's throughput / the unsharded side's in that round
    (``which``: 0 by the clock, 1 by CPU time)."""
    return {(workload, name): [m[which] / b[which] for m, b in zip(mine, rates[(workload, "unsharded")])]
            for (workload, name), mine in rates.items()}


async def measure_overhead(rounds: int = 5, add_all_rounds: int = 2, operations: int = 100
                           ) -> dict[str, dict[str, float]]:
    """A small run for notebooks: workload -> side -> median throughput ratio to unsharded."""
    found = ratios(await measure(rounds, add_all_rounds, operations))
    result: dict[str, dict[str, float]] = {}
    for (workload, name), values in found.items():
        if name != "unsharded":
            result.setdefault(workload, {})[name] = statistics.median(values)
    return result


async def main(rounds: int, add_all_rounds: int) -> None:
    rates = await measure(rounds, add_all_rounds)
    wall, cpu = ratios(rates, 0), ratios(rates, 1)
    print("in-memory SQLite; ratio = side / unsharded within one round, median over rounds; "
          "spread = 25th-75th percentile (min-max)")
    print(f"get and filter: {rounds} rounds of {GETS} operations per side, sides alternating operation by "
          f"operation; add_all: {add_all_rounds} rounds, sides alternating round by round")
    print("wall: throughput by the clock; cpu: by this process's CPU time (less sensitive to other "
          "programs on the machine)")
    print(f"{'workload':<55} {'side':<14} {'ops/s':>8} {'wall ratio':>10}  {'spread':<22}"
          f" {'cpu ratio':>9}  spread")
    for workload, label in WORKLOADS.items():
        for name in ("unsharded", "shardlib", "seed choosers"):
            key = (workload, name)
            print(f"{label:<55} {name:<14} {statistics.median(m[0] for m in rates[key]):>8,.0f} "
                  f"{statistics.median(wall[key]):>10.2f}  {_spread(wall[key]):<22} "
                  f"{statistics.median(cpu[key]):>9.2f}  {_spread(cpu[key])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15, help="rounds of get() and of the filter")
    parser.add_argument("--add-all-rounds", type=int, default=5, help="rounds of add_all (a fresh database each)")
    args = parser.parse_args()
    asyncio.run(main(args.rounds, args.add_all_rounds))
