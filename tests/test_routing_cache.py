"""The routing cache (:mod:`shardlib.routecache`): a hit routes exactly as a miss would.

Generated statements of one *shape* with different values (the case a cache
keyed too coarsely gets wrong: ``continent = 'Asia'`` and ``continent =
'Europe'`` share SQLAlchemy's cache key) run through the sharded session

* **cold**: the cache emptied before every statement (each one a miss), and
* **warm**: all of them one after another, twice, the cache kept (hits),

and every run must give the same rows as one unsharded database, and the
shards that really ran SQL (engine events) must be the same cold and warm,
and the minimal set this file computes from its own AST
(``tests/test_oracle_grammar.py``'s brute force).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import bindparam, func, inspect, select

import shardlib
from shardlib import SHARD_IDS, WeatherLocation, routecache, routing, trace

from .conftest import loaded_world, on_postgres
from .test_oracle_grammar import (
    CITIES,
    ROWS,
    city_values,
    clauses,
    continent_values,
    minimal_shards,
    to_sql,
)

WL = WeatherLocation


@pytest.fixture(scope="module")
def both():
    data = [(c, city, [float(n % 5)]) for n, (c, city) in enumerate(ROWS)]
    with loaded_world(data) as (world, oracle):
        yield world, oracle


@pytest.fixture(autouse=True)
def fresh_cache():
    routecache.clear()
    yield
    routecache.clear()


def run(world: Any, statement: Any, params: Any = None) -> tuple[list[tuple[Any, ...]], list[str]]:
    async def go() -> tuple[list[tuple[Any, ...]], list[str]]:
        async with world.Session() as session:
            with trace(world.engines) as t:
                rows = (await session.execute(statement, params)).all()
            return [tuple(r) for r in rows], t.shards()

    return world.run(go())


def revalue(node: Any, values: Any) -> Any:
    """The same clause (same shape, same value types) with the next values from ``values``."""
    kind = node[0]
    if kind in ("and", "or"):
        return (kind, tuple(revalue(n, values) for n in node[1]))
    if kind == "not":
        return ("not", revalue(node[1], values))
    _, alias, column, value = node
    new = next(values)
    if isinstance(value, tuple):
        return (kind, alias, column, tuple(dict.fromkeys(new if isinstance(new, tuple) else (new,))))
    return (kind, alias, column, new[0] if isinstance(new, tuple) else new)


def leaf_values(node: Any, draw: Any) -> list[Any]:
    """Fresh values for each leaf, of the leaf's own kind (continent or city, same type)."""
    if node[0] in ("and", "or"):
        return [v for n in node[1] for v in leaf_values(n, draw)]
    if node[0] == "not":
        return leaf_values(node[1], draw)
    _, _, column, value = node
    if column == "continent":
        return [draw(st.lists(continent_values, min_size=1, max_size=3).map(tuple))]
    first = value[0] if isinstance(value, tuple) else value
    same_type = [c for c in (CITIES + ["Nowhere"] + ([] if on_postgres() else [1, 1.0]))
                 if type(c) is type(first)]
    return [draw(st.lists(st.sampled_from(same_type), min_size=1, max_size=3).map(tuple))]


SHAPES = {
    "rows": lambda w: select(WL.id, WL.city).where(w),
    "order_limit": lambda w: select(WL.city, WL.id).where(w).order_by(WL.city, WL.id).limit(4),
    "entities": lambda w: select(WL).where(w).order_by(WL.id),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clause=clauses(("a",)), shape=st.sampled_from(sorted(SHAPES)), data=st.data())
