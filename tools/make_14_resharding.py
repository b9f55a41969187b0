"""Writes notebooks/14_resharding.ipynb's sources (outputs come from ``make notebooks NB=...``).

Kept beside the other tools so the notebook's cells can be reviewed and rewritten as
plain Python; run ``python tools/make_14_resharding.py`` then
``make notebooks NB=notebooks/14_resharding.ipynb``.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

PATH = Path(__file__).resolve().parent.parent / "notebooks" / "14_resharding.ipynb"
cells = []


def md(text: str) -> None:
    cells.append(new_markdown_cell(text.strip("\n")))


def code(text: str, tags: list[str] | None = None) -> None:
    cell = new_code_cell(text.strip("\n"))
    if tags:
        cell.metadata["tags"] = tags
    cells.append(cell)


def solution(text: str) -> None:
    cell = new_code_cell(text.strip("\n"))
    cell.metadata["tags"] = ["solution"]
    cell.metadata["jupyter"] = {"source_hidden": True, "outputs_hidden": True}
    cells.append(cell)


md("""
# 14 · Resharding: moving a continent while it is being written

Every notebook so far lived in a world that never changes: four continents on
four databases, fixed forever. Real sharded systems spend much of their life
changing that map. A shard runs hot and is moved to a bigger server, a new
region arrives, an old database is retired. And the application cannot stop
while that happens.

This notebook makes the shard map **data** with a version, then moves Asia,
the hottest continent of real GeoNames data, to a new database **while other
sessions and processes keep writing it**, one phase at a time: prepare, copy,
catch up, verify, cut over, clean up (or reverse). The same phases, with the
same names, are how Vitess and Citus move shards.
""")

md("""
## Overview

- See the **shard map as data**: a DataFrame per version, and the catalog's
  history of every version.
- Load **real cities** and see the **skew** that makes a move worth doing;
  add a **new continent** (Africa) without moving a row.
- Learn why ids name a **logical shard**, not a database, so `get()` still
  touches one database after a move.
- Run a move **phase by phase**, with each database's rows after every phase:
  writes made during the copy, a **VDiff** that catches a damaged copy, a
  **cut-over** that fences the old place, a **stale process** that gets a
  retryable error, **reverse**, **clean-up**, an **interrupted** move resumed
  and rolled back.
- Chart **writes per second** of four writer processes while a continent moves,
  and compare each phase with **Vitess** and **Citus**.
""")

md("""
## Prerequisites

| Concept | Importance | Notes |
| --- | --- | --- |
| [01 · setup](01_setup.ipynb) | Necessary | Engines, databases, `catalog.db` beside the SQLite shards |
| [02 · inserts](02_inserts.ipynb) | Necessary | Ids from one counter, with their shard in the low 4 bits |
| [05 · identity keys](05_identity_keys.ipynb) | Helpful | `session.get()` goes to one shard |
| [10 · choosing a shard key](10_choosing_a_shard_key.ipynb) | Helpful | Directory sharding, skew, hot shards, rebalancing |
| [12 · loading at scale](12_loading_at_scale.ipynb) | Helpful | `bulk_insert` |
| [13 · schema changes](13_schema_changes.ipynb) | Helpful | Alembic builds a new database's schema; writers running during a change |
""")

md("""
## Time to learn

TTL minutes (method: [CONTRIBUTING.md](../CONTRIBUTING.md), words / 150 + code lines / 15 + 5 per exercise).
""")

md("""
## Imports
""")

code('''
%matplotlib inline
import asyncio
import concurrent.futures
import datetime
import os

import matplotlib.pyplot as plt
import pandas as pd
from IPython.display import display
from sqlalchemy import func, select, text

import shardlib
from shardlib import ContinentMove, ContinentMoved, MoveError, Report, WeatherLocation, movelab, shards
from shardlib.cities import cities_of, counts_by_continent
from shardlib.resharding import VDiffMismatch

DATA_DIR = "shard_data/14_resharding"
FIXED_TIME = datetime.datetime(2024, 1, 1, 12, 0)
LOCATIONS, REPORTS = WeatherLocation.__table__, Report.__table__
''')

md("""
## Set-up

Its own data directory and a fresh state, as in every notebook. `reset()`
also puts the shard map back to version 1.

A continent moves **to another database**. With SQLite that is a new file
beside the others (`asia_2.db`). With servers (`SHARDLIB_URLS`) it must be a
database that exists: `scripts/pg.sh up` creates two spare ones and prints
their URLs as `SHARDLIB_SPARE_URLS`.
""")

code('''
if "engines" in globals():  # this cell ran before: close those engines first
    await shardlib.dispose(engines)
engines = shardlib.make_engines(data_dir=DATA_DIR)
await shardlib.reset(engines)
Session = shardlib.make_sessionmaker(engines)

ON_SERVERS = engines["asia"].dialect.name != "sqlite"
SPARE_URLS = dict(p.split("=", 1) for p in os.environ.get("SHARDLIB_SPARE_URLS", "").split(",") if p)
if ON_SERVERS:
    assert {"spare_1", "spare_2"} <= set(SPARE_URLS), (
        f"on servers the moves need two spare databases in SHARDLIB_SPARE_URLS (scripts/pg.sh up prints them), "
        f"got {sorted(SPARE_URLS)}")
    TARGET, TARGET_URL = "spare_1", SPARE_URLS["spare_1"]
    TARGET_2, TARGET_2_URL = "spare_2", SPARE_URLS["spare_2"]
else:  # new SQLite files in DATA_DIR
    TARGET, TARGET_URL = "asia_2", None
    TARGET_2, TARGET_2_URL = "south_america_2", None
print(f"Asia will move to {TARGET!r}, South America (later) to {TARGET_2!r}")
''')

md("""
## The shard map is data

