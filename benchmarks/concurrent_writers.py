"""N concurrent writers on file-backed SQLite shards, with and without the write ticket.

Every writer is one session: add a location, flush, add a second one, flush,
commit (two shards, two flushes: the workload of issue 11, class 5). Three
workloads:

* ``disjoint``: each writer writes two cities of one continent (one shard);
  writers on different shards could run side by side, and the ticket makes
  them take turns: this row shows what serialising writers costs;
* ``same order``: every writer writes Asia then Europe;
* ``opposite``: half write Asia then Europe, half Europe then Asia: without
  the ticket they deadlock until the busy timeout (``--lock-timeout``) and
  fail with ``database is locked``.

``ticket off`` is ``make_sessionmaker(engines, info={"shardlib.write_ticket": False})``,
i.e. shardlib before the ticket. Prints commits per second (best of
``--repeat``) and how many writers failed; no number here is asserted.

    python benchmarks/concurrent_writers.py [--writers 2 10 30] [--repeat 3] [--lock-timeout 2]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import shardlib  # noqa: E402
from shardlib import WeatherLocation  # noqa: E402

CONTINENTS = shardlib.CONTINENTS


def orders(workload: str, n: int) -> tuple[str, str]:
    if workload == "disjoint":
        continent = CONTINENTS[n % len(CONTINENTS)]
        return continent, continent
    if workload == "same order":
        return "Asia", "Europe"
    return ("Asia", "Europe") if n % 2 else ("Europe", "Asia")


async def writer(Session, n: int, first: str, second: str) -> None:
    async with Session() as session:
        session.add(WeatherLocation(first, f"w{n} 1"))
        await session.flush()
        session.add(WeatherLocation(second, f"w{n} 2"))
        await session.flush()
        await session.commit()


async def one_run(workload: str, writers: int, ticket: bool, lock_timeout: float) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        engines = shardlib.make_engines(data_dir=tmp, lock_timeout=lock_timeout)
        try:
            await shardlib.reset(engines)
            info = {} if ticket else {"shardlib.write_ticket": False}
            Session = shardlib.make_sessionmaker(engines, info=info)
            await writer(Session, -1, "Asia", "Europe")  # warm up pools and the id block
            start = time.perf_counter()
            results = await asyncio.gather(
                *(writer(Session, n, *orders(workload, n)) for n in range(writers)), return_exceptions=True
            )
            elapsed = time.perf_counter() - start
        finally:
            await shardlib.dispose(engines)
    failed = sum(isinstance(r, BaseException) for r in results)
    return elapsed, failed


async def main(args: argparse.Namespace) -> None:
    print(f"{'workload':<11} {'writers':>7} | {'ticket off: commits/s':>21} {'failed':>6} | "
          f"{'ticket on: commits/s':>20} {'failed':>6} | on/off")
    for workload in ("disjoint", "same order", "opposite"):
        for writers in args.writers:
            row = {}
            for ticket in (False, True):
                runs = [await one_run(workload, writers, ticket, args.lock_timeout) for _ in range(args.repeat)]
                elapsed, failed = min(runs)
                row[ticket] = ((writers - failed) / elapsed, max(f for _, f in runs))
            (off, off_failed), (on, on_failed) = row[False], row[True]
            ratio = f"{on / off:5.2f}x" if off_failed == on_failed == 0 else "  -  "  # only like for like
            print(f"{workload:<11} {writers:>7} | {off:>21.0f} {off_failed:>6} | {on:>20.0f} {on_failed:>6} | {ratio}")
    print(f"(best of {args.repeat}; failed = most failures in one run; "
          f"lock wait {args.lock_timeout:g} s; file-backed SQLite, WAL)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[2, 10, 30])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--lock-timeout", type=float, default=2.0)
    asyncio.run(main(parser.parse_args()))