def test_a_cache_hit_routes_as_a_miss_would(both, clause, shape, data) -> None:
    world, oracle = both
    variants = [clause] + [revalue(clause, iter(leaf_values(clause, data.draw)))
                           for _ in range(data.draw(st.integers(1, 3)))]
    statements = [SHAPES[shape](to_sql(v, {"a": WL})) for v in variants]

    cold = []
    for statement in statements:
        routecache.clear()  # every statement a miss
        cold.append(run(world, statement))
    routecache.clear()
    warm = [run(world, s) for s in statements] + [run(world, s) for s in statements]
    assert routecache.stats()["hits"] >= len(statements)  # the second pass at least: hits

    for variant, statement, (rows, ran_on), again, once_more in zip(
            variants, statements, cold, warm[:len(statements)], warm[len(statements):]):
        expected = [tuple(r) for r in oracle.rows(statement)]
        normal = (lambda rs: rs) if shape != "rows" else Counter
        if shape == "entities":  # objects: compare their ids
            rows, expected = [r[0].id for r in rows], [r[0] for r in expected]
            again = ([r[0].id for r in again[0]], again[1])
            once_more = ([r[0].id for r in once_more[0]], once_more[1])
        assert normal(rows) == normal(expected), variant
        minimal = minimal_shards(variant)
        assert ran_on == (minimal or ran_on[:1]), (variant, ran_on, minimal)
        for warm_rows, warm_shards in (again, once_more):
            assert warm_shards == ran_on, (variant, "cold", ran_on, "warm", warm_shards)
            assert normal(warm_rows) == normal(rows), variant


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=continent_values, second=continent_values, by_name=st.booleans())
def test_execute_time_parameters_are_part_of_the_key(both, first, second, by_name) -> None:
    """One statement object, two sets of execute-time values: each routed by its own."""
    world, oracle = both
    statement = select(WL.id).where(WL.continent == bindparam("wanted"), WL.city != "Nowhere")
    if by_name:  # a literal overridden by its compiled name (continent_1), as SQLAlchemy allows
        statement = select(WL.id).where(WL.continent == "Asia")
    for value in (first, second, first):
        params = {("continent_1" if by_name else "wanted"): value}
        rows, ran_on = run(world, statement, params)
        assert sorted(rows) == sorted(tuple(r) for r in oracle.rows(statement, params))
        wanted = shardlib.SHARD_FOR_CONTINENT.get(value)
        assert ran_on == ([wanted] if wanted else ran_on[:1]), (value, ran_on)


def test_values_keep_their_type_in_the_key(both) -> None:
    """``id = 17`` and ``id = 17.0`` are equal (and hash alike) in Python, but only the
    int names a shard; a float is a free test, every shard runs it."""
    if on_postgres():
        pytest.skip("PostgreSQL refuses a float for an integer column")
    world, oracle = both
    some_id = oracle.rows(select(WL.id).order_by(WL.id))[3][0]
    home = shardlib.shard_for_id(some_id)
    by_parameter = select(WL.id).where(WL.id == bindparam("wanted"))  # one cache key for all values
    for value, shards in ((some_id, [home]), (float(some_id), list(SHARD_IDS)), (some_id, [home])):
        for statement, params in ((select(WL.id).where(WL.id == value), None), (by_parameter, {"wanted": value})):
            rows, ran_on = run(world, statement, params)
            assert rows == [(some_id,)] and ran_on == shards, (value, params, ran_on)
    true_on = [run(world, by_parameter, {"wanted": flag})[1] for flag in (1, True, 1)]
    assert true_on[1] == list(SHARD_IDS)  # True names no shard (1 names none either, but routes by id)
    assert true_on[0] == true_on[2]


def test_values_computed_at_run_time_are_never_cached(both) -> None:
    world, _ = both
    wanted = ["Asia"]
    statement = select(WL.id).where(WL.continent == bindparam("c", callable_=lambda: wanted[0]))
    seen = []
    for continent in ("Asia", "Europe", "Asia"):
        wanted[0] = continent
        seen.append(run(world, statement)[1])
    assert seen == [["asia"], ["europe"], ["asia"]]
    assert routecache.stats()["uncached"] >= 3


def test_a_new_shard_map_empties_the_cache() -> None:
    """A new version of the shard map (``shards.activate``, as the catalog does when a
    continent moves) empties the cache: nothing is answered from an older map."""
    statement = select(WL.id).where(WL.continent == "Asia", WL.city != "Nowhere")
    old = shardlib.shards.current()
    assert routecache.shards(statement) == routecache.shards(statement) == [old.database_for("Asia")]
    assert routecache.stats()["hits"] == 1
    moved = old.with_placement("Asia", "europe")
    shardlib.shards.activate(moved)  # Asia now lives on europe's database
    try:
        assert routecache.shards(statement) == shardlib.shards_for(statement) == ["europe"]
        assert routecache.facts(statement) == (None, True, False)
    finally:
        shardlib.shards.activate(old)
    assert routecache.shards(statement) == ["asia"]
    assert routecache.stats()["hits"] == 1  # every answer after a change of map was worked out afresh


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pick=st.integers(0, len(ROWS) - 1), twist=st.sampled_from(["id", "tuple", "missing", "bogus", "bool"]))
def test_get_by_id_goes_where_the_choosers_would(both, pick, twist) -> None:
    """``get()`` asks an id's shard directly (shardlib.session); a session whose choosers are
    the same functions, wrapped (so the shortcut is off), must run SQL on the same shards
    and find the same object."""
    world, oracle = both
    location_id = sorted(r[0] for r in oracle.rows(select(WL.id)))[pick]
    ident: Any = {"id": location_id, "tuple": (location_id,), "missing": location_id + (1 << 20),
                  "bogus": 3, "bool": True}[twist]
    wrapped = shardlib.make_sessionmaker(
        world.engines,
        identity_chooser=lambda *a, **k: routing.identity_chooser(*a, **k),
        execute_chooser=lambda context: routing.execute_chooser(context))

    async def get(Session: Any) -> tuple[Any, list[str]]:
        async with Session() as session:
            with trace(world.engines) as t:
                found = await session.get(WL, ident)
            return (found.id, found.continent) if found is not None else None, t.shards()

    assert world.run(get(world.Session)) == world.run(get(wrapped))