Until now `SHARD_FOR_CONTINENT` looked like a constant. It is a live view of
the **current shard map**: a `ShardMap` with a version number, the databases
(name and URL; `None` means a SQLite file named after the database), a
**slot** for every continent (its logical shard number), and the
**placement**, which database stores each continent.
""")

code('''
current = shards.current()
print(f"shard map version {current.version}; databases: {list(current.databases)}")
current.frame()
''')

md("""
The map is stored in the **catalog**: `catalog.db` beside the SQLite shards
(with servers, a table in the id counter's database, or wherever
`SHARDLIB_CATALOG_URL` points). Every version is kept; a change inserts
version *n + 1* and never edits an old one. Two movers publishing at once
cannot both win: the second insert of the same version number fails
(compare-and-swap, the way Vitess's topology server in etcd or ZooKeeper
guards its records).

Every session asks the catalog before it routes. On SQLite that costs one
`os.stat()` of `catalog.db` (microseconds); on servers the version is read at
most every half second. So a process started after a move, told nothing,
finds every row.
""")

code('''
shardlib.wrapped((await engines.catalog.history()).set_index("version").fillna("-"))
''')

md("""
## Real cities, real skew

shardlib ships the GeoNames list of cities with at least 15,000 inhabitants
(34,006 cities, CC BY 4.0). Directory sharding by continent puts all of a
continent on one database, and real data is far from even:
""")

code('''
counts = pd.Series(counts_by_continent(), name="cities")
skew = counts.to_frame().assign(share=(counts / counts.sum() * 100).round(1).astype(str) + " %")
assert counts.index[0] == "Asia", f"expected Asia to be the largest continent, got {counts.index[0]}"
skew
''')

md("""
Asia alone has more cities than North and South America and Oceania together:
its database does the most work, and grows fastest. That is what makes a
continent worth moving to a database of its own (or a bigger server).

To keep this notebook quick we load **every tenth city** of each continent in
the map (in GeoNames id order): a tenth of the rows, the same proportions.
Every fifth location gets one weather report, so reports move too.
`rows_per_database()` asks each database itself (a plain `SELECT ... GROUP BY`
on its own engine, no routing), for every database the map names.
""")

code('''
SAMPLE_EVERY = 10


def sample_of(*continents):
    return [city for continent in continents for city in cities_of(continent)[::SAMPLE_EVERY]]


async def load_cities(continents):
    """Every tenth real city of `continents`, and a report for every fifth location."""
    cities = sample_of(*continents)
    await shardlib.bulk_insert(engines, WeatherLocation, [{"continent": c.continent, "city": c.name} for c in cities])
    async with Session() as session:
        ids = (await session.execute(select(WeatherLocation.id).where(WeatherLocation.continent.in_(continents))
                                     .order_by(WeatherLocation.id))).scalars().all()
    await shardlib.bulk_insert(engines, Report, [
        {"location_id": i, "temperature": float(i % 35), "report_time": FIXED_TIME} for i in ids[::5]])
    return len(cities)


async def rows_per_database():
    """Locations per continent and reports, counted by each database of the current map."""
    counts = {}
    for name in shards.current().databases:
        async with engines[name].connect() as conn:
            by_continent = dict((await conn.execute(
                select(LOCATIONS.c.continent, func.count()).group_by(LOCATIONS.c.continent))).all())
            reports = (await conn.execute(select(func.count()).select_from(REPORTS))).scalar_one()
        counts[name] = {**{c: by_continent.get(c, 0) for c in shards.current().continents}, "reports": reports}
    return pd.DataFrame(counts).T.rename_axis("database")


await shardlib.reset(engines)  # idempotent: the same rows every time this cell runs
loaded = await load_cities(list(shardlib.CONTINENTS))
print(f"{loaded:,} cities loaded")
await rows_per_database()
''')

code('''
fig, ax = plt.subplots(figsize=(6, 2.6))
(await rows_per_database()).drop(columns="reports").sum(axis=1).plot.barh(ax=ax, color="tab:blue")
ax.invert_yaxis()
ax.set_xlabel("locations stored")
ax.set_title("One continent per database: asia does the most work")
fig.tight_layout()
plt.show()
plt.close(fig)
''')

md("""
## Ids name a logical shard, not a database

Since notebook 02 the low 4 bits of a location id say where it lives. They
name the continent's **logical shard** (its *slot*, fixed forever), and the
map says which database holds that slot **today**:

    id = (sequence_number << 4) | slot          database = placement[continent of slot]

So an id stays valid when its continent moves: nobody has to rewrite ids,
foreign keys or URLs. The cost is one dictionary lookup in the current map
per id. Instagram maps thousands of logical shards onto a few PostgreSQL
servers this way, and Vitess routes by a *keyspace id* that its shard map
resolves, for the same reason: data moves, ids must not.
""")

code('''
async with Session() as session:
    tokyo = (await session.execute(select(WeatherLocation).where(WeatherLocation.city == "Tokyo"))).scalar_one()
TOKYO_ID = tokyo.id
print(f"make_id(3, 'asia') = {shardlib.make_id(3, 'asia')}: sequence number 3, slot {shardlib.make_id(3, 'asia') & 15}")
print(f"Tokyo's id {TOKYO_ID} = {TOKYO_ID >> 4} << 4 | {TOKYO_ID & 15}: slot {shards.slot_of_id(TOKYO_ID)}, "
      f"logical shard of {shards.current().continent_for_slot(TOKYO_ID & 15)!r}, "
      f"stored today on {shards.shard_for_id(TOKYO_ID)!r}")

async with Session() as session:
    with shardlib.trace(engines) as t:
        found = await session.get(WeatherLocation, TOKYO_ID)
assert found.city == "Tokyo" and t.shards() == ["asia"], f"expected Tokyo from asia alone, got {found} from {t.shards()}"
t.frame()
''')

md("""
## A new continent, without moving a row

