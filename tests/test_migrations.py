"""Alembic on every shard: identical schemas, round trips, drift, failure and recovery,
expand/contract under concurrent writers.

What a shard really has is read from the database itself (``inspect()``,
``alembic_version`` through a connection of the test's own, Alembic's
``compare_metadata``), and which shards ran DDL from engine events
(``shardlib.trace``), never from shardlib's own account.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, inspect, select, table, column, text

import shardlib
from shardlib import COUNTER_SHARD, SHARD_IDS, MigrationError, SchemaDriftError, WeatherLocation
from shardlib.engines import make_engine
from shardlib.migrations import has_schema_head, schema_head, target_metadata_for
from shardlib.models import Base, counter_metadata

from .conftest import FIXED_TIME, on_postgres, seed_locations

ROOT = Path(__file__).resolve().parent.parent
EXPAND, CONTRACT = "0002_report_unit_expand", "0003_report_unit_contract"
HEAD = "0004_lookups"  # the shardlib branch's head (0001_initial, then 0004)
REPORTS = table("weather_reports", column("id"), column("location_id"), column("temperature"),
                column("report_time"), column("unit"))


# ---------------------------------------------------------------- helpers: the databases' own word

SHARDLIB_TABLES = set(Base.metadata.tables) | set(counter_metadata.tables)
"""Tables shardlib owns. A shard database may hold others (e.g. the seed example's,
left by notebook 11 on a server); they are not shardlib's to compare."""


