"""Scatter-gather vs ShardedSession under per-shard latency.

Every shard gets the same injected latency (:mod:`shardlib.latency`): a
SQLite function that sleeps, called once per statement on the shard's own
connection, so the sleep happens in the aiosqlite worker thread (like a slow
network round trip) and the event loop stays free.

``ShardedSession`` visits the four shards one after another (about 4 x the
latency); ``shardlib.gather`` visits them concurrently (about 1 x).

    python benchmarks/gather_latency.py [--latency-ms 50] [--repeat 15]
"""

from __future__ import annotations

import argparse
import functools
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shardlib  # noqa: E402
from shardlib import Report, WeatherLocation  # noqa: E402
from shardlib.latency import injected_latency  # noqa: E402
from _spread import quantile  # noqa: E402


async def measure(latency_ms: float, repeat: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        engines = shardlib.make_engines(data_dir=tmp)
        await shardlib.reset(engines)
        Session = shardlib.make_sessionmaker(engines)
        async with Session() as session:
            for i in range(400):
                loc = WeatherLocation(shardlib.CONTINENTS[i % 4], f"city {i}")
                loc.reports.append(Report(float(i % 37)))
                session.add(loc)
            await session.commit()

        statement = select(WeatherLocation.continent, func.count(Report.id), func.avg(Report.temperature)).join(
            Report
        ).group_by(WeatherLocation.continent)
        rows = []
        with injected_latency(engines, latency_ms / 1000):

            async def sharded_session() -> Any:
                # Concatenation, asked for explicitly: a session that refuses cross-shard GROUP BY
                # needs the option, one that concatenates ignores it.
                async with Session() as session:
                    return (await session.execute(statement.execution_options(shardlib_concatenate=True))).all()

            async def gathered() -> Any:
                return await shardlib.gather(engines, statement)

            approaches = {"ShardedSession (one shard at a time)": sharded_session,
                          "shardlib.gather (concurrent)": gathered}
            timings: dict[str, list[float]] = {name: [] for name in approaches}
            for run in approaches.values():
                await run()  # warm the pools and caches
            for _ in range(repeat):  # interleaved: load from other programs falls on both alike
                for name, run in approaches.items():
                    started = time.perf_counter()
                    await run()
                    timings[name].append((time.perf_counter() - started) * 1000)
            for name, times in timings.items():
                rows.append({"approach": name, "median_ms": statistics.median(times), "min_ms": min(times),
                             "times": times})
        await shardlib.dispose(engines)
    planned = _plan_cpu_us(statement, repeat=max(50, repeat * 20))
    rows.append({"approach": "gather plan() CPU per call, no I/O", "median_ms": planned / 1000,
                 "min_ms": planned / 1000})
    return rows


def _plan_cpu_us(statement: Any, repeat: int) -> float:
    """Median CPU time of the analysis alone (what gather adds before any SQL is sent)."""
    from shardlib.gather import plan

    timings = []
    for _ in range(repeat):
        started = time.process_time()
        plan(statement, "sqlite")
        timings.append((time.process_time() - started) * 1e6)
    return statistics.median(timings)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    rows = asyncio.run(measure(args.latency_ms, args.repeat))
    print(f"4 shards, {args.latency_ms:g} ms injected per statement, median of {args.repeat}")
    print(f"{'approach':<40} {'median ms':>10} {'min ms':>10}")
    for row in rows:
        print(f"{row['approach']:<40} {row['median_ms']:>10.1f} {row['min_ms']:>10.1f}")
    speedups = sorted(s / g for s, g in zip(rows[0]["times"], rows[1]["times"]))
    quartile = functools.partial(quantile, speedups)
    print(f"speed-up: {statistics.median(speedups):.2f}x median of the {args.repeat} interleaved pairs "
          f"(25th-75th percentile {quartile(0.25):.2f}-{quartile(0.75):.2f}x, min-max "
          f"{speedups[0]:.2f}-{speedups[-1]:.2f}x; target >= 3.8x; the limit is 4x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