GATHER_SHAPES = {
    "order_limit": lambda w, n: select(WL.city, WL.id).where(w).order_by(WL.city, WL.id).limit(n).offset(n // 2),
    "count_by_continent": lambda w, n: select(WL.continent, func.count(), func.max(WL.city)).where(w)
    .group_by(WL.continent).order_by(WL.continent).limit(n + 1),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(clause=clauses(("a",)), shape=st.sampled_from(sorted(GATHER_SHAPES)), data=st.data())
def test_a_remembered_gather_plan_answers_as_a_fresh_one(both, clause, shape, data) -> None:
    """gather's plan embeds the statement's values (per-shard statement, LIMIT): statements
    of one shape with other values (and other LIMITs) must each get their own answer."""
    world, oracle = both
    variants = [(clause, data.draw(st.integers(0, 5)))] + [
        (revalue(clause, iter(leaf_values(clause, data.draw))), data.draw(st.integers(0, 5)))
        for _ in range(data.draw(st.integers(1, 3)))]
    statements = [GATHER_SHAPES[shape](to_sql(v, {"a": WL}), n) for v, n in variants]

    def gathered(statement: Any) -> tuple[list[tuple[Any, ...]], list[str]]:
        with trace(world.engines) as t:
            rows = world.run(shardlib.gather(world.engines, statement))
        return [tuple(r) for r in rows], t.shards()

    cold = []
    for statement in statements:
        routecache.clear()
        cold.append(gathered(statement))
    routecache.clear()
    warm = [gathered(s) for s in statements] + [gathered(s) for s in statements]
    assert routecache.stats()["hits"] >= len(statements)
    for statement, answer, again, once_more in zip(statements, cold, warm, warm[len(statements):]):
        assert answer[0] == [tuple(r) for r in oracle.rows(statement)]
        assert again == answer and once_more == answer


def test_a_one_shard_statement_runs_once_and_its_objects_know_their_shard(both) -> None:
    """A one-shard statement runs once, in place (shardlib.execution._in_place): one SQL
    statement on the one shard, and the objects it loads carry that shard's identity token,
    so ``get()`` finds them in the identity map and their UPDATE goes home."""
    world, _ = both

    async def go() -> None:
        async with world.Session() as session:
            for statement, kw, shard in (
                    (select(WL).where(WL.continent == "Europe").order_by(WL.id), {}, "europe"),
                    (select(WL).where(WL.city == "Tokyo"), {"bind_arguments": {"shard_id": "asia"}}, "asia")):
                with trace(world.engines) as t:
                    loaded = (await session.execute(statement, **kw)).scalars().all()
                assert len(t.records) == 1 and t.shards() == [shard]
                assert loaded and all(inspect(obj).identity_token == shard for obj in loaded)
                with trace(world.engines) as t:
                    assert all([await session.get(WL, obj.id) is obj for obj in loaded])
                assert t.records == []  # from the identity map: no SQL
            europe = (await session.execute(select(WL).where(WL.continent == "Europe").order_by(WL.id))).scalars().first()
            europe.city = europe.city + " (renamed)"
            with trace(world.engines) as t:
                await session.flush()
            assert t.shards() == ["europe"]
            await session.rollback()

    world.run(go())


def test_long_in_lists_are_routed_afresh(both) -> None:
    """Keys stay small: an IN list longer than MAX_LIST is not remembered, and still routes
    as the analysis says."""
    world, oracle = both
    ids = sorted(r[0] for r in oracle.rows(select(WL.id)))
    asia = [i for i in ids if shardlib.shard_for_id(i) == "asia"]
    padded = asia + [16 * k + 1 for k in range(10_000, 10_000 + routecache.MAX_LIST)]  # asia ids nobody has
    statement = select(WL.id).where(WL.id.in_(padded))
    before = routecache.stats()
    rows, ran_on = run(world, statement)
    assert sorted(r[0] for r in rows) == asia and ran_on == ["asia"]
    assert routecache.stats()["routes"] == before["routes"] and routecache.stats()["uncached"] > before["uncached"]
