"""Property-based routing oracle.

Random WHERE clauses built from AND / OR / NOT / = / != / IN / NOT IN over
``continent`` and ``city`` run through the sharded session and through one
unsharded SQLite database holding the same rows. The results must be equal,
and the shards that actually ran SQL must be exactly the minimal set: the
shards whose continent can make the clause true for *some* truth value of
each city comparison (city comparisons are the "free atoms" of
:mod:`shardlib.routing`; this oracle evaluates them by brute force in Python,
independently of shardlib's tree).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, not_, or_, select

import shardlib
from shardlib import SHARD_FOR_CONTINENT, SHARD_IDS, WeatherLocation, trace

from .conftest import Unsharded, standalone_world

CONTINENTS = ["North America", "Asia", "Europe", "South America"]
CITIES = ["Victoria", "Santiago", "Cordoba", "London", "Tokyo", "Lima", "Perth", "Kingston"]
# Shared city names across continents, and one continent-city pair per (i, j) pattern.
ROWS = [
    (continent, city)
    for i, continent in enumerate(CONTINENTS)
    for j, city in enumerate(CITIES)
    if (i + j) % 3 != 0
]

# ------------------------------------------------------------------ clause ASTs

continent_values = st.sampled_from(CONTINENTS + ["Atlantis"])
city_values = st.sampled_from(CITIES + ["Nowhere"])


def _leaf(column: str, values: Any) -> Any:
    return st.one_of(
        st.tuples(st.sampled_from(["eq", "ne"]), st.just(column), values),
        st.tuples(
            st.sampled_from(["in", "notin"]),
            st.just(column),
            st.lists(values, max_size=3).map(lambda v: tuple(sorted(set(v)))),
        ),
    )


leaves = st.one_of(_leaf("continent", continent_values), _leaf("city", city_values))
clauses = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3).map(tuple)),
        st.tuples(st.just("not"), inner),
    ),
    max_leaves=6,
)


def to_sql(node: Any) -> Any:
    kind = node[0]
    if kind in ("and", "or"):
        parts = [to_sql(n) for n in node[1]]
        return and_(*parts) if kind == "and" else or_(*parts)
    if kind == "not":
        return not_(to_sql(node[1]))
    column = getattr(WeatherLocation, node[1])
    return {
        "eq": lambda: column == node[2],
        "ne": lambda: column != node[2],
        "in": lambda: column.in_(node[2]),
        "notin": lambda: column.not_in(node[2]),
    }[kind]()


def city_atoms(node: Any, into: set) -> set:
    kind = node[0]
    if kind in ("and", "or"):
        for n in node[1]:
            city_atoms(n, into)
    elif kind == "not":
        city_atoms(node[1], into)
    elif node[1] == "city":
        into.add(frozenset([node[2]]) if kind in ("eq", "ne") else frozenset(node[2]))
    return into


def evaluate(node: Any, continent: str, truth: dict) -> bool:
    kind = node[0]
    if kind == "and":
        return all(evaluate(n, continent, truth) for n in node[1])
    if kind == "or":
        return any(evaluate(n, continent, truth) for n in node[1])
    if kind == "not":
        return not evaluate(node[1], continent, truth)
    values = frozenset([node[2]]) if kind in ("eq", "ne") else frozenset(node[2])
    holds = continent in values if node[1] == "continent" else truth[values]
    return holds if kind in ("eq", "in") else not holds


def minimal_shards(node: Any) -> list[str]:
    atoms = sorted(city_atoms(node, set()), key=sorted)
    needed = set()
    for continent in CONTINENTS:
        for values in itertools.product([True, False], repeat=len(atoms)):
            if evaluate(node, continent, dict(zip(atoms, values))):
                needed.add(SHARD_FOR_CONTINENT[continent])
                break
    return [s for s in SHARD_IDS if s in needed]


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def oracle_world():
    with standalone_world() as world:

        async def load() -> list[tuple[int, str, str]]:
            async with world.Session() as session:
                locations = [WeatherLocation(c, city) for c, city in ROWS]
                session.add_all(locations)
                await session.commit()
                return [(loc.id, loc.continent, loc.city) for loc in locations]

        stored = world.run(load())
        unsharded = Unsharded(world.loop)
        unsharded.insert(WeatherLocation, [dict(id=i, continent=c, city=city) for i, c, city in stored])
        yield world.loop, world.engines, world.Session, unsharded
        unsharded.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clause=clauses)
def test_sharded_results_and_routing_match_the_oracle(oracle_world, clause) -> None:
    loop, engines, Session, unsharded = oracle_world
    statement = select(WeatherLocation.id).where(to_sql(clause))

    async def sharded() -> tuple[list[int], list[str]]:
        async with Session() as session:
            with trace(engines) as t:
                ids = (await session.execute(statement)).scalars().all()
            return sorted(ids), t.shards()

    got, ran_on = loop.run_until_complete(sharded())
    expected = sorted(r[0] for r in unsharded.rows(statement))
    assert got == expected

    minimal = minimal_shards(clause)
    assert shardlib.shards_for(statement) == minimal
    if minimal:
        assert ran_on == minimal
    else:  # nothing can match: one shard runs it (ShardedSession needs a result) and finds nothing
        assert len(ran_on) == 1 and got == []
