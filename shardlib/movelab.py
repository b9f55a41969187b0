"""A continent moved under load: writer processes, a move, and the bookkeeping
that proves nothing was lost, duplicated or stranded.

Used by ``tests/test_resharding.py``, ``benchmarks/resharding.py`` and
notebook 14. Three pieces:

* **a writer process** (``python -m shardlib.movelab writer ...``): its own
  engines and catalog (so it routes by whatever map it has read), it inserts
  locations with a report, renames them (adding a report) and deletes them,
  each in :func:`shardlib.run_transaction`, and reads every committed write
  back at once in a fresh session (read-your-writes, in every phase). Each
  committed operation goes to a JSON-lines file with its start and end time;
* :func:`run_under_load`: starts the writers, runs a move's phases while they
  write, stops them, and returns a :class:`LoadReport`;
* the report's checks: the final rows (over every serving database) equal
  what the writers' committed operations say they must be; no id is stored
  twice; nothing of the moved continent is left on the source; every
  read-back found its write.

A writer only changes the rows it inserted, so replaying each writer's log in
order gives the exact expected state, whatever the interleaving.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

WRITER_CONTINENTS = ("Europe", "Asia")


# ---------------------------------------------------------------------- the writer process

async def _writer(writer_id: int, continents: Sequence[str], out: Path, stop: Path, seed: int,
                  data_dir: str | None, think_s: float) -> None:
    import shardlib
    from shardlib import Report, WeatherLocation

    engines = shardlib.make_engines(data_dir=data_dir) if data_dir else shardlib.make_engines()
    Session = shardlib.make_sessionmaker(engines)
    rng = random.Random(seed)
    mine: dict[int, tuple[str, str]] = {}
    counter = 0
    async with Session() as session:  # connect once before saying "ready"
        await session.get(WeatherLocation, 1)
    Path(f"{out}.ready").touch()
    with open(out, "w", buffering=1) as log:
        while not stop.exists():
            counter += 1
            attempts = 0
            kinds = ["insert"] * 5 + (["rename"] * 3 + ["delete"] * 2 if mine else [])
            kind = rng.choice(kinds)
            started = time.time()
            record: dict[str, Any] = {"writer": writer_id, "op": kind, "t0": started}
            try:
                if kind == "insert":
                    continent = rng.choice(list(continents))
                    city = f"w{writer_id}-{counter}"

                    async def insert(session: Any) -> int:
                        nonlocal attempts
                        attempts += 1
                        location = WeatherLocation(continent, city)
                        location.reports.append(Report(float(counter % 40)))
                        session.add(location)
                        await session.flush()
                        return int(location.id)

                    location_id = await shardlib.run_transaction(Session, insert, max_attempts=200,
                                                                 backoff=0.002, max_backoff=0.05)
                    mine[location_id] = (continent, city)
                    record.update(id=location_id, continent=continent, city=city)
                elif kind == "rename":
                    location_id = rng.choice(sorted(mine))
                    continent, _ = mine[location_id]
                    city = f"w{writer_id}-{counter}-renamed"

                    async def rename(session: Any) -> None:
                        nonlocal attempts
                        attempts += 1
                        location = await session.get(WeatherLocation, location_id)
                        location.city = city
                        (await location.awaitable_attrs.reports).append(Report(float(counter % 40)))

                    await shardlib.run_transaction(Session, rename, max_attempts=200, backoff=0.002,
                                                   max_backoff=0.05)
                    mine[location_id] = (continent, city)
                    record.update(id=location_id, continent=continent, city=city)
                else:
                    location_id = rng.choice(sorted(mine))
                    continent, _ = mine.pop(location_id)

                    async def remove(session: Any) -> None:
                        nonlocal attempts
                        attempts += 1
                        location = await session.get(WeatherLocation, location_id)
                        await session.delete(location)

                    await shardlib.run_transaction(Session, remove, max_attempts=200, backoff=0.002,
                                                   max_backoff=0.05)
                    record.update(id=location_id, continent=continent)
                record["t1"] = time.time()
                record["attempts"] = attempts
                # read your write, at once, in a fresh session
                async with Session() as session:
                    found = await session.get(WeatherLocation, record["id"])
                    by_filter = (await session.execute(
                        select(func.count()).select_from(WeatherLocation)
                        .where(WeatherLocation.continent == record["continent"],
                               WeatherLocation.id == record["id"]))).scalar_one()
                if kind == "delete":
                    record["read_ok"] = found is None and by_filter == 0
                else:
                    record["read_ok"] = found is not None and found.city == record["city"] and by_filter == 1
            except Exception as error:  # recorded, never hidden: the report counts them
                import traceback
                record.update(t1=time.time(), error=f"{type(error).__name__}: {error}"[:500], attempts=attempts, tb=traceback.format_exc()[-6000:])
                if kind == "insert":
                    record["uncertain"] = True
            log.write(json.dumps(record) + "\n")
            if think_s:
                await asyncio.sleep(rng.uniform(0, 2 * think_s))
    await shardlib.dispose(engines)


# ---------------------------------------------------------------------- the report

@dataclass
class LoadReport:
    """What happened to the rows while the move ran (see the module docstring)."""

    records: list[dict[str, Any]]
    phases: dict[str, float]
    lost: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    wrong: list[int] = field(default_factory=list)
    duplicated: list[int] = field(default_factory=list)
    stranded: int = 0
    read_errors: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.unexpected or self.wrong or self.duplicated or self.stranded
                    or self.read_errors or self.errors)

    def committed(self, continent: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.records if "error" not in r and (continent is None or r["continent"] == continent)]

    def pause_ms(self, continent: str) -> tuple[float, float]:
        """(median, max) latency in ms, start to commit, of the continent's writes
        that started during the cut-over (from the fence to the new map): what a
        writer waited for; (0, 0) if none started then."""
        start, end = self.phases.get("fencing"), self.phases.get("cut_over")
        if start is None or end is None:
            return 0.0, 0.0
        started = sorted((r["t1"] - r["t0"]) * 1000 for r in self.committed(continent)
                         if start <= r["t0"] <= end)
        if not started:
            return 0.0, 0.0
        return started[len(started) // 2], started[-1]

    def longest_gap_ms(self, continent: str, around_s: float = 1.0) -> float:
        """The longest time in ms without a commit of ``continent`` within
        ``around_s`` seconds of the cut-over window."""
        start, end = self.phases.get("fencing"), self.phases.get("cut_over")
        if start is None or end is None:
            return 0.0
        times = sorted(r["t1"] for r in self.committed(continent) if start - around_s <= r["t1"] <= end + around_s)
        edges = [start - around_s, *times, end + around_s]
        return max(b - a for a, b in zip(edges, edges[1:])) * 1000

    def summary(self) -> dict[str, Any]:
        return {"committed writes": len(self.committed()), "writer errors": len(self.errors),
                "rows lost": len(self.lost), "rows duplicated": len(self.duplicated),
                "rows stranded on the source": self.stranded, "rows unexpected": len(self.unexpected),
                "rows wrong": len(self.wrong), "read-your-writes failures": self.read_errors}

    def timeline(self, bucket_s: float = 0.1) -> Any:
        """Committed writes per second, per continent, in ``bucket_s`` buckets (a DataFrame)."""
        import pandas as pd

        if not self.records:
            return pd.DataFrame()
        t_start = min(r["t0"] for r in self.records)
        rows = [{"t": round((r["t1"] - t_start) // bucket_s * bucket_s, 3), "continent": r["continent"]}
                for r in self.committed()]
        frame = pd.DataFrame(rows)
        table = frame.groupby(["t", "continent"]).size().unstack(fill_value=0) / bucket_s
        return table


def expected_state(initial: Mapping[int, tuple[str, str]], records: Sequence[dict[str, Any]]
                   ) -> dict[int, tuple[str, str]]:
    """The rows there must be: the initial ones, plus each writer's committed log replayed."""
    state = dict(initial)
    for record in sorted(records, key=lambda r: (r["writer"], r["t0"])):
        if "error" in record:
            continue
        if record["op"] == "delete":
            state.pop(record["id"], None)
        else:
            state[record["id"]] = (record["continent"], record["city"])
    return state