Our map has four continents; the data has more. A continent the map does not
know is refused at once, with the valid ones read from the map:
""")

code('''
try:
    WeatherLocation("Africa", "Lagos")
except ValueError as error:
    print(error)
''')

md("""
`add_continent` gives Africa the next free slot (4) on an **existing**
database, here `europe`, and publishes map version 2. No row moves: nobody
stored Africa before. (The cell checks first, so it can run again.)
""")

code('''
if "Africa" not in shardlib.CONTINENTS:
    await shardlib.add_continent(engines, "Africa", "europe")
async with Session() as session:
    africans = (await session.execute(select(func.count()).select_from(WeatherLocation)
                                      .where(WeatherLocation.continent == "Africa"))).scalar_one()
if africans == 0:
    await load_cities(["Africa"])
print(f"map version {shards.current().version}")
display(shards.current().frame())
await rows_per_database()
''')

md("""
### What shardlib refuses to move, and why

shardlib keeps every continent of a database in the **same two tables**. That
makes two kinds of move unsafe:

- **to a database that already serves a continent**: until the cut-over, the
  half-copied continent would sit in that database's `weather_locations`, and
  every query that does not name a continent (a fan-out) would read those rows
  there *and* on the source: counted twice;
- **off a database that also serves another continent**: after the cut-over
  the left-behind copy would be read by fan-outs of the database's other
  continent until clean-up.

So the target must serve nothing yet (a new database, or one whose continents
have moved away), and the source must serve only the moving continent. Citus
and Vitess do not need this rule, because each of their shards is a table (or a
key range) of its own that no other shard's queries read. Now that `europe`
holds Europe and Africa, both errors can be seen (nothing is changed: the
checks run when the move is created):
""")

code('''
for continent, target in (("Asia", "europe"), ("Europe", TARGET)):
    try:
        ContinentMove(engines, continent, target, url=TARGET_URL)
    except MoveError as error:
        print(f"{continent} -> {target}: {error}\\n")
''')

md("""
## Moving Asia, one phase at a time

`ContinentMove(engines, "Asia", TARGET)` runs the phases one call at a time
(`shardlib.move_continent()` runs them all). What each phase does:

```mermaid
sequenceDiagram
    participant M as mover
    participant S as asia (source)
    participant T as asia_2 (target)
    participant C as catalog (shard map)
    participant A as application
    M->>C: prepare: add database asia_2 (version +1)
    M->>T: prepare: build the schema, fence Asia on the target
    M->>S: prepare: capture triggers log every Asia change
    A->>S: reads and writes go on
    M->>T: copy: batches of locations with their reports
    M->>T: catch up: re-read the logged rows on S, write their current state
    M->>M: verify: compare S and T row by row (VDiff)
    M->>S: cut over: fence Asia on the source (writes now fail, retryably)
    M->>T: last catch-up, lift the target's fence
    M->>C: publish: Asia is on asia_2 (version +1)
    A->>T: reads and writes go to asia_2
    M->>S: clean up: delete Asia's rows (the fence stays)
```

The **fences** are small triggers with one table of fenced continents: a
write to a fenced continent fails with `ContinentMoved`. The mover's own
writes pass them, because inside its transactions it holds a row in a table
no other transaction can see. The **change capture** is triggers too:
every insert, update and delete of an Asian row appends `(table, primary key)`
to `shardlib_changes`. Vitess reads MySQL's binlog instead, and PostgreSQL
could stream logical replication; triggers work the same on SQLite and
PostgreSQL, need no server settings, and cost the source one small insert per
changed row while a move runs.
""")

md("""
### Prepare

`prepare()` adds the new database to the map (version 3: it is named, but
serves nothing, so no query reads it yet), builds its schema through the
migrations, fences Asia there, and starts capturing Asia's changes on `asia`.
""")

code('''
move = ContinentMove(engines, "Asia", TARGET, url=TARGET_URL, batch_size=250)
await move.prepare()
print(move)
print(f"map version {shards.current().version}; databases {list(shards.current().databases)}; "
      f"serving {list(shards.current().serving)}")
await rows_per_database()
''')

md("""
### Copy, while another process writes

`copy()` reads 250 Asian locations at a time (with their reports) in one
snapshot of `asia` and writes them to the target, in id order. The
application does not stop meanwhile. To see exactly what happens to writes
made **during** the copy, we pause the copy after its first batch (a move
calls `on_phase` after every batch) and let "another process" write to Asia:
its own event loop in a thread, its own engines and sessions, routing by the
map it reads from the catalog. It changes rows the copy **has already
copied**:

- renames the first Asian city,
- adds a report to the third,
- deletes the fourth,
- and inserts a new Asian city (its new id is larger than every copied one).

*Exercise 1 below asks about the rename: predict before you run the copy.*
""")

code('''
async def asian_ids():
    async with engines["asia"].connect() as conn:
        return (await conn.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.continent == "Asia")
                                   .order_by(LOCATIONS.c.id))).scalars().all()


async def write_like_another_process(first, third, fourth):
    """Another application process: its own engines and sessions, the map read from the catalog."""
    other = shardlib.make_engines(data_dir=DATA_DIR)
    OtherSession = shardlib.make_sessionmaker(other)
    try:
        async with OtherSession() as session:
            location = await session.get(WeatherLocation, first)
            location.city = location.city.split(" (")[0] + " (renamed during the copy)"
            third_location = await session.get(WeatherLocation, third)
            (await third_location.awaitable_attrs.reports).append(Report(21.5, FIXED_TIME))
            gone = await session.get(WeatherLocation, fourth)
            if gone is not None:
                await session.delete(gone)
            session.add(WeatherLocation("Asia", "Written during the copy"))
            await session.commit()
    finally:
        await shardlib.dispose(other)


def in_another_thread(coroutine):
    """Run `coroutine` to the end in a thread with its own event loop; wait for it."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()
