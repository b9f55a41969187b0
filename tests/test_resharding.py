"""The shard map as data, and moving a continent while it is being written.

Everything is checked from outside shardlib: rows read straight from each
database's engine, statements compared with one unsharded database, shards
observed through engine events, writers in separate processes (shardlib.movelab).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import warnings
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select, text, update

import shardlib
from shardlib import ContinentMove, ContinentMoved, MoveError, Report, WeatherLocation, movelab, shards
from shardlib.resharding import VDiffMismatch

from .conftest import SEED_CITIES, World, loaded_world, on_postgres, seed_locations
from .test_oracle_grammar import ALIASES, ROWS, SHAPES, A, B, clauses, continent_values, to_sql
from .test_oracle_grammar import test_result_shapes_are_exact_or_refused as _result_shapes
from .test_oracle_grammar import check_self_join as _self_join


def spare() -> tuple[str, str | None]:
    """Where to move a continent: a new SQLite file, or a spare server database."""
    urls = dict(p.split("=", 1) for p in os.environ.get("SHARDLIB_SPARE_URLS", "").split(",") if p)
    if on_postgres():
        if "spare_1" not in urls:
            pytest.skip("SHARDLIB_SPARE_URLS (scripts/pg.sh up) names no spare database to move to")
        return "spare_1", urls["spare_1"]
    return "europe_2", None


async def raw_async(engines: Any) -> dict[str, list[tuple[int, str, str]]]:
    """Every database's rows, read with plain SQL on its own engine (no routing)."""
    found = {}
    for name, engine in list(engines.items()):
        async with engine.connect() as conn:
            found[name] = [tuple(r) for r in await conn.execute(
                text("SELECT id, continent, city FROM weather_locations ORDER BY id"))]
    return found


def raw_locations(world: World) -> dict[str, list[tuple[int, str, str]]]:
    return world.run(raw_async(world.engines))


def seeded(world: World, extra_europe: int = 30) -> None:
    async def go() -> None:
        async with world.Session() as session:
            session.add_all(seed_locations())
            for n in range(extra_europe):
                location = WeatherLocation("Europe", f"eu-{n:03d}")
                location.reports.extend(Report(float(n % 7 + k)) for k in range(n % 3))
                session.add(location)
            await session.commit()

    world.run(go())


def move(world: World, continent: str = "Europe", **kw: Any) -> ContinentMove:
    target, url = spare()

    async def go() -> ContinentMove:
        m = ContinentMove(world.engines, continent, target, url=url, batch_size=kw.pop("batch_size", 7), **kw)
        await m.prepare()
        await m.copy()
        await m.catch_up()
        await m.cut_over()
        await m.clean_up(drain_seconds=0)
        return m

    return world.run(go())


# ------------------------------------------------------------------ the map is data


