"""A multi-shard ORDER BY ... LIMIT over 100,000 rows: gather vs one unsharded database.

The same 100,000 locations (random city names, so the sort has real work to
do) are stored once in one unsharded database and once on the four shards
(25,000 each). The same statement runs on both:

* **unsharded**: one database sorts 100,000 rows and returns the first N;
* **shardlib.gather**: every shard sorts its own 25,000 and returns its first
  ``LIMIT + OFFSET``; shardlib merges the four sorted lists (a heap) and
  slices. The shards work at the same time (SQLite releases the GIL while it
  sorts);
* **ShardlibSession**: the same through ``session.execute`` (one shard after
  another, merged the same way).

Interleaved repeats (unsharded, gather, session, unsharded, ...); the median
time of each and the ratio to the unsharded time (issue #17's target:
gather within 2x of unsharded), with its spread over the repeats.

    python benchmarks/gather_order_limit.py [--rows 100000] [--repeat 9]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shardlib  # noqa: E402
from shardlib import Base, WeatherLocation  # noqa: E402
from _spread import quantile  # noqa: E402

WL = WeatherLocation


def statements() -> dict[str, Any]:
    return {
        "ORDER BY city LIMIT 10": select(WL.id, WL.city, WL.continent).order_by(WL.city, WL.id).limit(10),
        "ORDER BY city DESC LIMIT 100 OFFSET 50": select(WL.id, WL.city).order_by(WL.city.desc(), WL.id)
        .limit(100).offset(50),
        "WHERE continent IN (2) ORDER BY city LIMIT 10": select(WL.id, WL.city)
        .where(WL.continent.in_(["Asia", "Europe"])).order_by(WL.city, WL.id).limit(10),
    }


async def measure(rows: int, repeat: int) -> list[dict[str, Any]]:
    rng = random.Random(17)
    data = [{"continent": shardlib.CONTINENTS[i % 4], "city": f"{rng.randrange(10**9):09d} city"}
            for i in range(rows)]
    engines = shardlib.make_engines(urls={s: "sqlite+aiosqlite://" for s in shardlib.SHARD_IDS})
    await shardlib.reset(engines)
    await shardlib.bulk_insert(engines, WL, data)
    Session = shardlib.make_sessionmaker(engines)
    async with Session() as session:  # the same ids in the unsharded copy
        stored = [dict(r._mapping) for r in (await session.execute(select(WL.id, WL.continent, WL.city))).all()]
    unsharded = create_async_engine("sqlite+aiosqlite://")
    async with unsharded.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(insert(WL), stored)

    async def on_unsharded(statement: Any) -> list[Any]:
        async with unsharded.connect() as conn:
            return (await conn.execute(statement)).all()

    async def through_session(statement: Any) -> list[Any]:
        async with Session() as session:
            return (await session.execute(statement)).all()

    sides = {"unsharded": on_unsharded, "shardlib.gather": lambda s: shardlib.gather(engines, s),
             "ShardlibSession": through_session}
    results = []
    for label, statement in statements().items():
        answers = {name: [tuple(r) for r in await run(statement)] for name, run in sides.items()}  # warm-up
        for name, answer in answers.items():
            assert answer == answers["unsharded"], f"{name} answered differently: {label}"
        times: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(repeat):
            for name, run in sides.items():
                started = time.perf_counter()
                await run(statement)
                times[name].append((time.perf_counter() - started) * 1000)
        for name in sides:
            ratios = sorted(m / u for m, u in zip(times[name], times["unsharded"]))
            results.append({"statement": label, "side": name, "median_ms": statistics.median(times[name]),
                            "ratio": statistics.median(ratios), "low": quantile(ratios, 0.25),
                            "high": quantile(ratios, 0.75)})
    await shardlib.dispose(engines)
    await unsharded.dispose()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    results = asyncio.run(measure(args.rows, args.repeat))
    print(f"{args.rows:,} locations (in-memory SQLite: one unsharded database, or 4 shards); median of "
          f"{args.repeat} interleaved repeats; ratio = time / unsharded time in the same repeat "
          f"(median, 25th-75th percentile); target: gather <= 2x")
    print(f"{'statement':<46} {'side':<16} {'median ms':>9} {'x unsharded':>11}  spread")
    for r in results:
        print(f"{r['statement']:<46} {r['side']:<16} {r['median_ms']:>9.1f} {r['ratio']:>11.2f}  "
              f"{r['low']:.2f}-{r['high']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