''')

md("""
## Exercise 1: when does the target get the rename?

The other process renames the first Asian city **after** the copy has
copied it. In which phase does `TARGET` first hold the **new** name:
`"copy"`, `"catch_up"` or `"cut_over"`?

*Hint:* a batch is read in one snapshot and never read again; what did
`prepare()` install on the source, and which phase reads what it recorded?
""")

code('''
# your prediction: "copy", "catch_up" or "cut_over"
rename_applied_in = ...
''')

code('''
ids_before_copy = await asian_ids()
FIRST, THIRD, FOURTH = ids_before_copy[0], ids_before_copy[2], ids_before_copy[3]
batches = []


def after_each_batch(phase):
    batches.append(phase)
    if len(batches) == 1:  # the first batch is on the target: now the other process writes
        in_another_thread(write_like_another_process(FIRST, THIRD, FOURTH))


async def city_on(database, location_id):
    async with engines[database].connect() as conn:
        return (await conn.execute(select(LOCATIONS.c.city).where(LOCATIONS.c.id == location_id))).scalar()


move.on_phase = after_each_batch
await move.copy()
move.on_phase = None
target_city_after = {"copy": await city_on(TARGET, FIRST)}
print(f"city {FIRST}: on asia {await city_on('asia', FIRST)!r}, on {TARGET} {target_city_after['copy']!r}")
print(f"changes captured on asia, waiting for catch-up: {await move.pending_changes()}")
await rows_per_database()
''')

md("""
Read the table with the four writes in mind. The deleted city is already gone
from the target: at its end `copy()` deletes target rows the source no longer
has. The new city was copied by a later batch. But the rename and the new
report are on `asia` only: the copy had read those rows before they changed,
and never reads them again. The capture triggers logged all of it.

`verify()` (the VDiff, below) already knows those rows are *in flight*: they
differ, but a captured change of theirs waits, so they are not counted as
differences.
""")

code('''
diff = await move.verify()
print(f"differences: {len(diff)}; in flight (a captured change not applied yet): {diff.attrs['in flight']}; "
      f"compared: {diff.attrs['compared']}")
''')

md("""
### Catch up

`catch_up()` reads the log in order, re-reads those rows **as they are now**
on the source, writes that state to the target (insert, update, or delete when
the row is gone), and only then deletes the log entries it applied. Applying a
row's current state twice does no harm, so a crash between the two steps
loses nothing.
""")

code('''
applied = await move.catch_up()
target_city_after["catch_up"] = await city_on(TARGET, FIRST)
diff = await move.verify()
assert len(diff) == 0 and diff.attrs["in flight"] == 0, (
    f"expected no difference after catch-up, got {len(diff)} and {diff.attrs['in flight']} in flight: run from the prepare cell")
print(f"applied {applied} captured changes; now on {TARGET}: {target_city_after['catch_up']!r}")
print(f"VDiff: {len(diff)} differences, {diff.attrs['in flight']} in flight")
await rows_per_database()
''')

code('''
# CHECK: compare with the names the target really had after each phase
observed = next((phase for phase, city in target_city_after.items() if city and "renamed" in city), "cut_over")
shardlib.check_answer("rename_applied_in", rename_applied_in, observed, cell="the rename_applied_in cell above")
''', tags=["check"])

solution('''
# Solution
# The copy read the first batch before the other process renamed the city, and a copied
# batch is never read again: after copy() the target still has the old name. The capture
# trigger on asia logged (weather_locations, id); catch_up() re-read the row as it is now
# and wrote the new name to the target, before any cut-over.
rename_applied_in = "catch_up"
assert "renamed" not in target_city_after["copy"] and "renamed" in target_city_after["catch_up"], target_city_after
''')

md("""
### Verify: a VDiff that finds a damaged copy

`verify()` compares the continent on source and target column by column:
every location, and every report through the mover's id map (report ids are
per database, so moved reports get new ids on the target; this is why Vitess
asks for global sequences before a resharding). It returns the differences as
a DataFrame: **missing** on the target, **extra** on the target, or
**different**.

To see it catch something, we damage the target behind the mover's back: a
wrong city name, a missing location, an extra one. The target's fence would
refuse these writes, so we borrow the mover's trick: a row in
`shardlib_mover_token` inside our transaction (removed before the commit).
""")

code('''
ids = await asian_ids()
GHOST_ID = (99_999 << 4) | shards.slot_for_continent("Asia")
async with engines[TARGET].begin() as conn:
    await conn.execute(text("INSERT INTO shardlib_mover_token (held) VALUES (1)"))  # pass the fence
    await conn.execute(LOCATIONS.update().where(LOCATIONS.c.id == ids[0]).values(city="Atlantis"))
    await conn.execute(REPORTS.delete().where(REPORTS.c.location_id == ids[1]))
    await conn.execute(LOCATIONS.delete().where(LOCATIONS.c.id == ids[1]))
    if (await conn.execute(select(LOCATIONS.c.id).where(LOCATIONS.c.id == GHOST_ID))).first() is None:
        await conn.execute(LOCATIONS.insert().values(id=GHOST_ID, continent="Asia", city="Ghost"))
    await conn.execute(text("DELETE FROM shardlib_mover_token"))

diff = await move.verify()
assert set(diff["kind"]) == {"different", "missing", "extra"}, f"expected all three kinds, got {diff}"
shardlib.wrapped(diff)
''')

md("""
`cut_over()` runs a last catch-up and `verify()` itself, and refuses while
anything differs. The map does not change:
""")

code('''
try:
    await move.cut_over()