def test_the_map_lives_in_the_catalog_and_a_fresh_process_finds_every_row(world: World) -> None:
    seeded(world)
    before = raw_locations(world)
    target, _ = spare()
    m = move(world)
    assert shards.current().placement["Europe"] == target and shards.current().version == m.stats.map_version
    after = raw_locations(world)
    europe_before = sorted(r for r in before["europe"])
    assert after["europe"] == [] and sorted(after[target]) == europe_before  # same ids, same rows
    # a new process is told nothing: it reads the catalog
    data_dir = None if on_postgres() else os.path.dirname(world.engines["asia"].url.database)
    code = textwrap.dedent(f"""
        import asyncio, json, shardlib
        from sqlalchemy import select, func
        from shardlib import WeatherLocation
        async def main():
            engines = shardlib.make_engines(data_dir={data_dir!r}) if {data_dir!r} else shardlib.make_engines()
            Session = shardlib.make_sessionmaker(engines)
            async with Session() as session:
                counts = dict((await session.execute(select(WeatherLocation.continent, func.count())
                               .group_by(WeatherLocation.continent))).all())
                with shardlib.trace(engines) as t:
                    found = await session.get(WeatherLocation, {europe_before[0][0]})
            print(json.dumps({{"counts": counts, "city": found.city, "ran_on": t.shards(),
                              "version": shardlib.shards.current().version}}))
            await shardlib.dispose(engines)
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    expected = Counter(c for c, _ in SEED_CITIES) + Counter({"Europe": 30})
    assert seen["counts"] == dict(expected)
    assert seen["city"] == europe_before[0][2] and seen["ran_on"] == [target]
    assert seen["version"] == m.stats.map_version


def test_ids_name_logical_shards_so_get_touches_one_database_after_a_move(world: World) -> None:
    seeded(world, extra_europe=3)
    target, _ = spare()
    before = raw_locations(world)["europe"]
    move(world)

    async def go() -> list[tuple[Any, list[str]]]:
        seen = []
        for location_id, _, city in before:
            async with world.Session() as session:
                with shardlib.trace(world.engines) as t:
                    found = await session.get(WeatherLocation, location_id)
                seen.append((found.city if found else None, t.shards()))
        return seen

    assert [city for city, _ in world.run(go())] == [city for _, _, city in before]
    assert all(ran_on == [target] for _, ran_on in world.run(go()))


def test_new_continents_join_the_map_without_moving_rows(world: World) -> None:
    seeded(world, extra_europe=0)
    with pytest.raises(ValueError, match="unknown continent 'Africa'; valid continents are 'North America'"):
        WeatherLocation("Africa", "Nairobi")
    new_map = world.run(shardlib.add_continent(world.engines, "Africa", "europe"))
    assert new_map.slots["Africa"] == 4 and new_map.placement["Africa"] == "europe"

    async def go() -> tuple[int, list[str]]:
        async with world.Session() as session:
            session.add(WeatherLocation("Africa", "Nairobi"))
            await session.commit()
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                rows = (await session.execute(select(WeatherLocation).where(WeatherLocation.continent == "Africa"))).scalars().all()
            return rows[0].id, t.shards()

    location_id, ran_on = world.run(go())
    assert location_id & 15 == 4 and ran_on == ["europe"]
    assert [r[2] for r in raw_locations(world)["europe"]] == ["London", "Dublin", "Nairobi"]
    with pytest.raises(ValueError, match="valid continents are .*'Africa'"):
        WeatherLocation("Atlantis", "x")
    with pytest.raises(ValueError, match="already in the map"):
        world.run(shardlib.add_continent(world.engines, "Africa", "asia"))
    with pytest.raises(MoveError, match="cannot move 'Europe' off 'europe' while it also stores 'Africa'"):
        ContinentMove(world.engines, "Europe", "somewhere_new")


def test_a_new_continent_on_a_new_database(world: World) -> None:
    urls = dict(p.split("=", 1) for p in os.environ.get("SHARDLIB_SPARE_URLS", "").split(",") if p)
    name, url = ("spare_2", urls.get("spare_2")) if on_postgres() else ("oceania", None)
    if on_postgres() and url is None:
        pytest.skip("SHARDLIB_SPARE_URLS names no spare_2")
    seeded(world, extra_europe=0)
    new_map = world.run(shardlib.add_continent(world.engines, "Oceania", name, url=url))
    assert new_map.placement["Oceania"] == name and new_map.serving[-1] == name

    async def go() -> list[str]:
        async with world.Session() as session:
            session.add(WeatherLocation("Oceania", "Auckland"))
            await session.commit()
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                rows = (await session.execute(select(WeatherLocation.city).order_by(WeatherLocation.city))).scalars().all()
        assert "Auckland" in rows and len(rows) == len(SEED_CITIES) + 1
        return t.shards()

    assert world.run(go())[-1] == name  # fan-outs now include it
    assert [r[2] for r in raw_locations(world)[name]] == ["Auckland"]


def test_publishing_is_compare_and_swap(world: World) -> None:
    catalog = world.engines.catalog
    first = shards.current()
    world.run(catalog.publish(first.with_continent("Oceania", "asia"), reason="one"))
    with pytest.raises(shardlib.StaleMapError, match="version"):
        world.run(catalog.publish(first.with_continent("Africa", "asia"), reason="a second, stale writer"))
    history = world.run(catalog.history())
    assert list(history["version"]) == [1, 2] and list(history["reason"]) == ["reset", "one"]


# ------------------------------------------------------------------ moving under load


def _move_phases(world: World, continent: str, record: dict[str, Any]) -> Any:
    target, url = spare()

    async def run(mark: Any) -> None:
        m = ContinentMove(world.engines, continent, target, url=url, batch_size=200, on_phase=mark)
        await m.prepare()
        await m.copy()
        await m.catch_up()
        diff = await m.verify()
        record["diff"] = diff
        await m.cut_over()
        await m.clean_up(drain_seconds=1.0)
        record["move"] = m

    return run


def test_eight_writer_processes_lose_nothing_while_europe_moves(world: World) -> None:
    seeded(world, extra_europe=0)
    world.run(shardlib.bulk_insert(world.engines, WeatherLocation,
                                   [{"continent": "Europe", "city": f"bulk-{n}"} for n in range(1500)]))
    record: dict[str, Any] = {}
    data_dir = None if on_postgres() else os.path.dirname(world.engines["asia"].url.database)
    report = world.run(movelab.run_under_load(world.engines, _move_phases(world, "Europe", record), writers=8,
                                              data_dir=data_dir, source="europe", moved="Europe",
                                              warm_up_s=1.0, cool_down_s=1.0))
    bad = set(report.lost) | set(report.unexpected) | set(report.wrong) | set(report.duplicated)
    evidence = [{k: v for k, v in r.items() if k != "tb"} for r in report.records
                if r.get("id") in bad or r.get("read_ok") is False][:8]  # what a rare failure needs to be understood
    assert report.summary()["rows lost"] == 0, (report.lost[:10], evidence, report.phases)
    assert report.ok, report.summary() | {"errors": report.errors[:3], "evidence": evidence, "phases": report.phases}
    assert len(record["diff"]) == 0
    committed = report.committed("Europe")
    phases = report.phases
    # writes to the moving continent committed before, during and after the move
    assert any(r["t1"] < phases["prepared"] for r in committed)
    assert any(phases["prepared"] <= r["t1"] <= phases["cut_over"] for r in committed)
    assert any(r["t1"] > phases["cut_over"] for r in committed)
    assert record["move"].stats.changes_applied > 0  # changes made during the copy were caught up
    target, _ = spare()
    assert {r[1] for r in raw_locations(world)[target]} == {"Europe"}


# ------------------------------------------------------------------ stale routing meets the fence


def test_a_process_routing_by_the_old_map_is_fenced_never_writes_the_old_place(world: World) -> None:
    seeded(world, extra_europe=2)
    old_map = shards.current()
    target, _ = spare()
    m = move(world)
    europe_rows = raw_locations(world)[target]

    async def stale_writes() -> list[str]:
        errors = []
        catalog = world.engines.catalog
        refresh = catalog.refresh
        catalog.refresh = lambda *a, **k: shards.current()  # a process that has not re-read the catalog
        shards.activate(old_map)
        try:
            for attempt in ("orm_insert", "orm_update", "core_update", "core_delete"):
                async with world.Session() as session:
                    try:
                        if attempt == "orm_insert":
                            session.add(WeatherLocation("Europe", "Stray"))
                        elif attempt == "orm_update":  # loads nothing from 'europe': the rows are gone
                            await session.execute(update(WeatherLocation).where(WeatherLocation.continent == "Europe")
                                                  .values(city="Stray"))
                        elif attempt == "core_update":
                            await session.execute(text("UPDATE weather_reports SET temperature = 1 WHERE location_id = :i"),
                                                  {"i": europe_rows[0][0]}, bind_arguments={"shard_id": "europe"})
                            await session.execute(insert(Report).values(location_id=europe_rows[0][0], temperature=9.0))
                        else:
                            await session.execute(text("INSERT INTO weather_locations (id, continent, city) "
                                                       "VALUES (:i, 'Europe', 'Stray')"), {"i": (999 << 4) | 2},
                                                  bind_arguments={"shard_id": "europe"})
                        await session.commit()
                        errors.append(f"{attempt}: no error")
                    except ContinentMoved as moved:
                        assert moved.shard == "europe" and shardlib.is_retryable(moved)
                        assert "continent Europe" in str(moved), str(moved)
                        assert f"(shard map version {m.stats.map_version})" in str(moved), str(moved)
                        assert f"routes by shard map version {old_map.version}" in str(moved), str(moved)
                        errors.append(f"{attempt}: fenced")
                        await session.rollback()
        finally:
            catalog.refresh = refresh
        return errors

    outcomes = world.run(stale_writes())
    assert outcomes == ["orm_insert: fenced", "orm_update: no error", "core_update: fenced", "core_delete: fenced"]
    after = raw_locations(world)
    assert after["europe"] == [] and after[target] == europe_rows  # nothing stray, nothing lost
    # a fresh attempt routes by the catalog again and lands on the new place
    async def retried() -> int:
        async def insert_one(session: Any) -> int:
            location = WeatherLocation("Europe", "Retried")
            session.add(location)
            await session.flush()
            return location.id
        return await shardlib.run_transaction(world.Session, insert_one)

    location_id = world.run(retried())
    assert (location_id, "Europe", "Retried") in raw_locations(world)[target]
    assert m.stats.map_version == shards.current().version


@pytest.mark.parametrize("change", ["update", "delete", "delete a report"])
@pytest.mark.parametrize("cleaned_up", [False, True], ids=["fenced", "cleaned-up"])
def test_a_transaction_open_across_the_cut_over_gets_a_retryable_error(world: World, cleaned_up: bool,
                                                                     change: str) -> None:
    """A row loaded from the old database before the cut-over, changed after it: the UPDATE or
    DELETE would go to the old database (fenced; after clean-up it matches nothing there, which
    for a DELETE SQLAlchemy only warns about). It must raise the retryable ContinentMoved, and
    nothing may change anywhere."""
    seeded(world, extra_europe=2)
    target, url = spare()

    async def go() -> str:
        m = ContinentMove(world.engines, "Europe", target, url=url)
        await m.prepare()
        await m.copy()
        async with world.Session() as session:
            city = "London" if change != "delete a report" else "eu-001"  # eu-001 has one report
            location = (await session.execute(select(WeatherLocation).where(WeatherLocation.city == city))).scalar_one()
            reports = await location.awaitable_attrs.reports
            await m.catch_up()
            await m.cut_over()
            if cleaned_up:  # the row is gone from the old place: a change there matches nothing
                await m.clean_up(drain_seconds=0)
            if change == "update":
                location.city = "Londinium"
            elif change == "delete":
                await session.delete(location)
            else:
                await session.delete(reports[0])
            try:
                await session.commit()
                return "committed"
            except ContinentMoved as moved:
                return f"moved: {moved.shard}"

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even a warning
        assert world.run(go()) == "moved: europe"
    cities = {r[2] for rows in raw_locations(world).values() for r in rows}
    assert "Londinium" not in cities and {"London", "eu-001"} <= cities

    async def reports_of_eu_001() -> int:
        async with world.Session() as session:
            location = (await session.execute(select(WeatherLocation).where(WeatherLocation.city == "eu-001"))).scalar_one()
            return len(await location.awaitable_attrs.reports)

    assert world.run(reports_of_eu_001()) == 1


# ------------------------------------------------------------------ verify, interrupt, resume, reverse


def test_vdiff_names_missing_extra_and_different_rows_and_cut_over_refuses(world: World) -> None:
    seeded(world, extra_europe=5)
    target, url = spare()

    async def go() -> Any:
        m = ContinentMove(world.engines, "Europe", target, url=url)
        await m.prepare()
        await m.copy()
        assert len(await m.verify()) == 0
        async with world.engines[target].begin() as conn:  # damage the copy behind the mover's back
            await conn.execute(text("INSERT INTO shardlib_mover_token (held) VALUES (1)"))  # pass the fence
            ids = [r[0] for r in await conn.execute(text("SELECT id FROM weather_locations ORDER BY id"))]
            await conn.execute(text("UPDATE weather_locations SET city = 'Paris' WHERE id = :i"), {"i": ids[0]})
            await conn.execute(text("DELETE FROM weather_reports WHERE location_id = :i"), {"i": ids[1]})
            await conn.execute(text("DELETE FROM weather_locations WHERE id = :i"), {"i": ids[1]})
            await conn.execute(text("INSERT INTO weather_locations (id, continent, city) VALUES (:i, 'Europe', 'Ghost')"),
                               {"i": (7777 << 4) | 2})
            await conn.execute(text("DELETE FROM shardlib_mover_token"))
        diff = await m.verify()
        with pytest.raises(VDiffMismatch, match="refusing to cut over"):
            await m.cut_over()
        return diff, ids

    diff, ids = world.run(go())
    kinds = {(row.table, row.kind) for row in diff.itertuples()}
    assert ("weather_locations", "different") in kinds and ("weather_locations", "missing") in kinds
    assert ("weather_locations", "extra") in kinds
    assert shards.current().placement["Europe"] == "europe"  # the map did not change


PHASE_STEPS = ["prepare", "copy", "catch_up", "fence", "publish"]


@pytest.mark.parametrize("then", ["resume", "abort"])
@pytest.mark.parametrize("crash_after", PHASE_STEPS)
def test_an_interrupted_move_can_be_resumed_or_rolled_back(world: World, crash_after: str, then: str) -> None:
    seeded(world, extra_europe=12)
    target, url = spare()
    europe = sorted(raw_locations(world)["europe"])

    class Crash(Exception):
        pass

    def crash_at(phase: str) -> None:
        wanted = {"prepare": "prepared", "copy": "copied", "catch_up": "caught_up", "fence": "fenced",
                  "publish": "cut_over"}[crash_after]
        if phase == wanted:
            raise Crash(phase)

    async def go() -> None:
        m = ContinentMove(world.engines, "Europe", target, url=url, batch_size=5, on_phase=crash_at)
        with pytest.raises(Crash):
            await m.prepare()
            await m.copy()
            await m.catch_up()
            await m.cut_over()
        published = shards.current().placement["Europe"] == target
        # the map points at a complete copy whatever happened
        home = shards.current().placement["Europe"]
        assert sorted((await raw_async(world.engines))[home]) == europe
        async with world.Session() as session:  # writes go on (they may be fenced for a moment)
            pass
        resumed = await ContinentMove.resume(world.engines, "Europe")
        if then == "abort" and not published:
            await resumed.abort()
            assert shards.current().placement["Europe"] == "europe"
            assert [r for r in (await raw_async(world.engines))[target] if r[1] == "Europe"] == []
            async with world.Session() as session:
                session.add(WeatherLocation("Europe", "After abort"))
                await session.commit()
            assert "After abort" in {r[2] for r in (await raw_async(world.engines))["europe"]}
        else:
            if then == "abort":
                with pytest.raises(MoveError, match="reverse"):
                    await resumed.abort()
            resumed.on_phase = None
            await resumed.finish()
            assert shards.current().placement["Europe"] == target
            assert sorted((await raw_async(world.engines))[target]) == europe and (await raw_async(world.engines))["europe"] == []

    world.run(go())


def test_a_mover_killed_with_sigkill_is_resumed_by_another_process(world: World) -> None:
    seeded(world, extra_europe=40)
    target, url = spare()
    europe = sorted(raw_locations(world)["europe"])
    data_dir = None if on_postgres() else os.path.dirname(world.engines["asia"].url.database)
    code = textwrap.dedent(f"""
        import asyncio, os, signal, shardlib
        async def main():
            engines = shardlib.make_engines(data_dir={data_dir!r}) if {data_dir!r} else shardlib.make_engines()
            def die(phase):
                if phase == "fenced":
                    os.kill(os.getpid(), signal.SIGKILL)
            m = shardlib.ContinentMove(engines, "Europe", {target!r}, url={url!r}, batch_size=6, on_phase=die)
            await m.prepare(); await m.copy(); await m.catch_up(); await m.cut_over()
        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]

    async def after_the_crash() -> str:
        async with world.Session() as session:  # fenced, not yet published: Europe writes are refused
            session.add(WeatherLocation("Europe", "During the outage"))
            try:
                await session.commit()
                return "committed"
            except ContinentMoved:
                await session.rollback()
        m = await ContinentMove.resume(world.engines, "Europe")
        assert m.phase == "fenced"
        await m.finish()
        return "fenced, then resumed"

    assert world.run(after_the_crash()) == "fenced, then resumed"
    assert sorted(raw_locations(world)[target]) == europe and raw_locations(world)["europe"] == []