def snapshot(conn: Any) -> dict[str, Any]:
    """Everything inspect() says about shardlib's tables in a database."""
    insp = inspect(conn)
    tables: dict[str, Any] = {}
    for name in sorted(insp.get_table_names()):
        if name not in SHARDLIB_TABLES:
            continue
        tables[name] = {
            "columns": [(c["name"], str(c["type"]), c["nullable"], c.get("default"), c.get("autoincrement"))
                        for c in insp.get_columns(name)],
            "pk": insp.get_pk_constraint(name),
            "fks": sorted(insp.get_foreign_keys(name), key=repr),
            "indexes": sorted(insp.get_indexes(name), key=repr),
            "uniques": sorted(insp.get_unique_constraints(name), key=repr),
            "checks": sorted(insp.get_check_constraints(name), key=repr),
        }
    if conn.dialect.name == "sqlite":  # the DDL text itself
        tables["sqlite_master"] = sorted((row.type, row.name, ddl_parts(row.sql)) for row in conn.execute(text(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'")).all()
            if row.name in SHARDLIB_TABLES or row.type == "index")
    return tables


def ddl_parts(sql: str | None) -> tuple[str, ...] | None:
    """A CREATE TABLE's text as its head and its sorted, whitespace-normalised definitions.

    SQLite's ``ALTER TABLE ... ADD COLUMN`` (revision 0004 adds ``station``) appends the
    column's text after the table's constraints; ``create_all`` writes it before them.
    The definitions themselves are compared exactly, and the column order by ``inspect()``.
    """
    if sql is None or "(" not in sql:
        return None if sql is None else (" ".join(sql.split()),)
    head, _, body = sql.partition("(")
    body = body[: body.rindex(")")]
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += (char == "(") - (char == ")")
        current += char
    parts.append(current)
    return (" ".join(head.split()), *sorted(" ".join(p.split()) for p in parts))


def read_all(engines: dict[str, Any], fn: Any) -> dict[str, Any]:
    """``fn(sync_connection)`` on every shard, through connections of our own."""
    async def go() -> dict[str, Any]:
        out = {}
        for shard in SHARD_IDS:
            async with engines[shard].connect() as conn:
                out[shard] = await conn.run_sync(fn)
        return out
    return go()


def versions(conn: Any) -> tuple[str, ...]:
    if not inspect(conn).has_table("alembic_version"):
        return ()
    return tuple(sorted(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()))


def report_columns(conn: Any) -> dict[str, bool]:
    insp = inspect(conn)
    if not insp.has_table("weather_reports"):
        return {}
    return {c["name"]: c["nullable"] for c in insp.get_columns("weather_reports")}


def fresh_engines(world: Any) -> dict[str, Any]:
    """New engine objects on the same databases (nothing remembered about them)."""
    if on_postgres():
        return shardlib.make_engines()
    return shardlib.make_engines(data_dir=Path(world.engines["asia"].url.database).parent)


def create_all_snapshot(loop: Any, tmp_path: Path, with_counter: bool) -> dict[str, Any]:
    """The same server type, tables made by metadata.create_all()."""
    url = os.environ.get("SHARDLIB_ORACLE_URL", "").strip() if on_postgres() else ""
    engine = make_engine(url or f"sqlite+aiosqlite:///{tmp_path / 'create_all.db'}")

    async def go() -> dict[str, Any]:
        async with engine.begin() as conn:
            for md in (counter_metadata, Base.metadata):
                await conn.run_sync(md.drop_all)
            await conn.run_sync(Base.metadata.create_all)
            if with_counter:
                await conn.run_sync(counter_metadata.create_all)
        async with engine.connect() as conn:
            snap = await conn.run_sync(snapshot)
        async with engine.begin() as conn:
            await conn.run_sync(counter_metadata.drop_all)
        await engine.dispose()
        return snap

    return loop.run_until_complete(go())


async def add_old_reports(Session: Any, per_shard: int) -> int:
    """Cities with reports written by code that knows nothing of ``unit`` (the ORM model)."""
    async with Session() as session:
        locations = seed_locations()
        for i in range(per_shard):
            for continent in shardlib.CONTINENTS:
                location = WeatherLocation(continent, f"old {i}")
                location.reports.append(shardlib.Report(50.0 + i, FIXED_TIME))
                locations.append(location)
        session.add_all(locations)
        await session.commit()
    return 3 + per_shard * len(SHARD_IDS)


# ---------------------------------------------------------------- one schema, two ways to build it

def test_migrations_build_exactly_what_create_all_builds(world, loop, tmp_path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def diff(conn: Any, shard: str) -> list[Any]:
        only_ours = {"include_name": lambda name, kind, parent: kind != "table" or name in SHARDLIB_TABLES}
        return compare_metadata(MigrationContext.configure(conn, opts=only_ours), target_metadata_for(shard))

    built = world.run(read_all(world.engines, snapshot))
    diffs = {s: world.run(read_all(world.engines, lambda c, s=s: diff(c, s)))[s] for s in SHARD_IDS}
    assert diffs == {s: [] for s in SHARD_IDS}, f"migrations differ from the models: {diffs}"
    plain = create_all_snapshot(loop, tmp_path, with_counter=False)
    with_counter = create_all_snapshot(loop, tmp_path, with_counter=True)
    for shard in SHARD_IDS:
        expected = with_counter if shard == COUNTER_SHARD else plain
        assert built[shard] == expected, f"{shard}: migrated schema != create_all schema"
    assert "id_counter" in built[COUNTER_SHARD] and "id_counter" not in built["asia"]


def test_reset_leaves_every_shard_at_the_schema_head_and_the_counter_set(world) -> None:
    found = world.run(read_all(world.engines, versions))
    assert found == {s: (schema_head(),) for s in SHARD_IDS}
    world.run(shardlib.reset(world.engines, first_sequence_number=41))
    counter = world.run(read_all(world.engines, lambda c: c.execute(
        text("SELECT next_value FROM id_counter")).scalars().all() if inspect(c).has_table("id_counter") else None))
    assert counter == {"north_america": [41], "asia": None, "europe": None, "south_america": None}


# ---------------------------------------------------------------- round trips

SCHEMA_AT = {  # what weather_reports looks like at each revision: column -> nullable
    (): {},
    (HEAD,): {"id": False, "location_id": False, "temperature": False, "report_time": False},
}
SCHEMA_AT[(EXPAND, HEAD)] = {**SCHEMA_AT[(HEAD,)], "unit": True}
SCHEMA_AT[(CONTRACT, HEAD)] = {**SCHEMA_AT[(HEAD,)], "unit": False}
STEPS = {  # target -> (command, revision, version rows afterwards)
    "base": ("downgrade", "base", ()),
    "initial": ("downgrade", "report_unit@base", (HEAD,)),
    "expand": (None, EXPAND, (EXPAND, HEAD)),
    "contract": ("upgrade", CONTRACT, (CONTRACT, HEAD)),
}


def _go_to(engines: Any, target: str, current: tuple[str, ...], shards: list[str]) -> Any:
    command, revision, _ = STEPS[target]
    if target == "initial" and current == ():
        return shardlib.migrate(engines, "head", shard=shards)
    if target == "expand":
        command = "downgrade" if current == (CONTRACT, HEAD) else "upgrade"
    if command == "upgrade":
        return shardlib.migrate(engines, revision, shard=shards)
    return shardlib.downgrade(engines, revision, shard=shards)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(sorted(STEPS)), st.sets(st.sampled_from(SHARD_IDS), min_size=1)),
                min_size=1, max_size=5))