except VDiffMismatch as error:
    print(error)
assert shardlib.SHARD_FOR_CONTINENT["Asia"] == "asia", "the map must not change on a failed verify"
''')

md("""
How to repair? Here nobody knows *why* the target is wrong, so the safe
answer is to throw the copy away: `abort()` deletes the target's partial copy
and stops the capture on the source (which the mover never changed, so it
still holds every row); then the move starts again. The three
phases in one cell this time:
""")

code('''
await move.abort()
print(f"after abort: {move}; Asia rows on {TARGET}: {(await rows_per_database()).loc[TARGET, 'Asia']}")
move = ContinentMove(engines, "Asia", TARGET, url=TARGET_URL, batch_size=250)
await move.prepare()
await move.copy()
await move.catch_up()
diff = await move.verify()
assert len(diff) == 0, f"expected a clean copy after starting over, got {diff}"
print(f"{move}; VDiff: {len(diff)} differences in {diff.attrs['compared']}")
await rows_per_database()
''')

md("""
## Exercise 2: where does `get()` go after the move?

The next cell cuts over. Afterwards a fresh session runs
`session.get(WeatherLocation, TOKYO_ID)`. Tokyo's id was made when Asia lived
on `asia`, and nobody rewrites it. Which database(s) will run SQL for that
`get()`? Answer with a list of database names (the new one is `TARGET`).

*Hint:* re-read "Ids name a logical shard, not a database": what do the low
4 bits name, and who says where that is today? Until clean-up `asia` still
holds a copy of Tokyo.
""")

code('''
# your prediction: a list of database names, e.g. ["asia"]
get_runs_on = ...
''')

md("""
### Cut over

`cut_over()` fences Asia on the **source** (on PostgreSQL under a `LOCK
TABLE ... IN SHARE ROW EXCLUSIVE MODE`, which waits for writers already
running and blocks new ones for the few milliseconds the fence takes; on
SQLite the file's single write lock does the same), applies the last captured
changes, lifts the target's fence, and **publishes** the new map, version 4.
Writes to Asia pause from the fence to the publication: that pause is what a
cut-over costs. The time differs from run to run, so it is printed as
measured, never compared.

In the same cell, a session of the application has loaded Tokyo from `asia`
**before** the cut-over and commits a change **after** it: its transaction
spans the switch. (The cell runs this once; running it again finds the move
done.)
""")

code('''
if move.phase != "cut_over":
    map_before_cut_over = shards.current()  # version 3 (a stale process below routes by it)
    async with Session() as session:
        early = await session.get(WeatherLocation, TOKYO_ID)  # read from asia, before the switch
        pause_ms = await move.cut_over()
        early.city = "Tokyo (changed across the cut-over)"
        try:
            await session.commit()
            across = "committed"
        except ContinentMoved as error:
            across = f"ContinentMoved on {error.shard!r}, retryable: {shardlib.is_retryable(error)}"
    print(f"cut-over: writes to Asia paused for {pause_ms:.1f} ms (measured)")
    print(f"the transaction open across the cut-over: {across}")
    assert across.startswith("ContinentMoved"), f"a change made across the cut-over must not commit on asia: {across}"
assert shardlib.SHARD_FOR_CONTINENT["Asia"] == TARGET, f"expected Asia on {TARGET}, the map says {dict(shardlib.SHARD_FOR_CONTINENT)}"
print(f"map version {shards.current().version}")
display(shards.current().frame())
await rows_per_database()
''')

md("""
Asia is now served by the target; `asia` still holds a complete, fenced copy
(until clean-up) and serves no continent, so no query reads it. The
transaction that spanned the switch changed nothing: its `UPDATE` reached
`asia`, where the fence refused it. `ContinentMoved` is **retryable**: run
again, the transaction reads the new map and writes to the new place.
""")

code('''
# CHECK: a fresh session, traced by engine events (while Asia is cut over, not yet moved on)
if move.phase == "cut_over":
    async with Session() as session:
        with shardlib.trace(engines) as t:
            found = await session.get(WeatherLocation, TOKYO_ID)
    assert found is not None and found.city.startswith("Tokyo"), f"expected Tokyo, got {found}"
    get_observed = t.shards()
shardlib.check_answer("get_runs_on", shardlib.shard_list(get_runs_on), get_observed, cell="the get_runs_on cell above")
''', tags=["check"])

solution('''
# Solution
# The low 4 bits of Tokyo's id are Asia's slot (1), a logical shard. The session resolves
# the slot through the CURRENT map (version 4), which places Asia on TARGET, so get() runs one
# SELECT there and nowhere else: not on asia, whose copy is fenced and no longer serves Asia.
get_runs_on = [TARGET]
async with Session() as session:
    with shardlib.trace(engines) as t:
        await session.get(WeatherLocation, TOKYO_ID)
assert t.shards() == [TARGET], t.shards()
''')

md("""
## What a stale process gets

Every process re-reads the map before it routes, but on servers at most every
half second, and a process may be slow for other reasons. So for a moment a
process can still route Asia to `asia`. It must **never** write there: that
row would be stranded on a database nobody reads for Asia.

We play such a process: the map of version 3 is activated again, and its
catalog is told not to look for a newer one. Then it inserts an Asian city.
""")

code('''
async def as_a_stale_process(work):
    """Run `await work()` in this process routing by the map from before the cut-over."""
    catalog = engines.catalog
    refresh = catalog.refresh
    catalog.refresh = lambda *args, **kw: shards.current()  # never re-reads the catalog
    shards.activate(map_before_cut_over)
    try:
        return await work()
    finally:
        catalog.refresh = refresh
        await catalog.load()  # back to the current map


