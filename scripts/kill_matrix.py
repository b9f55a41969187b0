"""The kill matrix: SIGKILL a two-phase commit at every protocol point, recover, check.

Needs the servers of ``make pg-up`` (one per shard; they are killed with
``kill -9`` and restarted) and ``SHARDLIB_URLS`` exported::

    make pg-up && eval "$(bash scripts/pg.sh env)" && make kill-matrix

For each kill point (``shardlib.crashlab.KILL_POINTS``), each commit size
(2 shards: asia + europe, the commit log's server not among them; 4 shards:
the log's server ``north_america`` is a participant) and each victim:

* ``coordinator``: the coordinator process is SIGKILLed at the point;
* ``participant``: the server of the shard the coordinator is about to touch
  is SIGKILLed (postmaster and backends), the coordinator goes on and fails,
  the server restarts (WAL crash recovery);
* ``north_america`` (2 shards only): the commit log's server, not a participant;

then ``recover(min_age=0)`` runs and the outcome is checked: committed on all
shards or on none, no prepared transaction left, every table lock free, a
fresh session sees the outcome. Prints a Markdown table; exits 1 if any cell
is not atomic or a coordinator kill ended differently from the protocol's
promise (before the decision is logged: rolled back; after: committed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import pandas as pd

import shardlib
from shardlib import crashlab


def expected(point: str, died: str) -> str | None:
    """What the protocol promises when the coordinator dies; any atomic outcome otherwise."""
    if died != "coordinator":
        return None
    decided = crashlab.KILL_POINTS.index(point) >= crashlab.KILL_POINTS.index(crashlab.COMMITTED_AFTER)
    return "committed on all" if decided else "rolled back on all"


async def run(sizes: list[int], victims: list[str]) -> pd.DataFrame:
    urls = shardlib.parse_urls(os.environ["SHARDLIB_URLS"])
    servers = crashlab.Servers.find(urls)
    engines = shardlib.make_engines(urls)
    await shardlib.reset(engines)
    await shardlib.dispose(engines)
    rows = []
    for size in sizes:
        shards = ["asia", "europe"] if size == 2 else list(shardlib.SHARD_IDS)
        for died in victims:
            if died == "north_america" and size != 2:
                continue
            for point in crashlab.KILL_POINTS:
                started = time.perf_counter()
                tag = f"km{size}-{died[:5]}-{crashlab.KILL_POINTS.index(point)}-{os.getpid()}"
                outcome = await crashlab.crash_case(urls, servers, point, shards, died, tag)
                row = outcome.row()
                want = expected(point, died)
                row["as promised"] = "yes" if want is None or want == outcome.outcome else f"NO (want {want})"
                row["s"] = round(time.perf_counter() - started, 1)
                rows.append(row)
                print(f"{size} shards, {row['who died']:>21} at {point:<20} -> {row['outcome']} ({row['s']} s)",
                      file=sys.stderr, flush=True)
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs the tabulate package)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "/") for v in row) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2,4", help="commit sizes (shards per transaction)")
    parser.add_argument("--victims", default="coordinator,participant,north_america")
    args = parser.parse_args()
    if not os.environ.get("SHARDLIB_URLS", "").strip():
        print("SHARDLIB_URLS is not set: make pg-up, then eval \"$(bash scripts/pg.sh env)\"", file=sys.stderr)
        return 2
    started = time.perf_counter()
    frame = asyncio.run(run([int(s) for s in args.sizes.split(",")], args.victims.split(",")))
    short = frame.copy()
    short["coordinator"] = short["coordinator"].str.replace(r"^failed ShardUnavailable: shard '(\w+)'.*", r"failed: \1 unavailable", regex=True)
    short["coordinator"] = short["coordinator"].str.replace(r"^failed DecisionRefused: .*", "failed: decision not logged", regex=True)
    columns = ["kill point", "shards", "who died", "coordinator", "recover()", "outcome", "atomic", "as promised"]
    print(markdown(short[columns]))
    print(f"\n{len(frame)} cases in {time.perf_counter() - started:.0f} s; "
          f"{int(frame['atomic'].sum())} atomic, {int((frame['as promised'] == 'yes').sum())} as promised")
    return 0 if frame["atomic"].all() and (frame["as promised"] == "yes").all() else 1


if __name__ == "__main__":
    sys.exit(main())