def test_upgrade_and_downgrade_round_trips_on_every_shard(world, walk) -> None:
    """A random walk of upgrades and downgrades on random sets of shards: every
    shard's alembic_version and weather_reports columns follow the model."""
    world.run(shardlib.reset(world.engines))
    model = {s: (HEAD,) for s in SHARD_IDS}
    for target, chosen in walk:
        shards = [s for s in SHARD_IDS if s in chosen]
        # only shards whose path to the target is legal here (contract needs expand first)
        groups: dict[tuple[str, ...], list[str]] = {}
        for s in shards:
            groups.setdefault(model[s], []).append(s)
        for current, members in groups.items():
            if target == "contract" and current not in ((EXPAND, HEAD), (CONTRACT, HEAD)):
                continue
            if target == "expand" and current == ():
                continue
            world.run(_go_to(world.engines, target, current, members))
            for s in members:
                model[s] = STEPS[target][2]
        assert world.run(read_all(world.engines, versions)) == model
        columns = world.run(read_all(world.engines, report_columns))
        assert columns == {s: SCHEMA_AT[model[s]] for s in SHARD_IDS}
        tables = world.run(read_all(world.engines, lambda c: sorted(inspect(c).get_table_names())))
        for s in SHARD_IDS:
            has_counter = s == COUNTER_SHARD and model[s] != ()
            assert ("id_counter" in tables[s]) == has_counter, (s, tables[s])


def test_every_shard_runs_the_ddl_and_a_second_upgrade_runs_none(world) -> None:
    with shardlib.trace(world.engines) as t:
        frame = world.run(shardlib.migrate(world.engines, EXPAND))
    ddl = [r["shard"] for r in t.records if r["sql"].startswith("ALTER TABLE weather_reports ADD COLUMN unit")]
    assert ddl == list(SHARD_IDS)
    assert list(frame["revision"]) == [f"{EXPAND}+{HEAD}"] * 4 and frame["has schema head"].all()
    with shardlib.trace(world.engines) as t:
        world.run(shardlib.migrate(world.engines, EXPAND))
    assert not [r for r in t.records if r["sql"].startswith(("ALTER", "CREATE", "DROP", "UPDATE"))]


def test_data_survives_expand_contract_and_back(world) -> None:
    old = world.run(add_old_reports(world.Session, 5))
    world.run(shardlib.migrate(world.engines, EXPAND))
    filled = world.run(shardlib.backfill(world.engines, "weather_reports", "unit", "F", batch_size=2))
    assert int(filled["rows"].sum()) == old
    world.run(shardlib.migrate(world.engines, CONTRACT))
    world.run(shardlib.downgrade(world.engines, "report_unit@base"))
    frames = world.run(shardlib.shard_frames(world.engines, "weather_reports"))
    assert sum(len(f) for f in frames.values()) == old


# ---------------------------------------------------------------- drift detection

async def _write_one(Session: Any) -> None:
    async with Session() as session:
        session.add(WeatherLocation("Europe", "Paris"))
        await session.commit()