async def stored_rows(engines: Mapping[str, Any], continents: Sequence[str]) -> list[tuple[int, str, str, str]]:
    """Every stored location of ``continents`` on every serving database: (id, continent, city, database)."""
    from . import shards
    from .models import WeatherLocation

    table = WeatherLocation.__table__
    rows = []
    for name in shards.current().serving:
        async with engines[name].connect() as conn:
            result = await conn.execute(select(table.c.id, table.c.continent, table.c.city)
                                        .where(table.c.continent.in_(list(continents))))
            rows.extend((int(i), c, city, name) for i, c, city in result)
    return rows


async def check(report: LoadReport, engines: Mapping[str, Any], initial: Mapping[int, tuple[str, str]],
                continents: Sequence[str], source: str | None, moved: str | None) -> LoadReport:
    """Fill ``report``'s findings from the databases as they are now."""
    from .models import WeatherLocation

    expected = expected_state(initial, report.records)
    stored = await stored_rows(engines, continents)
    seen: dict[int, tuple[str, str]] = {}
    for location_id, continent, city, _database in stored:
        if location_id in seen:
            report.duplicated.append(location_id)
        seen[location_id] = (continent, city)
    uncertain = {r.get("id") for r in report.records if r.get("uncertain")}
    report.lost = sorted(i for i in expected if i not in seen)
    report.unexpected = sorted(i for i in seen if i not in expected and i not in uncertain)
    report.wrong = sorted(i for i in expected if i in seen and seen[i] != expected[i])
    report.read_errors = sum(1 for r in report.records if r.get("read_ok") is False)
    report.errors = [r["error"] for r in report.records if "error" in r]
    if source is not None and moved is not None and source in engines:
        table = WeatherLocation.__table__
        async with engines[source].connect() as conn:
            report.stranded = int((await conn.execute(
                select(func.count()).select_from(table).where(table.c.continent == moved))).scalar_one())
    return report