def test_reverse_before_clean_up_moves_back_with_the_writes_made_since(world: World) -> None:
    seeded(world, extra_europe=8)
    target, url = spare()

    async def go() -> tuple[ContinentMove, dict[int, int]]:
        m = ContinentMove(world.engines, "Europe", target, url=url)
        await m.prepare()
        await m.copy()
        await m.catch_up()
        await m.cut_over()
        async with world.Session() as session:
            session.add(WeatherLocation("Europe", "Written on the new place"))
            london = (await session.execute(select(WeatherLocation).where(WeatherLocation.city == "London"))).scalar_one()
            (await london.awaitable_attrs.reports).append(Report(3.5))
            await session.commit()
        back = await m.reverse()
        async with world.Session() as session:
            counts = dict((await session.execute(select(Report.location_id, func.count()).group_by(Report.location_id))).all())
        return back, counts

    back, counts = world.run(go())
    assert shards.current().placement["Europe"] == "europe"
    rows = raw_locations(world)
    assert [r for r in rows[target] if r[1] == "Europe"] == []
    assert "Written on the new place" in {r[2] for r in rows["europe"]}
    london = next(r[0] for r in rows["europe"] if r[2] == "London")
    assert counts[london] == 1


def test_bad_moves_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="unknown continent 'Atlantis'"):
        shardlib.shards.current().database_for("Atlantis")


