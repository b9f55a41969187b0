"""What a lookup table buys and costs, measured.

Prints one table:

* **city filter** (``select(WeatherLocation).where(city == ...)``): shards that
  ran the SELECT (from engine events) and queries/s, routed through the city
  lookup versus sent to every shard (``lookup_routing=False``);
* **inserts** (ORM, 100 locations per commit): rows/s before the lookups are
  built, after (each row's city gets an entry), and with a unique station too;
* **reference-table write**: one ``insert(Country)`` through a session (every
  shard, one transaction each) versus one location insert (one shard plus its
  lookup entries), ms per committed write.

SQLite files in a temporary directory, or ``$SHARDLIB_URLS`` (then a
reference write runs with ``twophase=True`` too). Four shards: the shard map
has four today. Run: ``python benchmarks/lookups.py``.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import tempfile
import time

from sqlalchemy import delete, insert, select

import shardlib
from shardlib import Country, WeatherLocation as WL, lookups

LOCATIONS = 2_000
CITIES = 400
QUERIES = 300
INSERT_ROWS = 2_000


def _rows(seed: int, count: int, offset: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(rng.choice(shardlib.CONTINENTS), f"City {rng.randrange(CITIES):03d}", f"S{offset + i:06d}")
            for i in range(count)]


async def _load(Session, rows) -> float:
    start = time.perf_counter()
    for first in range(0, len(rows), 100):
        async with Session() as session:
            session.add_all(WL(c, city, station) for c, city, station in rows[first:first + 100])
            await session.commit()
    return len(rows) / (time.perf_counter() - start)


async def _city_queries(engines, Session, cities) -> tuple[float, float]:
    """(queries/s, mean shards that ran the SELECT): shards counted from engine events in a
    first pass, time measured in a second pass without the trace's listeners."""
    visited = []
    async with Session() as session:
        for city in cities:
            with shardlib.trace(engines) as t:
                (await session.scalars(select(WL).where(WL.city == city))).all()
            visited.append(sum(len(g["shards"]) for g in t.statements() if "_lookup" not in g["sql"]))
    start = time.perf_counter()
    for first in range(0, len(cities), 50):
        async with Session() as session:
            for city in cities[first:first + 50]:
                (await session.scalars(select(WL).where(WL.city == city))).all()
    return len(cities) / (time.perf_counter() - start), statistics.mean(visited)


async def _write_ms(Session, make, undo, repeat: int = 30) -> float:
    times = []
    for i in range(repeat):
        async with Session() as session:
            start = time.perf_counter()
            await make(session, i)
            await session.commit()
            times.append((time.perf_counter() - start) * 1000)
        async with Session() as session:
            await undo(session, i)
            await session.commit()
    return statistics.median(times)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        engines = shardlib.make_engines(data_dir=tmp)
        await shardlib.reset(engines)
        on_server = bool(os.environ.get("SHARDLIB_URLS", "").strip())
        Session = shardlib.make_sessionmaker(engines)
        NoRouting = shardlib.make_sessionmaker(engines, lookup_routing=False)

        await lookups.enable(engines)
        await _load(Session, _rows(1, LOCATIONS))
        cities = [f"City {random.Random(2).randrange(CITIES):03d}" for _ in range(QUERIES)]
        cities[::10] = ["Atlantis"] * len(cities[::10])  # a tenth name a city nobody stores
        results = []
        qps, shards = await _city_queries(engines, Session, cities)
        results.append(("city filter, through the lookup", f"{shards:.2f} shards", f"{qps:,.0f} queries/s"))
        qps, shards = await _city_queries(engines, NoRouting, cities)
        results.append(("city filter, every shard", f"{shards:.2f} shards", f"{qps:,.0f} queries/s"))

        for label, built, stations in (("no lookups built, city", False, False),
                                       ("lookups built, city", True, False),
                                       ("lookups built, city + station", True, True)):
            await shardlib.reset(engines)
            if built:
                await lookups.enable(engines)
            rows = [(c, city, station if stations else None) for c, city, station in _rows(3, INSERT_ROWS)]
            rate = await _load(Session, rows)
            results.append((f"ORM insert, {label}", "100 rows/commit", f"{rate:,.0f} rows/s"))

        await shardlib.reset(engines)
        await lookups.enable(engines)

        async def add_country(session, i):
            await session.execute(insert(Country).values(code=f"Z{i % 10}", name=f"Zland {i}", continent="Europe"))

        async def drop_country(session, i):
            await session.execute(delete(Country).where(Country.code == f"Z{i % 10}"))

        async def add_location(session, i):
            session.add(WL("Europe", f"Town {i}", f"T{i:04d}"))

        async def drop_location(session, i):
            await session.execute(delete(WL).where(WL.station == f"T{i:04d}"))

        ms = await _write_ms(Session, add_country, drop_country)
        results.append(("reference write (1 country, 4 shards)", "commit", f"{ms:.2f} ms"))
        if on_server:
            TwoPhase = shardlib.make_sessionmaker(engines, twophase=True)
            ms = await _write_ms(TwoPhase, add_country, drop_country)
            results.append(("reference write, twophase=True", "commit", f"{ms:.2f} ms"))
        ms = await _write_ms(Session, add_location, drop_location)
        results.append(("location write (1 shard + lookups)", "commit", f"{ms:.2f} ms"))
        await shardlib.dispose(engines)

    backend = "PostgreSQL" if on_server else "SQLite"
    print(f"{backend}, 4 shards, {LOCATIONS} locations in {CITIES} cities, {QUERIES} city queries "
          f"(a tenth for a city nobody stores)")
    print(f"{'measurement':<42} {'shape':>16} {'result':>18}")
    for name, shape, value in results:
        print(f"{name:<42} {shape:>16} {value:>18}")


if __name__ == "__main__":
    asyncio.run(main())