@pytest.mark.parametrize("shard", SHARD_IDS)
def test_a_session_refuses_shards_at_different_revisions(world, shard) -> None:
    world.run(shardlib.alembic_command(world.engines, "stamp", "base", shard=shard))
    with pytest.raises(SchemaDriftError) as raised:
        world.run(_write_one(world.Session))
    message = str(raised.value)
    for s in SHARD_IDS:
        assert f"{s}={'(none)' if s == shard else HEAD}" in message, message
    assert "make migrate" in message and "check_schema=False" in message
    assert raised.value.revisions[shard] == ()
    # nothing was written anywhere
    counts = world.run(read_all(world.engines, lambda c: c.execute(text("SELECT count(*) FROM weather_locations")).scalar()))
    assert counts == {s: 0 for s in SHARD_IDS}
    # opting out opens the session; migrating again makes sessions work again
    world.run(_write_one(shardlib.make_sessionmaker(world.engines, check_schema=False)))
    world.run(shardlib.alembic_command(world.engines, "stamp", "head", shard=shard))
    world.run(_write_one(world.Session))


def test_a_session_after_a_good_one_still_sees_new_drift(world) -> None:
    """Sessions remember which engines passed the check (the check is then free); a migration
    run by shardlib, or one made behind its back followed by ``schema.forget``, must make the
    next session look again."""
    world.run(_write_one(world.Session))  # checked, and remembered
    world.run(shardlib.alembic_command(world.engines, "stamp", "base", shard="asia"))
    with pytest.raises(SchemaDriftError, match="asia=\\(none\\)"):
        world.run(_write_one(world.Session))
    world.run(shardlib.alembic_command(world.engines, "stamp", "head", shard="asia"))
    world.run(_write_one(world.Session))

    async def stamp_raw() -> None:
        async with world.engines["south_america"].begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))

    world.run(stamp_raw())
    world.run(_write_one(world.Session))  # not seen yet: these engines were checked before
    shardlib.schema.forget(world.engines.values())
    with pytest.raises(SchemaDriftError, match="south_america=0099_from_the_future"):
        world.run(_write_one(world.Session))


def test_shards_that_agree_but_lack_the_schema_head_are_refused_too(world) -> None:
    world.run(shardlib.alembic_command(world.engines, "stamp", "base"))
    with pytest.raises(SchemaDriftError, match="north_america=\\(none\\); asia=\\(none\\); europe=\\(none\\); "
                                               "south_america=\\(none\\)"):
        world.run(_write_one(world.Session))


def test_drift_made_behind_shardlibs_back_is_seen_by_new_engines(world) -> None:
    async def stamp_raw() -> None:
        async with world.engines["south_america"].begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0099_from_the_future'"))
    world.run(stamp_raw())
    engines = fresh_engines(world)
    try:
        with pytest.raises(SchemaDriftError, match="south_america=0099_from_the_future"):
            world.run(_write_one(shardlib.make_sessionmaker(engines)))
        frame = world.run(shardlib.revisions(engines))
        assert list(frame["has schema head"]) == [True, True, True, False]
    finally:
        world.run(shardlib.dispose(engines))


def test_an_optional_branch_on_some_shards_only_is_drift_on_all_it_is_not(world) -> None:
    world.run(shardlib.migrate(world.engines, EXPAND, shard=["asia", "europe"]))
    with pytest.raises(SchemaDriftError, match=rf"north_america={HEAD}; asia={EXPAND}\+{HEAD}"):
        world.run(_write_one(world.Session))
    world.run(shardlib.migrate(world.engines, EXPAND))
    world.run(_write_one(world.Session))
    assert not has_schema_head(["0099_unknown"]) and has_schema_head([CONTRACT, HEAD]) and not has_schema_head([CONTRACT])