def test_bad_moves_are_refused(world: World) -> None:
    with pytest.raises(MoveError, match="'asia' stores 'Asia'.*new database"):
        ContinentMove(world.engines, "Europe", "asia")
    with pytest.raises(MoveError, match="already stored on 'europe'"):
        ContinentMove(world.engines, "Europe", "europe")
    with pytest.raises(ValueError, match="unknown continent 'Atlantis'"):
        ContinentMove(world.engines, "Atlantis", "x_db")
    if on_postgres():
        with pytest.raises(MoveError, match="give its URL"):
            world.run(ContinentMove(world.engines, "Europe", "nowhere").prepare())
        assert "nowhere" not in shards.current().databases


# ------------------------------------------------------------------ routing by the new map: the oracle


@pytest.fixture
def moved_both():
    """The grammar's rows, loaded, then Europe moved to another database."""
    data = [(c, city, [float((7 * n + k) % 11) for k in range(n % 3)]) for n, (c, city) in enumerate(ROWS)]
    with loaded_world(data) as (world, oracle):
        move(world)
        yield world, oracle


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(SHAPES), where=clauses(("a",)), other=clauses(("a",)),
       limit=st.one_of(st.none(), st.integers(0, 6)), offset=st.one_of(st.none(), st.integers(0, 4)),
       descending=st.booleans())
