"""Cross-shard joins: refused by default, naming the join and the alternatives; with
``shardlib_cross_shard_join=True`` joined in the application, exactly as one unsharded
database answers (hypothesis generates the joins), never concatenated.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, func, select
from sqlalchemy.orm import aliased

import shardlib
from shardlib import CrossShardRefused, Report, WeatherLocation as WL, trace

from .conftest import loaded_world

DATA = [
    ("Europe", "London", [10.0, 12.5]), ("North America", "London", [12.5, None]),
    ("Asia", "Victoria", [20.0, 20.0]), ("North America", "Victoria", [20.0, 7.0]),
    ("South America", "Victoria", []), ("South America", "Quito", [7.0]), ("Europe", "Quito", [30.0]),
    ("Asia", "Tokyo", [10.0]),
]
DATA = [(c, city, [t for t in temps if t is not None]) for c, city, temps in DATA]

OPTION = {"shardlib_cross_shard_join": True}


@pytest.fixture(scope="module")
def loaded():
    with loaded_world(DATA) as pair:
        yield pair


def run(world: Any, statement: Any) -> list[tuple[Any, ...]]:
    async def go() -> list[tuple[Any, ...]]:
        async with world.Session() as session:
            return [tuple(r) for r in (await session.execute(statement)).all()]

    return world.run(go())


def test_a_join_across_shards_is_refused_by_default_naming_it_and_the_alternatives(loaded) -> None:
    world, _ = loaded
    a, b = aliased(WL), aliased(WL)
    statement = select(a.city, b.city).join(b, a.city == b.city)
    with trace(world.engines) as t, pytest.raises(CrossShardRefused) as refused:
        run(world, statement)
    message = str(refused.value)
    assert "weather_locations (aliased), weather_locations (aliased)" in message
    assert "shardlib.gather" in message and "shardlib_cross_shard_join=True" in message
    assert t.records == []  # refused before any SQL


cities = st.sampled_from(["London", "Victoria", "Quito", "Tokyo", "Nowhere"])
continents = st.sampled_from(["Europe", "North America", "Asia", "South America"])
comparisons = st.sampled_from(["<", "!=", "<=", None])


def _compare(op: str, x: Any, y: Any) -> Any:
    return {"<": x < y, "!=": x != y, "<=": x <= y}[op]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.sampled_from(["same city", "reports by temperature", "same station"]), residual=comparisons,
       left_city=st.none() | cities, right_continent=st.none() | continents, ordered=st.booleans(),
       distinct=st.booleans(), limit=st.none() | st.integers(0, 4), offset=st.none() | st.integers(0, 3))
def test_application_side_hash_joins_equal_the_unsharded_answer(
        loaded, shape: str, residual: Any, left_city: Any, right_continent: Any, ordered: bool,
        distinct: bool, limit: Any, offset: Any) -> None:
    world, unsharded = loaded
    if shape == "same city":  # pairs of cities with the same name, on different continents
        a, b = aliased(WL), aliased(WL)
        on = a.city == b.city
        if residual:
            on = and_(on, _compare(residual, a.continent, b.continent))
        statement = select(a.city, a.continent, b.continent).join(b, on)
        if left_city:
            statement = statement.where(a.city == left_city)
        if right_continent:
            statement = statement.where(b.continent == right_continent)
        order = [a.city, a.continent, b.continent]
    elif shape == "same station":  # every station is NULL here: NULL = NULL is not true, no pairs
        a, b = aliased(WL), aliased(WL)
        statement = select(a.id, b.id, a.station).join(b, a.station == b.station)
        order = [a.id, b.id]
    else:  # reports compared across continents: same temperature, different locations
        r, s = aliased(Report), aliased(Report)
        on = r.temperature == s.temperature
        if residual:
            on = and_(on, _compare(residual, r.location_id, s.location_id))
        statement = select(r.location_id, s.location_id, r.temperature).join(s, on)
        if left_city:  # a per-side condition of another kind
            statement = statement.where(r.temperature > 9)
        order = [r.location_id, s.location_id, r.temperature]  # a total order of the selected columns
    if distinct:
        statement = statement.distinct()
    if ordered:
        statement = statement.order_by(*order)
    if ordered and (limit is not None or offset is not None):
        statement = statement.limit(limit).offset(offset)
    expected = [tuple(r) for r in unsharded.rows(statement)]
    with trace(world.engines) as t:
        got = run(world, statement.execution_options(**OPTION))
    if ordered:
        assert got == expected
    else:
        assert sorted(got, key=repr) == sorted(expected, key=repr)
    # each side was read once per shard it needs, never the join itself on a shard
    assert all(" JOIN " not in g["sql"] for g in t.statements())
    assert 1 <= len(t.statements()) <= 2


def test_each_side_is_routed_by_its_own_conditions(loaded) -> None:
    world, unsharded = loaded
    a, b = aliased(WL), aliased(WL)
    statement = (select(a.id, b.id).join(b, a.city == b.city)
                 .where(a.continent == "Europe", b.continent == "North America"))
    with trace(world.engines) as t:
        got = run(world, statement.execution_options(**OPTION))
    assert sorted(got) == sorted(tuple(r) for r in unsharded.rows(statement))
    assert [g["shards"] for g in t.statements()] == [["europe"], ["north_america"]]


@pytest.mark.parametrize(("build", "names"), [
    (lambda a, b: select(a, b).join(b, a.city == b.city), "ORM entities"),
    (lambda a, b: select(func.count()).select_from(a).join(b, a.city == b.city), "aggregate"),
    (lambda a, b: select(a.city).join(b, a.city < b.city), "no equality"),
    (lambda a, b: select(a.city).outerjoin(b, a.city == b.city), "outer join"),
    (lambda a, b: select(func.lower(a.city)).join(b, a.city == b.city), "select plain columns"),
    (lambda a, b: select(a.city).join(b, a.city == func.lower(b.city)), "compares expressions"),
])
def test_what_cannot_be_joined_here_is_refused_before_any_sql(loaded, build: Any, names: str) -> None:
    world, _ = loaded
    a, b = aliased(WL), aliased(WL)
    with trace(world.engines) as t, pytest.raises(CrossShardRefused, match=names):
        run(world, build(a, b).execution_options(**OPTION))
    assert t.records == []


def test_a_join_the_shards_can_answer_is_not_pulled_into_the_application(loaded) -> None:
    world, unsharded = loaded
    statement = select(WL.city, Report.temperature).join(Report, Report.location_id == WL.id).where(
        WL.continent == "Asia")
    with trace(world.engines) as t:
        got = run(world, statement.execution_options(**OPTION))
    assert sorted(got) == sorted(tuple(r) for r in unsharded.rows(statement))
    assert [g["shards"] for g in t.statements()] == [["asia"]] and " JOIN " in t.statements()[0]["sql"]