def test_a_checked_session_runs_no_extra_sql_after_reset(world) -> None:
    with shardlib.trace(world.engines) as t:
        world.run(_write_one(world.Session))
    assert not [r for r in t.records if "alembic_version" in r["sql"]]
    engines = fresh_engines(world)  # never seen: read once, then remembered
    try:
        Session = shardlib.make_sessionmaker(engines)
        with shardlib.trace(engines) as t:
            world.run(_write_one(Session))
            world.run(_write_one(Session))
        reads = [r["shard"] for r in t.records if "alembic_version" in r["sql"]]
        assert sorted(set(reads)) == sorted(SHARD_IDS) and len(reads) == len(set(reads)) * (len(reads) // 4)
        assert len(reads) <= 8  # one has_table + one SELECT per shard, once
    finally:
        world.run(shardlib.dispose(engines))


# ---------------------------------------------------------------- failure on one shard, then recovery

@pytest.mark.parametrize("bad", SHARD_IDS)
def test_a_migration_failing_on_one_shard_stops_there_and_rerunning_finishes(world, bad) -> None:
    async def hand_made_column(sql: str) -> None:
        async with world.engines[bad].begin() as conn:
            await conn.execute(text(sql))
    world.run(hand_made_column("ALTER TABLE weather_reports ADD COLUMN unit INTEGER"))
    with pytest.raises(MigrationError) as raised:
        world.run(shardlib.migrate(world.engines, "report_unit@head"))
    error = raised.value
    i = SHARD_IDS.index(bad)
    assert (error.shard, error.done, error.not_attempted) == (bad, list(SHARD_IDS[:i]), list(SHARD_IDS[i + 1:]))
    expected = {s: (CONTRACT, HEAD) if s in SHARD_IDS[:i] else (HEAD,) for s in SHARD_IDS}
    assert world.run(read_all(world.engines, versions)) == expected
    for s in SHARD_IDS:
        assert f"{s}={expected[s][0]}" in str(error)
    # the failed shard was rolled back entirely: the hand-made column is untouched
    assert world.run(read_all(world.engines, report_columns))[bad]["unit"] is True
    world.run(hand_made_column("ALTER TABLE weather_reports DROP COLUMN unit"))
    with shardlib.trace(world.engines) as t:
        world.run(shardlib.migrate(world.engines, "report_unit@head"))
    assert sorted({r["shard"] for r in t.records if r["sql"].startswith("ALTER TABLE weather_reports ADD")}) \
        == sorted(SHARD_IDS[i:])
    assert world.run(read_all(world.engines, versions)) == {s: (CONTRACT, HEAD) for s in SHARD_IDS}


@pytest.mark.parametrize("bad", SHARD_IDS)
def test_a_half_done_revision_leaves_nothing_behind(world, bad) -> None:
    """0001 creates two tables; the second fails: the first must be rolled back too
    (SQLite's driver would otherwise have committed it on its own)."""
    async def prepare() -> None:
        await shardlib.downgrade(world.engines, "base")
        async with world.engines[bad].begin() as conn:
            await conn.execute(text("CREATE TABLE weather_reports (x INTEGER)"))
    world.run(prepare())
    with pytest.raises(MigrationError, match=f"failed on shard '{bad}'"):
        world.run(shardlib.migrate(world.engines))
    tables = world.run(read_all(world.engines, lambda c: sorted(inspect(c).get_table_names())))
    assert "weather_locations" not in tables[bad], tables[bad]
    async def drop() -> None:
        async with world.engines[bad].begin() as conn:
            await conn.execute(text("DROP TABLE weather_reports"))
    world.run(drop())
    world.run(shardlib.migrate(world.engines))
    assert world.run(read_all(world.engines, versions)) == {s: (HEAD,) for s in SHARD_IDS}


def test_contract_refuses_while_one_shard_still_has_a_null(world) -> None:
    world.run(add_old_reports(world.Session, 2))
    world.run(shardlib.migrate(world.engines, EXPAND))
    world.run(shardlib.backfill(world.engines, "weather_reports", "unit", "F"))
    world.run(add_old_reports(world.Session, 1))  # an old writer after the backfill
    with pytest.raises(MigrationError, match="north_america: 2 weather_reports rows have no unit"):
        world.run(shardlib.migrate(world.engines, CONTRACT))
    assert world.run(read_all(world.engines, versions)) == {s: (EXPAND, HEAD) for s in SHARD_IDS}


def test_errors_name_the_bad_value_and_valid_ones(world) -> None:
    with pytest.raises(ValueError, match="'mars'; valid shard ids are 'north_america'"):
        world.run(shardlib.migrate(world.engines, shard="mars"))
    with pytest.raises(ValueError, match="missing 'asia'"):
        world.run(shardlib.migrate({s: e for s, e in world.engines.items() if s != "asia"}))
    with pytest.raises(ValueError, match="unknown revision 'nope'; valid: 'head', 'heads', 'base', "
                       "'report_unit@head', 'shardlib@head', '0001_initial'"):
        world.run(shardlib.migrate(world.engines, "nope"))
    with pytest.raises(ValueError, match="unknown revision '0099'"):
        world.run(shardlib.downgrade(world.engines, "0099"))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(nulls=st.lists(st.integers(0, 40), min_size=4, max_size=4),
       filled=st.lists(st.integers(0, 5), min_size=4, max_size=4), batch_size=st.integers(1, 60))
def test_backfill_fills_exactly_the_nulls_in_batches(world, nulls, filled, batch_size) -> None:
    """Any NULL count per shard (zero included), rows that already have a value,
    any batch size: each NULL is filled once, the others are left alone."""
    world.run(shardlib.reset(world.engines))
    world.run(shardlib.migrate(world.engines, EXPAND))

    async def load() -> None:
        for shard, n_null, n_set in zip(SHARD_IDS, nulls, filled):
            async with world.engines[shard].begin() as conn:
                await conn.execute(text("INSERT INTO weather_locations (id, continent, city) VALUES (:i, 'x', 'y')"),
                                   {"i": shardlib.make_id(1, shard)})
                rows = [{"location_id": shardlib.make_id(1, shard), "temperature": float(k),
                         "report_time": FIXED_TIME, "unit": None if k < n_null else "C"}
                        for k in range(n_null + n_set)]
                if rows:
                    await conn.execute(insert(REPORTS), rows)
    world.run(load())
    seen: list[Any] = []
    frame = world.run(shardlib.backfill(world.engines, "weather_reports", "unit", "F",
                                        batch_size=batch_size, on_batch=seen.append))
    assert frame["rows"].tolist() == nulls
    assert frame["batches"].tolist() == [-(-n // batch_size) for n in nulls]
    assert all(0 < b.rows <= batch_size for b in seen) and len(seen) == frame["batches"].sum()

    def by_unit(conn: Any) -> dict[Any, int]:
        return dict(conn.execute(select(REPORTS.c.unit, func.count()).group_by(REPORTS.c.unit)).all())
    assert world.run(read_all(world.engines, by_unit)) == {
        s: {k: v for k, v in {"F": n, "C": m}.items() if v} for s, n, m in zip(SHARD_IDS, nulls, filled)}


# ---------------------------------------------------------------- expand/contract under writers

async def expand_backfill_contract(engines: dict[str, Any], Session: Any, *, writers: int,
                                   sessions_each: int, batch_size: int) -> dict[str, Any]:
    """Expand, then backfill while ``writers`` tasks keep inserting, then contract."""
    await shardlib.migrate(engines, EXPAND)
    failures: list[BaseException] = []
    written: list[tuple[str, float]] = []
    backfill_done = asyncio.Event()
    during = 0

    async def writer(w: int) -> None:
        nonlocal during
        for i in range(sessions_each):
            continent = shardlib.CONTINENTS[(w + i) % 4]
            try:
                async with Session() as session:
                    location = WeatherLocation(continent, f"writer {w}.{i}")
                    session.add(location)
                    await session.flush()
                    shard = shardlib.shard_for_continent(continent)
                    await session.execute(
                        insert(REPORTS), [{"location_id": location.id, "temperature": float(t),
                                           "report_time": FIXED_TIME, "unit": "C"} for t in range(3)],
                        bind_arguments={"shard_id": shard})
                    await session.commit()
                written.append((location.city, shard))
                if not backfill_done.is_set():
                    during += 1
            except BaseException as error:  # noqa: BLE001 - counted and reported
                failures.append(error)
            await asyncio.sleep(0)

    tasks = [asyncio.create_task(writer(w)) for w in range(writers)]
    await asyncio.sleep(0)
    frame = await shardlib.backfill(engines, "weather_reports", "unit", "F", batch_size=batch_size)
    backfill_done.set()
    await asyncio.gather(*tasks)
    await shardlib.migrate(engines, CONTRACT)
    return {"frame": frame, "failures": failures, "written": written, "during": during}


def test_expand_backfill_contract_with_writers_running(world) -> None:
    old = world.run(add_old_reports(world.Session, 40))
    result = world.run(expand_backfill_contract(world.engines, world.Session, writers=6,
                                                sessions_each=15, batch_size=25))
    assert result["failures"] == [], f"writers failed: {result['failures'][:3]}"
    assert len(result["written"]) == 6 * 15
    frame = result["frame"]
    assert int(frame["rows"].sum()) == old
    rate = old / max(frame["seconds"].max(), 1e-9)
    print(f"\nbackfill: {old} rows in {int(frame['batches'].sum())} batches, {rate:,.0f} rows/s; "
          f"{result['during']} of {len(result['written'])} writer sessions committed during it; "
          f"0 writer failures")

    def by_unit(conn: Any) -> dict[Any, int]:
        return dict(conn.execute(select(REPORTS.c.unit, func.count()).group_by(REPORTS.c.unit)).all())
    units = world.run(read_all(world.engines, by_unit))
    # the oracle: what was written where, counted independently of the shards
    expected_old = {s: 0 for s in SHARD_IDS}
    for location in seed_locations():
        expected_old[shardlib.shard_for_continent(location.continent)] += len(location.reports)
    for s in SHARD_IDS:
        expected_old[s] += 40
    expected_new = {s: 3 * sum(1 for _, shard in result["written"] if shard == s) for s in SHARD_IDS}
    assert units == {s: {k: v for k, v in {"F": expected_old[s], "C": expected_new[s]}.items() if v}
                     for s in SHARD_IDS}
    assert world.run(read_all(world.engines, report_columns)) == {s: SCHEMA_AT[(CONTRACT, HEAD)] for s in SHARD_IDS}

    async def insert_null(shard: str) -> None:
        async with world.engines[shard].begin() as conn:
            loc = (await conn.execute(text("SELECT min(id) FROM weather_locations"))).scalar()
            await conn.execute(insert(REPORTS), [{"location_id": loc, "temperature": 1.0,
                                                  "report_time": FIXED_TIME, "unit": None}])
    for shard in SHARD_IDS:
        with pytest.raises(Exception, match="(?i)not.null"):
            world.run(insert_null(shard))


# ---------------------------------------------------------------- the command line

def _cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SHARDLIB_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "shardlib.migrations", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_command_line_runs_alembic_on_every_shard_or_one(world, tmp_path) -> None:
    data_dir = Path(world.engines["asia"].url.database or tmp_path).parent
    world.run(shardlib.downgrade(world.engines, "base"))
    world.run(shardlib.dispose(world.engines))
    done = _cli("upgrade", "head", data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count(HEAD) >= 4 and "False" not in done.stdout
    one = _cli("--shard", "asia", "upgrade", EXPAND, data_dir=data_dir)
    assert one.returncode == 0, one.stderr
    assert world.run(read_all(world.engines, versions)) == {
        s: (EXPAND, HEAD) if s == "asia" else (HEAD,) for s in SHARD_IDS}
    bad = _cli("--shard", "mars", "current", data_dir=data_dir)
    assert bad.returncode == 2 and "unknown shard id 'mars'; valid shard ids are 'north_america'" in bad.stderr
    history = _cli("history", data_dir=data_dir)
    assert history.returncode == 0 and CONTRACT in history.stdout
    async def hand_made() -> None:
        async with world.engines["europe"].begin() as conn:
            await conn.execute(text("ALTER TABLE weather_reports ADD COLUMN unit INTEGER"))
    world.run(hand_made())
    failed = _cli("upgrade", "report_unit@head", data_dir=data_dir)
    assert failed.returncode == 1
    assert "failed on shard 'europe'" in failed.stderr and f"south_america={HEAD} (not attempted)" in failed.stderr
