"""Loading rows: the seed's write path vs shardlib's ORM path vs bulk_insert vs raw sqlite3.

Measured in one run, on the same machine, for in-memory and file-backed shards:

* **seed**: the upstream example's code (``benchmarks/seed_example.py``): a
  column-default id generator that runs one transaction per row, objects
  added in interleaved continent order;
* **shardlib add_all**: ``session.add_all(locations)`` in the same
  interleaved order, then ``commit()`` (ids once per flush, rows grouped by
  shard into batched INSERTs);
* **shardlib bulk_insert**: dicts in, one id allocation, each continent's
  cities as one parameter of one ``INSERT ... SELECT ... FROM json_each`` per
  10,000 rows, shard after shard;
* **raw sqlite3**: ``executemany`` of prepared tuples into one in-memory
  table: what a hand-written loader does;
* **raw sqlite3 json_each**: the technique ``bulk_insert`` uses (each column
  as one JSON parameter, the rows made by SQLite), with nothing else around
  it: the floor for ``bulk_insert``.

    python benchmarks/loading.py [--quick] [--repeat 3]

Targets (issue 6): add_all >= 30x the seed; bulk_insert >= 150x the seed and
>= 15% of raw sqlite3 (in-memory). Issue 17: bulk_insert >= 80% of raw
sqlite3 on the same rows, measured as interleaved pairs (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shardlib  # noqa: E402
from _spread import quantile  # noqa: E402
from seed_example import SeedLocation, seed_setup  # noqa: E402
from shardlib import CONTINENTS, SHARD_IDS, WeatherLocation  # noqa: E402


def _engines(mode: str, tmp: str, **kw: Any) -> dict[str, Any]:
    if mode == "memory":
        return shardlib.make_engines({s: "sqlite+aiosqlite://" for s in SHARD_IDS}, **kw)
    return shardlib.make_engines(data_dir=tmp, **kw)


async def seed_rows_per_s(mode: str, n: int) -> float | str:
    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(mode, tmp, connect_args={"timeout": 1})
        Session = await seed_setup(engines)
        locations = [SeedLocation(CONTINENTS[i % 4], f"city {i}") for i in range(n)]
        started = time.perf_counter()
        try:
            async with Session() as session:
                session.add_all(locations)
                await session.commit()
        except Exception as error:  # the seed's id generator vs its own write lock
            return f"fails: {str(error.__cause__ or error).splitlines()[0]}"
        finally:
            await shardlib.dispose(engines)
        return n / (time.perf_counter() - started)


async def add_all_rows_per_s(mode: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(mode, tmp)
        await shardlib.reset(engines)
        Session = shardlib.make_sessionmaker(engines)
        locations = [WeatherLocation(CONTINENTS[i % 4], f"city {i}") for i in range(n)]
        started = time.perf_counter()
        async with Session() as session:
            session.add_all(locations)
            await session.commit()
        elapsed = time.perf_counter() - started
        await shardlib.dispose(engines)
        return n / elapsed


async def bulk_rows_per_s(mode: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        engines = _engines(mode, tmp)
        await shardlib.reset(engines)
        rows = [{"continent": CONTINENTS[i % 4], "city": f"city {i}"} for i in range(n)]
        started = time.perf_counter()
        await shardlib.bulk_insert(engines, WeatherLocation, rows)
        elapsed = time.perf_counter() - started
        await shardlib.dispose(engines)
        return n / elapsed


def raw_rows_per_s(mode: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(":memory:" if mode == "memory" else f"{tmp}/raw.db")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, continent VARCHAR(50), city VARCHAR(100))")
        rows = [(i + 1, CONTINENTS[i % 4], f"city {i}") for i in range(n)]
        started = time.perf_counter()
        conn.executemany("INSERT INTO t VALUES (?, ?, ?)", rows)
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.close()
        return n / elapsed


def raw_json_rows_per_s(mode: str, n: int) -> float:
    """Raw ``sqlite3`` with the technique ``bulk_insert`` uses: each column as one JSON parameter,
    rows made by ``json_each`` (the floor for shardlib's own way of writing)."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(":memory:" if mode == "memory" else f"{tmp}/raw.db")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, continent VARCHAR(50), city VARCHAR(100))")
        cities = [f"city {i}" for i in range(n)]
        started = time.perf_counter()
        for c, continent in enumerate(CONTINENTS):  # a continent's cities, ids 16 apart as shardlib's
            conn.execute("INSERT INTO t SELECT ? + 16 * key, ?, value FROM json_each(?)",
                         (c + 16, continent, json.dumps(cities[c::4], ensure_ascii=False)))
        conn.commit()
        elapsed = time.perf_counter() - started
        conn.close()
        return n / elapsed


async def _median(repeat: int, measure_once: Any) -> float | str:
    runs = []
    for _ in range(repeat):
        value = measure_once()
        value = await value if asyncio.iscoroutine(value) else value
        if isinstance(value, str):  # a failure: report it, don't repeat it
            return value
        runs.append(value)
    return statistics.median(runs)


async def measure(quick: bool, repeat: int) -> list[dict[str, Any]]:
    scale = 0.2 if quick else 1.0
    sizes = {"seed": int(2_000 * scale), "add_all": int(20_000 * scale), "bulk": int(100_000 * scale),
             "raw": int(200_000 * scale)}
    approaches = [
        ("seed (per-row id transaction)", "seed", seed_rows_per_s),
        ("shardlib add_all + commit", "add_all", add_all_rows_per_s),
        ("shardlib bulk_insert", "bulk", bulk_rows_per_s),
        ("raw sqlite3 executemany (1 table)", "raw", raw_rows_per_s),
        ("raw sqlite3 json_each (1 table)", "raw", raw_json_rows_per_s),
    ]
    results = []
    for mode in ("memory", "file"):
        for label, size, function in approaches:
            n = sizes[size]
            value = await _median(repeat, lambda: function(mode, n))
            results.append({"mode": mode, "approach": label, "rows": n, "rows_per_s": value})
    return results


async def bulk_vs_raw(quick: bool, pairs: int) -> tuple[list[float], list[float]]:
    """``pairs`` interleaved (bulk_insert, raw executemany, raw json_each) runs on the same number
    of rows, in-memory; per run, bulk_insert's rows/s as a fraction of each raw one's."""
    n = int(100_000 * (0.2 if quick else 1.0))
    to_executemany, to_json_each = [], []
    for _ in range(pairs):
        bulk = await bulk_rows_per_s("memory", n)
        to_executemany.append(bulk / raw_rows_per_s("memory", n))
        to_json_each.append(bulk / raw_json_rows_per_s("memory", n))
    return sorted(to_executemany), sorted(to_json_each)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the rows")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the median is shown")
    args = parser.parse_args()
    results = asyncio.run(measure(args.quick, args.repeat))
    seed = next(r["rows_per_s"] for r in results if r["mode"] == "memory" and r["approach"].startswith("seed"))
    raw = next(r["rows_per_s"] for r in results if r["mode"] == "memory" and r["approach"].startswith("raw"))
    print(f"{'shards':<7} {'approach':<36} {'rows':>8} {'rows/s':>12} {'x seed':>8} {'% raw':>7}")
    for r in results:
        value = r["rows_per_s"]
        if isinstance(value, str):
            print(f"{r['mode']:<7} {r['approach']:<36} {r['rows']:>8} {value}")
            continue
        print(f"{r['mode']:<7} {r['approach']:<36} {r['rows']:>8} {value:>12,.0f} {value / seed:>7.0f}x "
              f"{100 * value / raw:>6.1f}%")
    print(f"median of {args.repeat} runs; x seed and % raw are relative to the in-memory seed "
          f"and in-memory raw sqlite3 rows.")
    pairs = max(args.repeat, 7)
    for ratios, peer, target in zip(asyncio.run(bulk_vs_raw(args.quick, pairs)),
                                    ("raw sqlite3 executemany", "raw sqlite3 json_each"),
                                    ("; target >= 80%", ": shardlib's overhead over its own technique")):
        quartile = functools.partial(quantile, ratios)
        print(f"bulk_insert / {peer}, same rows, in-memory, {pairs} interleaved runs: "
              f"median {100 * statistics.median(ratios):.0f}% (25th-75th percentile {100 * quartile(0.25):.0f}-"
              f"{100 * quartile(0.75):.0f}%, min-max {100 * ratios[0]:.0f}-{100 * ratios[-1]:.0f}%{target})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