def test_statements_after_a_move_match_one_unsharded_database(moved_both, shape, where, other, limit, offset,
                                                              descending) -> None:
    world, _ = moved_both
    world.engines.catalog.use()  # this world's map (other worlds may have been used meanwhile)
    _result_shapes.hypothesis.inner_test(moved_both, shape, where, other, limit, offset, descending, None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clause=clauses(("a", "b")), data=st.data())
def test_self_joins_after_a_move_route_to_the_minimal_databases(moved_both, clause, data) -> None:
    world, _ = moved_both
    world.engines.catalog.use()
    statement = select(A.id, B.id).join(B, A.continent == B.continent).where(to_sql(clause, ALIASES))
    count = len([n for n in statement.compile().bind_names.values() if n.startswith("continent")])
    chosen = data.draw(st.dictionaries(st.integers(1, max(1, count)), continent_values, max_size=2))
    _self_join(moved_both, clause, chosen)


def test_reads_during_every_phase_count_each_row_once(world: World) -> None:
    """The target holds a copy before the cut-over and the source keeps one until
    clean-up: queries that name no continent must still see each row once."""
    seeded(world, extra_europe=9)
    target, url = spare()
    found = raw_locations(world)  # (on servers a spare database may hold an earlier test's rows)
    expected = sorted((r[0], r[2]) for name in shards.current().serving for r in found[name])

    async def everything() -> list[tuple[int, str]]:
        async with world.Session() as session:
            rows = (await session.execute(select(WeatherLocation.id, WeatherLocation.city))).all()
            count = (await session.execute(select(func.count()).select_from(WeatherLocation))).scalar_one()
        assert count == len(rows)
        return sorted(tuple(r) for r in rows)

    async def go() -> list[str]:
        seen = []
        m = ContinentMove(world.engines, "Europe", target, url=url, batch_size=4)
        for phase in ("prepare", "copy", "catch_up", "cut_over", "clean_up"):
            step = getattr(m, phase)
            await (step(drain_seconds=0) if phase == "clean_up" else step())
            assert await everything() == expected, phase
            seen.append(phase)
        return seen

    assert world.run(go()) == ["prepare", "copy", "catch_up", "cut_over", "clean_up"]


