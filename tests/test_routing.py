"""Routing: the decision (``shards_for``) and what actually ran (engine events)."""

from __future__ import annotations

import pytest
from sqlalchemy import and_, bindparam, delete, false, func, literal_column, not_, or_, select, text, true, update
from sqlalchemy.orm import aliased, selectinload

from shardlib import Report, SHARD_IDS, WeatherLocation, make_id, shards_for, trace, upstream

from .conftest import seed_locations

WL = WeatherLocation
ALL = list(SHARD_IDS)


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (WL.continent == "Asia", ["asia"]),
        ("Asia" == WL.continent, ["asia"]),
        (WL.continent.in_(["Europe", "Asia"]), ["asia", "europe"]),
        (WL.continent.in_(["Asia", "Atlantis"]), ["asia"]),
        (WL.continent == "Atlantis", []),
        (WL.continent.in_([]), []),
        (WL.continent != "Asia", ["north_america", "europe", "south_america"]),
        (WL.continent.not_in(["Asia", "Europe"]), ["north_america", "south_america"]),
        (~(WL.continent == "Asia"), ["north_america", "europe", "south_america"]),
        (not_(or_(WL.continent == "Asia", WL.continent == "Europe")), ["north_america", "south_america"]),
        (not_(and_(WL.continent == "Asia", WL.city == "Tokyo")), ALL),
        (and_(WL.continent == "Asia", WL.city == "Tokyo"), ["asia"]),
        (or_(WL.continent == "Asia", WL.city == "Quito"), ALL),
        (or_(WL.continent == "Asia", WL.continent == "Europe"), ["asia", "europe"]),
        (and_(WL.continent == "Asia", WL.continent == "Europe"), []),
        (and_(or_(WL.continent == "Asia", WL.city == "X"), WL.city != "X"), ["asia"]),
        (WL.city == "Tokyo", ALL),
        (WL.city.startswith("T"), ALL),
        (func.lower(WL.continent) == "asia", ALL),
        (WL.continent.like("As%"), ALL),
        (literal_column("continent") == "Asia", ALL),
        (true(), ALL),
        (false(), []),
        (WL.id == make_id(5, "europe"), ["europe"]),
        (WL.id.in_([make_id(5, "europe"), make_id(6, "asia")]), ["asia", "europe"]),
        (WL.id != make_id(5, "europe"), ALL),
        (WL.id == 3, []),  # too small to carry a shard: no row has it
        (and_(WL.id == make_id(5, "europe"), WL.continent == "Asia"), []),
    ],
    ids=str,
)
def test_shards_for_where_clauses(where, expected) -> None:
    assert shards_for(select(WL).where(where)) == expected


def test_no_where_clause_and_non_select_statements_go_everywhere() -> None:
    assert shards_for(select(WL)) == ALL
    assert shards_for(text("SELECT 1")) == ALL


def test_bound_parameters_are_resolved_including_execute_time_values() -> None:
    stmt = select(WL).where(WL.continent == bindparam("c"))
    assert shards_for(stmt, {"c": "Europe"}) == ["europe"]
    assert shards_for(stmt) == ALL  # value unknown: every shard
    assert shards_for(stmt, [{"c": "Europe"}, {"c": "Asia"}]) == ["asia", "europe"]
    expanding = select(WL).where(WL.continent.in_(bindparam("cs", expanding=True)))
    assert shards_for(expanding, {"cs": ["Asia", "Atlantis"]}) == ["asia"]
    callable_bind = select(WL).where(WL.continent == bindparam("c", callable_=lambda: "Asia"))
    assert shards_for(callable_bind) == ["asia"]


def test_joins_aliases_and_unions_narrow() -> None:
    joined = select(Report).join(Report.location).where(WL.continent == "Asia")
    assert shards_for(joined) == ["asia"]
    alias = aliased(WL)
    assert shards_for(select(alias).where(alias.continent == "Europe")) == ["europe"]
    assert shards_for(select(Report).where(Report.location_id == make_id(2, "asia"))) == ["asia"]
    union = select(WL.id).where(WL.continent == "Asia").union(select(WL.id).where(WL.continent == "Europe"))
    assert shards_for(union) == ["asia", "europe"]


def test_subquery_columns_do_not_narrow() -> None:
    sub = select(WL.continent.label("continent"), WL.city).subquery()
    assert shards_for(select(sub).where(sub.c.continent == "Asia")) == ALL


def test_bulk_update_and_delete_are_routed_by_the_same_analysis() -> None:
    assert shards_for(update(WL).where(WL.continent == "Asia").values(city="x")) == ["asia"]
    assert shards_for(delete(WL).where(WL.continent.in_(["Asia", "Europe"]))) == ["asia", "europe"]