async def insert_asian_city():
    async with Session() as session:
        session.add(WeatherLocation("Asia", "Written by a stale process"))
        try:
            await session.commit()
            return f"committed, routed by map version {shards.current().version}"
        except ContinentMoved as error:
            return error


outcome = await as_a_stale_process(insert_asian_city)
print("\\n".join(str(outcome).splitlines()[:2]))  # the message (the SQL and its parameters follow)
''')

md("""
The fence on `asia` refused the insert: nothing was written, and the error
names the continent, the database, the version the fence was set at and the
version the process routed by. It is a `ShardConflict`, so
`shardlib.is_retryable()` says yes and `shardlib.run_transaction()` runs the
transaction again; the fence also marked the catalog stale, so the next
attempt re-reads the map first and writes to the new place:
""")

code('''
assert isinstance(outcome, ContinentMoved) and shardlib.is_retryable(outcome), f"expected a retryable ContinentMoved, got {outcome!r}"


async def add_city(session):
    location = WeatherLocation("Asia", "Written after a retry")
    session.add(location)
    await session.flush()
    return location.id


with shardlib.trace(engines) as t:
    new_id = await shardlib.run_transaction(Session, add_city)
stray = {name: await city_on(name, new_id) for name in ("asia", TARGET)}
assert stray == {"asia": None, TARGET: "Written after a retry"}, stray
print(f"retried: id {new_id} written on {[s for s in t.shards() if s != 'north_america']}, "
      f"not on asia: {stray}")
''')

md("""
## Exercise 3: a stale process that updates

A different stale process, routing by version 3 again, **renames** Tokyo with
a Core `UPDATE ... WHERE id = TOKYO_ID`. `asia` still holds its old copy of
Tokyo (no clean-up yet). What happens? Answer with one of:

- `"renamed on asia"`: the old copy is changed, nobody notices;
- `"renamed on the target"`: shardlib re-routes it;
- `"ContinentMoved"`: refused, nothing written.

*Hint:* which rows do the fence triggers on `asia` look at, and does it
matter whether the write is an `INSERT` or an `UPDATE`?
""")

code('''
# your prediction: "renamed on asia", "renamed on the target" or "ContinentMoved"
stale_update = ...
''')

code('''
# CHECK: play it, then look at both databases
async def rename_tokyo():
    async with Session() as session:
        try:
            await session.execute(WeatherLocation.__table__.update().where(WeatherLocation.id == TOKYO_ID)
                                  .values(city="Tokyo (stale)"))
            await session.commit()
        except ContinentMoved:
            return "ContinentMoved"
    if await city_on("asia", TOKYO_ID) == "Tokyo (stale)":
        return "renamed on asia"
    return "renamed on the target" if await city_on(TARGET, TOKYO_ID) == "Tokyo (stale)" else "nothing"


if move.phase == "cut_over":  # the exercise's situation: cut over, asia still holds its fenced copy
    stale_update_observed = await as_a_stale_process(rename_tokyo)
shardlib.check_answer("stale_update", stale_update, stale_update_observed, cell="the stale_update cell above")
''', tags=["check"])

solution('''
# Solution
# The stale map sends the UPDATE to asia. The fence there is a trigger on every INSERT,
# UPDATE and DELETE of weather_locations and weather_reports whose id carries a fenced slot:
# Asia's rows cannot be changed on asia any more, whichever statement tries. Nothing is
# written, the error is retryable, and a retry routes by the current map.
stale_update = "ContinentMoved"
assert await as_a_stale_process(rename_tokyo) == "ContinentMoved"
assert await city_on("asia", TOKYO_ID) != "Tokyo (stale)" and await city_on(TARGET, TOKYO_ID) != "Tokyo (stale)"
''')

md("""
## Reverse: moving back before clean-up

Until clean-up the old database keeps its copy as of the cut-over. If the new
database misbehaves, `reverse()` moves the continent back with the same
phases, over that old copy (reports get their old ids back through the
turned-around report id map), and cuts over again: version 5. The row written on the target meanwhile (the
retried city) comes back with it. Vitess's `ReverseTraffic`
does the same with a reverse replication stream it starts at the switch.
(Run again, the cell finds the move already reversed.)
""")

code('''
if move.phase == "cut_over":
    back = await move.reverse()
assert shardlib.SHARD_FOR_CONTINENT["Asia"] == "asia", f"expected Asia back on asia, got {dict(shardlib.SHARD_FOR_CONTINENT)}"
assert await city_on("asia", new_id) == "Written after a retry", "the write made on the target must come back"
print(f"{move}; map version {shards.current().version}")
await rows_per_database()
''')

md("""
## All at once, then clean-up

`shardlib.move_continent()` runs prepare, copy, catch-up, verify and cut-over
in one call; `clean_up=False` leaves the last phase to us. `clean_up()` waits
a moment first (twice the catalog's refresh interval, so that every process
has re-read the map and transactions from before the cut-over have ended),
deletes the continent's rows on the source in batches, and stops the capture.
The source **keeps its fence**: a process that never re-read the map gets
`ContinentMoved` for any row still there.

Why wait at all? Once the rows are gone, the fence has nothing to fire on: a
stale process's `UPDATE ... WHERE id = ...` on `asia` matches no row. That is
no stray write, but its change is lost without a word (a Core `UPDATE` does
not check how many rows it matched; the ORM does, and shardlib turns its
"0 rows" into `ContinentMoved`). Waiting until every process has re-read the
map closes that window.
""")

code('''
if shardlib.SHARD_FOR_CONTINENT["Asia"] != TARGET:
    again = await shardlib.move_continent(engines, "Asia", TARGET, url=TARGET_URL, clean_up=False)
    print(f"{again}; copied {again.stats.locations_copied:,} locations and {again.stats.reports_copied:,} reports")
    display(await rows_per_database())
    deleted = await again.clean_up()
    print(f"clean-up deleted {deleted:,} rows on asia")
