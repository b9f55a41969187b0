"""Move Asia (the hot continent of the real GeoNames data) to a new database while
8 writer processes insert, rename and delete Asian and European locations.

Prints one table per backend: rows lost / duplicated / stranded, read-your-writes
failures, rows copied per second, the cut-over (fence to new map) and the write
latency of the moving continent during the cut-over window against before it,
and what the move cost the other continent's writers (commits per second before
the move and while it ran).

    python benchmarks/resharding.py                # file-backed SQLite (a temp dir)
    SHARDLIB_URLS=... SHARDLIB_SPARE_URLS=... python benchmarks/resharding.py   # + PostgreSQL

Runs: ``--runs N`` (default 3 on SQLite, 1 on PostgreSQL); medians and the
spread over runs are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from typing import Any

import shardlib
from shardlib import ContinentMove, WeatherLocation, movelab
from shardlib.cities import cities_of

MOVING, OTHER = "Asia", "Europe"


def _latencies(records: list[dict[str, Any]], continent: str, start: float, end: float) -> list[float]:
    return sorted((r["t1"] - r["t0"]) * 1000 for r in records
                  if "error" not in r and r["continent"] == continent and r["t0"] <= end and r["t1"] >= start)


def _gap(records: list[dict[str, Any]], continent: str, start: float, end: float) -> float:
    times = sorted(r["t1"] for r in records if "error" not in r and r["continent"] == continent
                   and start <= r["t1"] <= end)
    edges = [start, *times, end]
    return max(b - a for a, b in zip(edges, edges[1:])) * 1000


def _rate(records: list[dict[str, Any]], continent: str, start: float, end: float) -> float:
    n = sum(1 for r in records if "error" not in r and r["continent"] == continent and start <= r["t1"] <= end)
    return n / (end - start) if end > start else 0.0


async def one_run(backend: str, writers: int) -> dict[str, Any]:
    spare = dict(p.split("=", 1) for p in os.environ.get("SHARDLIB_SPARE_URLS", "").split(",") if p)
    tmp = tempfile.TemporaryDirectory() if backend == "sqlite" else None
    data_dir = tmp.name if tmp else None
    engines = shardlib.make_engines(data_dir=data_dir) if data_dir else shardlib.make_engines()
    await shardlib.reset(engines)
    cities = cities_of("Asia", "Europe", "North America", "South America")
    await shardlib.bulk_insert(engines, WeatherLocation, [{"continent": c.continent, "city": c.name} for c in cities])
    target, url = ("spare_1", spare["spare_1"]) if backend == "postgresql" else ("asia_2", None)
    holder: dict[str, Any] = {}

    async def move(mark: Any) -> None:
        m = ContinentMove(engines, MOVING, target, url=url, batch_size=1000, on_phase=mark)
        await m.prepare()
        await m.copy()
        await m.catch_up()
        await m.cut_over()
        await m.clean_up()
        holder["move"] = m

    report = await movelab.run_under_load(engines, move, writers=writers, data_dir=data_dir, source="asia",
                                          moved=MOVING, warm_up_s=2.0, cool_down_s=2.0,
                                          continents=(MOVING, OTHER))
    m = holder["move"]
    p = report.phases
    window = sorted((r["t1"] - r["t0"]) * 1000 for r in report.committed(MOVING)
                    if p["fencing"] <= r["t0"] <= p["cut_over"])
    before = _latencies(report.records, MOVING, p["writers_started"], p["move_started"])
    other_before = _rate(report.records, OTHER, p["writers_started"], p["move_started"])
    other_during = _rate(report.records, OTHER, p["move_started"], p["cut_over"])
    await shardlib.dispose(engines)
    if tmp:
        tmp.cleanup()
    return {
        "ok": report.ok,
        "lost": len(report.lost), "duplicated": len(report.duplicated), "stranded": report.stranded,
        "read failures": report.read_errors, "writer errors": len(report.errors),
        "committed writes": len(report.committed()),
        "rows copied": m.stats.locations_copied + m.stats.reports_copied,
        "copy rows/s": m.stats.rows_per_second,
        "changes caught up": m.stats.changes_applied,
        "cut-over ms": m.stats.cut_over_ms,
        "fence ms": m.stats.fence_ms,
        "writes started during cut-over": len(window),
        "their latency median ms": statistics.median(window) if window else 0.0,
        "their latency max ms": window[-1] if window else 0.0,
        "longest gap without a commit ms": report.longest_gap_ms(MOVING),
        "latency before the move median ms": statistics.median(before) if before else 0.0,
        "longest gap before the move ms": _gap(report.records, MOVING, p["writers_started"], p["move_started"]),
        "other continent commits/s before": other_before,
        "other continent commits/s during": other_during,
    }


def summarize(backend: str, runs: list[dict[str, Any]]) -> None:
    print(f"\n{backend}: move {MOVING} (real GeoNames cities) to a new database, "
          f"{len(runs)} run(s), 8 writer processes")
    print(f"{'':42} {'median':>10} {'min':>10} {'max':>10}")
    for key in runs[0]:
        if key == "ok":
            continue
        values = [float(r[key]) for r in runs]
        print(f"{key:42} {statistics.median(values):10.1f} {min(values):10.1f} {max(values):10.1f}")
    print(f"{'every check passed':42} {all(r['ok'] for r in runs)!s:>10}")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    backends = ["sqlite"]
    if os.environ.get("SHARDLIB_URLS", "").strip():
        if "spare_1" not in os.environ.get("SHARDLIB_SPARE_URLS", ""):
            raise SystemExit("SHARDLIB_SPARE_URLS must name spare_1 (scripts/pg.sh up prints it)")
        backends = ["postgresql"]
    for backend in backends:
        if backend == "sqlite":
            saved = os.environ.pop("SHARDLIB_URLS", None)
        runs = []
        for _ in range(args.runs or (3 if backend == "sqlite" else 1)):
            started = time.perf_counter()
            runs.append(await one_run(backend, args.writers))
            print(f"  run {len(runs)}: {time.perf_counter() - started:.1f} s", flush=True)
        summarize(backend, runs)
        if backend == "sqlite" and saved is not None:
            os.environ["SHARDLIB_URLS"] = saved


if __name__ == "__main__":
    asyncio.run(main())