def test_upstream_comparison_visitor_never_fires() -> None:
    stmt = select(WL).where(WL.continent.in_(["Europe", "Asia"]))
    assert upstream.get_select_comparisons(stmt) == []


# ---------------------------------------------------------------- observed routing


@pytest.fixture
def stored(world):
    async def store():
        async with world.Session() as session:
            locations = seed_locations()
            session.add_all(locations)
            await session.commit()
            return {loc.city: loc.id for loc in locations}

    return world.run(store())


def _ran_on(world, statement, params=None, **kw):
    async def go():
        async with world.Session() as session:
            with trace(world.engines) as t:
                result = await session.execute(statement, params, **kw)
                rows = result.rowcount if statement.is_dml else result.scalars().all()
            return t.shards(), rows

    return world.run(go())


def test_selects_run_only_on_the_chosen_shards(world, stored) -> None:
    shards, rows = _ran_on(world, select(WL).where(WL.continent.in_(["Europe", "Asia"])))
    assert shards == ["asia", "europe"]
    assert sorted(r.city for r in rows) == ["Dublin", "London", "Tokyo"]

    shards, rows = _ran_on(world, select(WL).where(WL.continent == bindparam("c")), {"c": "Europe"})
    assert shards == ["europe"] and sorted(r.city for r in rows) == ["Dublin", "London"]

    shards, rows = _ran_on(world, select(Report).join(Report.location).where(WL.continent == "Asia"))
    assert shards == ["asia"] and [r.temperature for r in rows] == [80.0]

    shards, rows = _ran_on(world, select(WL).where(or_(WL.continent == "Asia", WL.city == "Quito")))
    assert shards == ALL and sorted(r.city for r in rows) == ["Quito", "Tokyo"]


def test_a_continent_nobody_stores_returns_nothing_without_error(world, stored) -> None:
    shards, rows = _ran_on(world, select(WL).where(WL.continent == "Atlantis"))
    assert rows == []
    assert len(shards) == 1  # ShardedSession needs one shard to build a result


def test_get_touches_exactly_one_shard_and_upstream_touches_all(world, stored) -> None:
    from shardlib import make_sessionmaker

    async def go(session_maker):
        async with session_maker() as session:
            with trace(world.engines) as t:
                loc = await session.get(WL, stored["Quito"])
            assert loc.city == "Quito"
            return t.shards()

    assert world.run(go(world.Session)) == ["south_america"]
    assert world.run(go(make_sessionmaker(world.engines, routing_rules="upstream"))) == ALL


def test_get_of_an_id_no_shard_can_hold_runs_nothing_much(world, stored) -> None:
    async def go():
        async with world.Session() as session:
            return await session.get(WL, make_id(10_000, "asia")), await session.get(WL, 5)

    assert world.run(go()) == (None, None)


def test_lazy_and_selectin_loads_stay_on_the_parents_shard(world, stored) -> None:
    async def go():
        async with world.Session() as session:
            loc = await session.get(WL, stored["Tokyo"])
            with trace(world.engines) as t:
                reports = await loc.awaitable_attrs.reports
            assert [r.temperature for r in reports] == [80.0]
            lazy = t.shards()
        async with world.Session() as session:
            report = (await session.execute(select(Report).where(Report.location_id == stored["Tokyo"]))).scalar_one()
            with trace(world.engines) as t:
                parent = await report.awaitable_attrs.location
            assert parent.city == "Tokyo"
            many_to_one = t.shards()
        async with world.Session() as session:
            with trace(world.engines) as t:
                rows = (
                    await session.execute(
                        select(WL).where(WL.continent.in_(["Asia", "Europe"])).options(selectinload(WL.reports))
                    )
                ).scalars().all()
            assert {r.city: len(r.reports) for r in rows} == {"Tokyo": 1, "London": 0, "Dublin": 0}
            return lazy, many_to_one, t.shards()

    assert world.run(go()) == (["asia"], ["asia"], ["asia", "europe"])


def test_bulk_update_and_delete_run_only_where_rows_can_match(world, stored) -> None:
    shards, count = _ran_on(world, update(WL).where(WL.continent == "Europe").values(city="Paris"))
    assert shards == ["europe"] and count == 2
    shards, count = _ran_on(world, delete(Report).where(Report.location_id == stored["Quito"]))
    assert shards == ["south_america"] and count == 1


def test_bulk_update_cannot_move_rows_to_another_shard(world, stored) -> None:
    with pytest.raises(ValueError, match="belongs on 'europe'"):
        _ran_on(world, update(WL).where(WL.city == "Tokyo").values(continent="Europe"))
    shards, count = _ran_on(world, update(WL).where(WL.continent == "Europe").values(continent="Europe"))
    assert shards == ["europe"] and count == 2