print(f"map version {shards.current().version}")
await rows_per_database()
''')

md("""
The catalog kept every version of the map, with the reason each was published:
""")

code('''
shardlib.wrapped((await engines.catalog.history()).set_index("version").fillna("-"))
''')

md("""
## An interrupted move: resume or roll back

A mover can die at any point: an exception, a deploy, `kill -9`. Each phase
records itself in `shardlib_moves` on the source, and shardlib keeps one rule:
**the map always points at a complete copy**. Before the new map is published
that is the source (the mover never changes it); afterwards the target.
`ContinentMove.resume(engines, continent)` finds the interrupted move; then
`finish()` runs the remaining phases, or `abort()` undoes it (only before the
new map is published; afterwards only `reverse()` can go back).

`tests/test_resharding.py` crashes a move after every phase, and kills a mover
process with SIGKILL; here we crash South America's move (to `TARGET_2`) twice
with an exception from `on_phase`. First right after the source was
**fenced**, before the new map was published:
""")

code('''
class MoverCrashed(Exception):
    pass


async def crashing_move(continent, target, url, crash_after):
    def hook(phase):
        if phase == crash_after:
            raise MoverCrashed(f"the mover died right after phase {phase!r}")

    m = ContinentMove(engines, continent, target, url=url, batch_size=100, on_phase=hook)
    try:
        await m.prepare()
        await m.copy()
        await m.catch_up()
        await m.cut_over()
    except MoverCrashed as crash:
        return str(crash)
    return "no crash"


async def add_south_american_city(name):
    try:
        async with Session() as session:
            session.add(WeatherLocation("South America", name))
            await session.commit()
        return "written"
    except ContinentMoved:
        return "ContinentMoved (fenced)"


print(await crashing_move("South America", TARGET_2, TARGET_2_URL, crash_after="fenced"))
print(f"map: South America on {shardlib.SHARD_FOR_CONTINENT['South America']!r}; "
      f"a write now: {await add_south_american_city('During the outage')}")
resumed = await ContinentMove.resume(engines, "South America")
print(f"found: {resumed}")
await resumed.abort()
print(f"after abort(): a write: {await add_south_american_city('After the abort')}")
await rows_per_database()
''')

md("""
While the mover was dead, South America could not be written: fenced on the
source, not yet published. A real system would alert on that; `abort()` (or
`finish()`) ends it. Now a crash right after the **copy**, resumed and
finished (the cell checks first whether South America has moved already):
""")

code('''
if shardlib.SHARD_FOR_CONTINENT["South America"] != TARGET_2:
    print(await crashing_move("South America", TARGET_2, TARGET_2_URL, crash_after="copied"))
    resumed = await ContinentMove.resume(engines, "South America")
    print(f"found: {resumed}")
    await resumed.finish()
assert shardlib.SHARD_FOR_CONTINENT["South America"] == TARGET_2, dict(shardlib.SHARD_FOR_CONTINENT)
print(f"map version {shards.current().version}")
await rows_per_database()
''')

md("""
## Under load: four writer processes and a timeline

Now the real thing, with numbers. `shardlib.movelab.run_under_load` starts
**four writer processes** (separate Python processes with their own engines,
routing by whatever map they have read). Each inserts Asian and North American
locations with a report, renames them (adding a report) and deletes them, each
in `run_transaction`, and reads every committed write back at once in a fresh
session. Meanwhile we move Asia back from `TARGET` to `asia` (which serves
nothing now), all phases. Afterwards the report replays every writer's log of
committed operations and compares with the rows stored on every database:
nothing may be lost, duplicated, wrong or left on the source.
""")

code('''
source = shardlib.SHARD_FOR_CONTINENT["Asia"]
destination = "asia" if source == TARGET else TARGET
holder = {}


async def move_asia(mark):
    m = ContinentMove(engines, "Asia", destination, batch_size=200, on_phase=mark)  # both are in the map
    await m.prepare()
    await m.copy()
    await m.catch_up()
    await m.cut_over()
    await m.clean_up()
    holder["move"] = m


report = await movelab.run_under_load(
    engines, move_asia, writers=4, continents=("Asia", "North America"),
    data_dir=None if ON_SERVERS else os.path.abspath(DATA_DIR), source=source, moved="Asia",
    warm_up_s=1.0, cool_down_s=1.0)
facts = {key: value for key, value in report.summary().items() if key != "committed writes"}
assert report.ok, f"the move lost or broke something: {facts}, errors {report.errors[:3]}"
p = report.phases
asia = report.committed("Asia")
assert any(p["move_started"] <= r["t1"] <= p["cut_over"] for r in asia), "expected Asia writes committed during the move"
assert any(r["t1"] > p["cut_over"] for r in asia), "expected Asia writes committed after the cut-over"
print(f"moved Asia {source} -> {destination} under 4 writer processes")
print(pd.Series(facts).to_string())
median_ms, max_ms = report.pause_ms("Asia")
print(f"Asia writes started during the cut-over took {median_ms:.1f} ms (measured) median, {max_ms:.1f} ms (measured) at most")
''')

md("""
Every count is zero, on every run: that is the claim. Rates and pauses differ
from run to run (and machine to machine), so they are printed as measured and
shown in the chart; the chart is not compared by the notebook tests.
`make bench` runs `benchmarks/resharding.py` (8 writers, all of Asia's 12,523
cities) and the README lists its numbers.
""")

code('''
BUCKET_S = 0.25
timeline = report.timeline(bucket_s=BUCKET_S)
timeline = timeline.reindex([round(i * BUCKET_S, 3) for i in range(int(timeline.index.max() / BUCKET_S) + 1)],
                            fill_value=0)  # buckets without a commit count as 0