def test_a_continent_moved_back_by_reverse_can_move_to_the_same_database_again(world: World) -> None:
    """reverse() must leave no report id map behind on the database it left: a later move
    there would take the (deleted) reports for copied ones and never write them."""
    seeded(world, extra_europe=12)
    target, url = spare()

    async def go() -> tuple[Any, dict[str, int]]:
        m = ContinentMove(world.engines, "Europe", target, url=url, batch_size=5)
        await m.prepare()
        await m.copy()
        await m.catch_up()
        await m.cut_over()
        await m.reverse()
        again = ContinentMove(world.engines, "Europe", target, url=url, batch_size=5)
        await again.prepare()
        await again.copy()
        await again.catch_up()
        diff = await again.verify()
        await again.cut_over()
        await again.clean_up(drain_seconds=0)
        counts = {}
        for name in ("europe", target):
            async with world.engines[name].connect() as conn:
                counts[name] = (await conn.execute(text(
                    "SELECT count(*) FROM weather_reports r JOIN weather_locations l ON l.id = r.location_id "
                    "WHERE l.continent = 'Europe'"))).scalar_one()
        return diff, counts

    expected_reports = sum(n % 3 for n in range(12))
    diff, counts = world.run(go())
    assert len(diff) == 0, diff
    assert counts == {"europe": 0, target: expected_reports}, counts
    assert shards.current().placement["Europe"] == target


