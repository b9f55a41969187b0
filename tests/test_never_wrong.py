"""Never silently wrong: each defect class of issue 11, against one unsharded database.

Every statement runs through the sharded session and through one ordinary
database holding the same rows (``Unsharded``); the answers must be equal, or
the session must refuse with :class:`shardlib.CrossShardRefused`. Which shards
ran SQL is observed with engine events (``shardlib.trace``); where rows are
written, an independent reader opens each shard's engine directly.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import (
    bindparam,
    delete,
    exists,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import aliased

import shardlib
from shardlib import SHARD_IDS, CrossShardRefused, Report, WeatherLocation, make_id, shard_for_id, trace

from .conftest import FIXED_TIME, loaded_world, locations_by_shard, standalone_world

WL = WeatherLocation
CITIES = [
    ("Asia", "Tokyo"), ("Asia", "Osaka"), ("Asia", "Victoria"), ("Asia", "Tokyo"),
    ("Europe", "London"), ("Europe", "Victoria"), ("Europe", "Cordoba"),
    ("North America", "London"), ("North America", "Victoria"), ("North America", "Toronto"),
    ("South America", "Cordoba"), ("South America", "Lima"),
]


@pytest.fixture
def both():
    """A sharded world and an unsharded oracle holding the same rows (and reports).

    Function-scoped: on PostgreSQL every world shares the same four databases,
    so a world made by another test would reset them under a longer-lived one."""
    data = [(c, city, [float(10 * k + n) for k in range(n % 3)]) for n, (c, city) in enumerate(CITIES)]
    with loaded_world(data) as (world, oracle):
        yield world, oracle


def sharded(world, statement, params=None, **kw) -> tuple[list[Any], list[str]]:
    async def go():
        async with world.Session() as session:
            with trace(world.engines) as t:
                rows = (await session.execute(statement, params, **kw)).all()
            return [tuple(r) for r in rows], t.shards()

    return world.run(go())


def same_rows(world, oracle, statement, params=None, ordered=False):
    got, ran_on = sharded(world, statement, params)
    expected = [tuple(r) for r in oracle.rows(statement, params)]
    if ordered:
        assert got == expected
    else:
        assert Counter(got) == Counter(expected), (got, expected)
    return ran_on


# ------------------------------------------------------------------ 1. routing

a, b = aliased(WL), aliased(WL)


def test_conditions_on_two_aliases_are_two_atoms(both) -> None:
    world, oracle = both
    statement = (
        select(a.city, b.city)
        .join(b, a.continent == b.continent)
        .where(a.city == "Tokyo", b.city != "Tokyo")
    )
    ran_on = same_rows(world, oracle, statement)
    assert ran_on == list(SHARD_IDS)  # city atoms are free: any shard may hold such a pair


def test_values_of_different_types_are_different_atoms() -> None:
    assert shardlib.shards_for(select(WL).where(WL.city == 1, WL.city != 1.0)) == list(SHARD_IDS)
    assert shardlib.shards_for(select(WL).where(WL.city == 1, WL.city != 1)) == []


def test_parameters_given_by_compiled_name_are_read(both) -> None:
    world, oracle = both
    statement = select(WL.city).where(WL.continent == "Asia")
    ran_on = same_rows(world, oracle, statement, {"continent_1": "Europe"})
    assert ran_on == ["europe"]
    key_wins = select(WL.city).where(WL.continent == bindparam("c", "Asia"))
    assert same_rows(world, oracle, key_wins, {"c": "South America"}) == ["south_america"]


def test_routing_a_hundred_conditions_stays_exact_and_cheap() -> None:
    from sqlalchemy import and_, or_

    wide = select(WL).where(WL.continent == "Asia", *[WL.city != f"c{i}" for i in range(100)])
    assert shardlib.shards_for(wide) == ["asia"]
    mixed = select(WL).where(or_(*[and_(WL.continent == c, WL.city == f"x{i}")
                                   for i, c in enumerate(["Asia", "Europe"] * 50)]))
    assert shardlib.shards_for(mixed) == ["asia", "europe"]
    tangled = select(WL).where(WL.city == "a", WL.continent == "Asia", ~(WL.city == "a"))
    assert shardlib.shards_for(tangled) == []


# ------------------------------------------------------------------ 2. writes


def assert_every_row_home(world) -> None:
    for shard, rows in locations_by_shard(world).items():
        for location_id, continent, city in rows:
            assert shardlib.shard_for_continent(continent) == shard, (shard, continent, city)
            assert shard_for_id(location_id) == shard, (shard, location_id, city)


@pytest.fixture
def fresh():
    with standalone_world() as world:
        yield world


def test_core_insert_goes_to_exactly_the_rows_shards(fresh) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            with trace(world.engines) as t:
                await session.execute(insert(WL).values(continent="Asia", city="Kyoto"))
                await session.execute(insert(WL), [dict(continent="Europe", city="Oslo"),
                                                   dict(continent="South America", city="Quito")])
                await session.execute(insert(WL).values([dict(continent="Asia", city="Nara")]))
            await session.commit()
            return t.shards()

    world.run(go())
    rows = locations_by_shard(world)
    assert sorted(c for _, _, c in rows["asia"]) == ["Kyoto", "Nara"]
    assert [c for _, _, c in rows["europe"]] == ["Oslo"]
    assert [c for _, _, c in rows["south_america"]] == ["Quito"]
    assert rows["north_america"] == []
    assert_every_row_home(world)


def test_core_insert_of_a_bad_continent_writes_nothing(fresh) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            with trace(world.engines) as t:
                with pytest.raises(ValueError, match="Atlantis"):
                    await session.execute(insert(WL), [dict(continent="Asia", city="ok"),
                                                       dict(continent="Atlantis", city="x")])
            return t.frame()

    frame = world.run(go())
    assert len(frame) == 0  # no SQL at all, not even the counter
    assert all(rows == [] for rows in locations_by_shard(world).values())


def test_core_insert_of_reports_follows_the_location_id(fresh) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            tokyo = WL("Asia", "Tokyo")
            session.add(tokyo)
            await session.flush()
            await session.execute(insert(Report), [dict(location_id=tokyo.id, temperature=1.0,
                                                        report_time=FIXED_TIME)])
            await session.commit()
            return tokyo.id

    tokyo_id = world.run(go())

    async def count():
        found = {}
        for shard, engine in world.engines.items():
            async with engine.connect() as conn:
                found[shard] = (await conn.execute(text("SELECT location_id FROM weather_reports"))).scalars().all()
        return found

    assert world.run(count()) == {s: ([tokyo_id] if s == "asia" else []) for s in SHARD_IDS}


def test_pinned_insert_of_a_row_from_elsewhere_is_refused(fresh) -> None:
    async def go():
        async with fresh.Session() as session:
            with pytest.raises(ValueError, match="pinned to shard 'asia'.*belongs on 'europe'"):
                await session.execute(insert(WL).values(continent="Europe", city="x"),
                                      bind_arguments={"shard_id": "asia"})

    fresh.run(go())


@pytest.mark.parametrize("how", ["params", "pinned_option", "bind_arguments", "values"])
def test_bulk_update_cannot_strand_a_row_on_any_path(fresh, how) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            session.add(WL("Asia", "Tokyo"))
            await session.commit()
        async with world.Session() as session:
            where = update(WL).where(WL.city == "Tokyo")
            calls = {
                "params": lambda: session.execute(where, {"continent": "Europe"}),
                "pinned_option": lambda: session.execute(
                    where.values(continent="Europe").options(set_shard_id("asia"))),
                "bind_arguments": lambda: session.execute(
                    where.values(continent="Europe"), bind_arguments={"shard_id": "asia"}),
                "values": lambda: session.execute(where.values(continent="Europe")),
            }
            with pytest.raises(ValueError, match="belongs on 'europe'"):
                await calls[how]()

    world.run(go())
    assert_every_row_home(world)


def test_changing_a_primary_key_or_a_reports_shard_is_refused(fresh) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            tokyo, paris = WL("Asia", "Tokyo"), WL("Europe", "Paris")
            tokyo.reports.append(Report(1.0, FIXED_TIME))
            session.add_all([tokyo, paris])
            await session.commit()
            tokyo.id = make_id(999, "europe")
            with pytest.raises(ValueError, match="id cannot change"):
                await session.flush()
            await session.rollback()
        async with world.Session() as session:
            with pytest.raises(ValueError, match="weather_locations.id"):
                await session.execute(update(WL).where(WL.city == "Paris").values(id=make_id(5, "europe")))
        async with world.Session() as session:
            report = (await session.execute(select(Report))).scalar_one()
            paris = (await session.execute(select(WL).where(WL.city == "Paris"))).scalar_one()
            report.location = paris
            with pytest.raises(ValueError, match="stored on 'asia'.*stored on 'europe'"):
                await session.flush()

    world.run(go())
    assert_every_row_home(world)


def test_explicit_ids_are_reserved_in_the_counter(fresh) -> None:
    world = fresh
    explicit = make_id(5, "asia")

    async def go():
        async with world.Session() as session:
            session.add_all([WL("Asia", "x")])
            await session.commit()
        async with world.Session() as session:
            location = WL("Asia", "explicit")
            location.id = explicit
            session.add(location)
            await session.commit()
        async with world.Session() as session:  # the allocator must never hand out 5 again
            shardlib.ids.forget_allocations(world.engines["north_america"].sync_engine)
            new = [WL("Asia", f"n{i}") for i in range(10)]
            session.add_all(new)
            await session.commit()
            return [n.id for n in new]

    ids = world.run(go())
    assert explicit not in ids


def test_an_id_given_in_a_rolled_back_flush_is_not_reused(fresh) -> None:
    world = fresh

    async def go():
        async with world.Session() as session:
            await session.execute(select(WL).where(WL.continent == "North America"))  # holds the counter shard
            first = WL("North America", "A")
            session.add(first)
            await session.flush()  # in-session allocation on SQLite: the rollback returns the number
            given = first.id
            await session.rollback()
        async with world.Session() as session:
            other = WL("North America", "B")
            session.add(other)
            await session.commit()
        async with world.Session() as session:
            session.add(first)  # the learner re-adds the object that kept its id
            await session.commit()
        return given, first.id, other.id

    given, first_id, other_id = world.run(go())
    assert first_id != other_id
    assert_every_row_home(world)


# ------------------------------------------------------------------ 3. session results


@pytest.mark.parametrize(
    "statement",
    [
        select(exists().where(WL.continent == "Asia")),
        select(exists().where(WL.city == "Lima")),
        select(exists().where(WL.city == "Nowhere")),
        select(literal(1)),
        select(WL.city).order_by(WL.city, WL.id),
        select(WL).order_by(WL.city.desc(), WL.id),
        select(WL.city).order_by(WL.city).limit(3).offset(2),
        select(WL.city).distinct(),
        select(func.count()).select_from(WL),
        select(WL.continent, func.count()).group_by(WL.continent),
        select(WL.city, func.count().label("n"), func.min(WL.id)).group_by(WL.city).order_by(WL.city),
        select(func.avg(Report.temperature), func.max(Report.temperature), func.sum(Report.temperature)),
        select(func.count()).select_from(Report).join(Report.location).where(WL.city != "Tokyo"),
        select(WL.city).order_by(func.lower(WL.city)),
        select(WL.city).order_by(WL.id.desc()).limit(5),
        select(WL.city).where(WL.continent == "Asia").union(select(WL.city).where(WL.continent == "Europe")),
        select(WL.city).union_all(select(WL.city).where(WL.continent == "Europe")),
        select(WL.city).union(select(WL.city)),
        select(Report.temperature).join(Report.location).order_by(Report.temperature.desc(), Report.location_id).limit(4),
        select(WL.city, select(func.count(Report.id)).where(Report.location_id == WL.id).scalar_subquery()),
        select(WL.city).where(WL.id.in_(select(Report.location_id).where(Report.temperature > 5))),
        select(WL.city).where(exists().where(Report.location_id == WL.id)),
        select(a.city, b.city).join(b, a.continent == b.continent).where(a.city != b.city),
    ],
    ids=lambda s: " ".join(str(s).split())[:80],
)
def test_multi_shard_results_are_exact(both, statement) -> None:
    world, oracle = both
    ordered = isinstance(statement, type(select(WL))) and bool(getattr(statement, "_order_by_clauses", ()))
    got, _ = sharded(world, statement)
    expected = [tuple(r) for r in oracle.rows(statement)]
    if not ordered:
        got, expected = Counter(got), Counter(expected)
    entity_rows = isinstance(got, list) and got and isinstance(got[0][0], WL)
    if entity_rows:
        got = [(r[0].id, r[0].continent, r[0].city) for r in got]
        expected = [tuple(r[:3]) for r in expected]
    assert got == expected


def test_no_from_runs_once(both) -> None:
    world, _ = both
    got, ran_on = sharded(world, select(literal(1)))
    assert got == [(1,)] and len(ran_on) == 1


@pytest.mark.parametrize(
    ("statement", "construct"),
    [
        (select(func.count()).select_from(WL).where(WL.city == "x").having(func.count() > 0), "HAVING"),
        (select(Report).group_by(Report.location_id), "over ORM entities"),
        (select(func.group_concat(WL.city)), "aggregate group_concat"),
        (select(func.my_udf(WL.city)), "my_udf"),
        (select(WL.city).intersect(select(WL.city)), "INTERSECT"),
        (select(WL.city).except_(select(WL.city).where(WL.continent == "Asia")), "EXCEPT"),
        (select(WL.city).order_by(WL.city.collate("NOCASE")), "ORDER BY"),
        (select(a.city, b.city).join(b, a.city == b.city), "not on the shard key"),
        (select(WL).where(WL.city.in_(select(a.city).where(a.continent == "Asia"))), "without tying those rows"),
        (select(a.city, b.city).join(b, a.city == b.city).where(a.continent == "Asia"), "not on the shard key"),
        (select(WL).where(WL.id.in_(select(Report.location_id).order_by(Report.temperature).limit(2))),
         "without tying those rows"),
        (text("SELECT city FROM weather_locations"), "TextClause"),
        (select(select(WL.city).distinct().subquery().c.city), "de-duplicates"),
        (select(func.count()).select_from(select(WL.city).distinct().subquery()), "de-duplicates"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(str(v).split())[:60],
)
def test_what_cannot_be_merged_is_refused_by_name(both, statement, construct) -> None:
    world, _ = both
    with pytest.raises(CrossShardRefused, match=construct) as refused:
        sharded(world, statement)
    assert "gather" in str(refused.value) and "set_shard_id" in str(refused.value)


def test_the_upstream_concatenation_is_one_explicit_option_away(both) -> None:
    world, _ = both
    statement = select(func.count()).select_from(WL).execution_options(shardlib_concatenate=True)
    got, ran_on = sharded(world, statement)
    assert len(got) == 4 and ran_on == list(SHARD_IDS)


# ------------------------------------------------------------------ 7. errors


def test_get_of_a_report_id_on_two_shards_names_them(both) -> None:
    world, _ = both

    async def go():
        async with world.Session() as session:
            return await session.get(Report, 1)

    with pytest.raises(Exception, match="shards") as raised:
        world.run(go())
    assert "asia" in str(raised.value) or "north_america" in str(raised.value)


def test_bulk_insert_of_tuples_names_the_row_and_the_shape(fresh) -> None:
    with pytest.raises(ValueError, match=r"row 0 is a tuple .*'continent', 'city'"):
        fresh.run(shardlib.bulk_insert(fresh.engines, WL, [("Asia", "Tokyo")]))


@pytest.mark.parametrize("concurrent", [False, True])
def test_a_failed_bulk_insert_names_the_shard_and_leaves_nothing_pending(fresh, concurrent) -> None:
    world = fresh

    async def break_europe():
        async with world.engines["europe"].begin() as conn:
            await conn.execute(text("DROP TABLE weather_reports"))
            await conn.execute(text("DROP TABLE weather_locations"))

    world.run(break_europe())
    rows = [dict(continent=c, city="x") for c in ("Asia", "Europe", "South America")]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "coroutine ... was never awaited" would fail here
        with pytest.raises(shardlib.bulk.BulkInsertError, match="shard 'europe'"):
            world.run(shardlib.bulk_insert(world.engines, WL, rows, concurrent=concurrent))
        import gc

        gc.collect()
    for engine in world.engines.values():
        assert engine.sync_engine.pool.checkedout() == 0