t0 = min(r["t0"] for r in report.records)
fig, ax = plt.subplots(figsize=(8, 3.4))
for continent in timeline.columns:
    ax.plot(timeline.index, timeline[continent], label=f"{continent} commits/s", drawstyle="steps-post")
spans = [("move_started", "copied", "copy", "tab:blue"), ("copied", "fencing", "catch up + verify", "tab:green"),
         ("fencing", "cut_over", "fenced", "tab:red"), ("cut_over", "cleaned_up", "drain + clean-up", "tab:gray")]
for start, end, label, color in spans:
    if start in p and end in p:
        ax.axvspan(p[start] - t0, max(p[end], p[start] + 0.02) - t0, color=color, alpha=0.2, label=label)
ax.set_xlabel("seconds since the writers started")
ax.set_ylabel("committed writes / s")
ax.set_title(f"Moving Asia {source} -> {destination} while 4 processes write (this run)")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
fig.tight_layout()
plt.show()
plt.close(fig)
''')

md("""
Asia's writers keep committing through the copy and catch-up. The red band is
the fence: the only time Asia's writes wait. Writes that hit it are refused
with `ContinentMoved` and retried by `run_transaction`: they show up as slower
writes, never as errors. North America's writers do not notice the move at
all, apart from sharing the machine with it.
""")

md("""
## What Vitess and Citus do at each phase

| Phase | shardlib | Vitess (`MoveTables`, `Reshard`) | Citus (shard move) |
| --- | --- | --- | --- |
| map | a versioned `ShardMap` in the catalog | keyspaces, shards (key ranges) and routing rules in the topology server (etcd, ZooKeeper) | `pg_dist_shard` and `pg_dist_placement` on the coordinator |
| prepare | add the database, build its schema, fence the target, capture triggers on the source | create the target keyspace or shards and a VReplication workflow; traffic still goes to the source | `citus_move_shard_placement()` creates the shard's tables on the target node and sets up logical replication |
| copy | batches in id order, one snapshot each | copies each table in primary-key order, catching up from the binlog between copy cycles | an initial copy of the shard's rows |
| catch up | re-read the logged rows, write their current state | VReplication applies the binlog's row events from the recorded position, continuously | logical replication applies the WAL changes |
| verify | `verify()`: a VDiff DataFrame, cut-over refused on a difference | `VDiff`: row-by-row comparison at a consistent replication position | no separate diff: it relies on logical replication |
| cut over | fence the source, last catch-up, publish version *n + 1* | `SwitchTraffic`: reads first, then writes: the source stops taking writes, the target catches up to its position, a reverse stream starts, routing switches; vtgate can **buffer** queries meanwhile | writes to the shard are blocked for the final catch-up, then the metadata is switched |
| reverse | `reverse()` before clean-up | `ReverseTraffic`, using the reverse stream | another move back |
| clean up | `clean_up()`: delete the source rows, keep the fence | `Complete`: drops the source tables and routing rules (or keeps the data) | the old placement is dropped once no query uses it |

What a production system adds on top of what you saw:

- **Buffering at the router.** shardlib hands the application a retryable
  `ContinentMoved` and relies on `run_transaction`. vtgate (Vitess's router)
  can instead **hold** queries for the few seconds of a switch (its
  `--enable_buffer` option) and send them on to the new shards afterwards:
  the application sees a slow query, not an error.
- **Throttling by replication lag.** A copy competes with the application for
  the source's disk and its replicas. Vitess's tablet throttler slows
  VReplication down when replicas lag behind the primary; shardlib's copy only
  has `batch_size`.
- **Shards that own their tables.** Citus shards are tables of their own and
  Vitess moves key ranges, so a target may already serve other shards; shardlib
  shares one table per database and therefore refuses such moves.
- **Operations**: moves running as background workflows with progress and
  ETA, alerts when a move stalls (a dead mover leaves a continent fenced), and
  many moves planned at once by a rebalancer (`citus_rebalance_start()`,
  Vitess's `Reshard` into more shards).
""")

md("""
## Summary

- The shard map is **data**: a `ShardMap` with a version, stored with every
  earlier version in the catalog (`catalog.db` on SQLite); sessions re-read it
  before routing, so every process follows a move.
- Ids name a **logical shard** (the continent's slot), resolved through the
  current map: after a move `get()` still touches exactly one database, the new
  one.
- New continents join the map on an existing database without moving a row;
  unknown continents are refused with the valid ones named.
- A move has phases: **prepare** (target schema, fences, change capture),
  **copy** in batches, **catch up** on what changed meanwhile, **verify**
  (VDiff), **cut over** (fence the source, publish the new version: a pause of
  milliseconds), **clean up** or **reverse**. An interrupted move can be
  resumed or, before publication, aborted; the map always points at a complete
  copy.
- A stale process or an open transaction that reaches the old place gets a
  retryable `ContinentMoved`, never a silent stray write.
- shardlib only moves a continent to a database that serves nothing, from one
  that serves nothing else: continents share tables, so anything else would be
  read twice.

## What's next

This is the last notebook of the set. Go back to
[00 · overview](00_overview.ipynb) for the map of all of them, run
`make bench` to measure a move of all of Asia on your machine, or read
`shardlib/resharding.py`: its docstrings explain every phase.
""")

nb = new_notebook(cells=cells, metadata={
    "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
})

if __name__ == "__main__":
    import sys

    minutes = sys.argv[1] if len(sys.argv) > 1 else "60"
    for cell in nb.cells:
        if cell.cell_type == "markdown" and "TTL minutes" in cell.source:
            cell.source = cell.source.replace("TTL", minutes)
    nbformat.write(nb, PATH)
    print(f"wrote {PATH}")