# ---------------------------------------------------------------------- running it

async def run_under_load(
    engines: Mapping[str, Any],
    move: Callable[[Callable[[str], None]], Awaitable[Any]],
    *,
    writers: int = 8,
    continents: Sequence[str] = WRITER_CONTINENTS,
    warm_up_s: float = 1.0,
    cool_down_s: float = 1.0,
    think_s: float = 0.0,
    data_dir: str | None = None,
    source: str | None = None,
    moved: str | None = None,
) -> LoadReport:
    """Start ``writers`` writer processes, ``await move(mark)`` while they write
    (``mark(name)`` records a phase time), stop them and check everything.

    ``data_dir``: the SQLite data directory (``None``: servers from the
    environment, as :func:`shardlib.make_engines` reads them)."""
    initial = {i: (c, city) for i, c, city, _ in await stored_rows(engines, continents)}
    phases: dict[str, float] = {}

    def mark(name: str) -> None:
        phases[name] = time.time()

    with tempfile.TemporaryDirectory() as tmp:
        stop = Path(tmp) / "stop"
        outs = [Path(tmp) / f"writer-{i}.jsonl" for i in range(writers)]
        env = dict(os.environ)
        processes = [
            subprocess.Popen(
                [sys.executable, "-m", "shardlib.movelab", "writer", "--id", str(i), "--out", str(outs[i]),
                 "--stop", str(stop), "--seed", str(1000 + i), "--continents", ",".join(continents),
                 "--think", str(think_s), *(["--data-dir", data_dir] if data_dir else [])],
                env=env, stderr=subprocess.PIPE, text=True)
            for i in range(writers)
        ]
        try:
            deadline = time.monotonic() + 120
            while not all(Path(f"{out}.ready").exists() for out in outs):
                if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                    raise RuntimeError("writer processes did not start; see their stderr")
                await asyncio.sleep(0.05)
            mark("writers_started")
            await asyncio.sleep(warm_up_s)
            mark("move_started")
            await move(mark)
            mark("move_finished")
            await asyncio.sleep(cool_down_s)
        finally:
            stop.touch()
            failures = []
            for process in processes:
                try:
                    _, err = process.communicate(timeout=120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    _, err = process.communicate()
                if process.returncode != 0:
                    failures.append(err[-2000:])
        records = [json.loads(line) for out in outs if out.exists() for line in out.read_text().splitlines()]
    report = LoadReport(records=records, phases=phases)
    report = await check(report, engines, initial, continents, source, moved)
    report.errors.extend(f"writer process failed: {f}" for f in failures)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m shardlib.movelab")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("writer", help="one writer process (see the module docstring)")
    w.add_argument("--id", type=int, required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--stop", required=True)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--continents", default=",".join(WRITER_CONTINENTS))
    w.add_argument("--think", type=float, default=0.0)
    w.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    asyncio.run(_writer(args.id, args.continents.split(","), Path(args.out), Path(args.stop), args.seed,
                        args.data_dir, args.think))


if __name__ == "__main__":
    main()


__all__ = ["LoadReport", "check", "expected_state", "run_under_load", "stored_rows"]