def test_lookups_stay_right_after_a_move_because_they_store_ids(world: World) -> None:
    """A lookup stores location ids, which name logical shards: after Europe moves, a
    city filter routed through the lookup reaches the new database, with no lookup change."""
    from shardlib import lookups

    seeded(world, extra_europe=2)
    world.run(lookups.enable(world.engines))

    async def new_country() -> None:  # a reference row written after the databases were built
        async with world.Session() as session:
            await session.execute(insert(shardlib.Country).values(code="XE", name="Testland", continent="Europe"))
            await session.commit()

    world.run(new_country())
    target, _ = spare()
    move(world)

    async def go() -> tuple[list[str], list[str], Any]:
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                cities = (await session.execute(select(WeatherLocation.city)
                                                .where(WeatherLocation.city.in_(["London", "Tokyo"]))
                                                .order_by(WeatherLocation.city))).scalars().all()
        return cities, t.shards(), await lookups.verify(world.engines)

    cities, ran_on, differences = world.run(go())
    assert cities == ["London", "Tokyo"]
    # the new database got its copy of every reference table: joins with them stay local
    assert len(world.run(shardlib.reference.check_copies(world.engines))) == 0

    async def joined() -> tuple[int, list[str]]:
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                rows = (await session.execute(select(WeatherLocation.city, shardlib.Country.name)
                                              .join(shardlib.Country, shardlib.Country.continent == WeatherLocation.continent)
                                              .where(WeatherLocation.continent == "Europe"))).all()
        return len(rows), t.shards()

    count, joined_on = world.run(joined())
    assert count > 0 and joined_on == [target]
    assert set(ran_on) == {shardlib.COUNTER_SHARD, "asia", target}  # the lookup, then the two rows' databases
    assert len(differences) == 0
