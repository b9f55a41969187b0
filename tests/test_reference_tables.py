"""Reference tables: copied to every shard, joined locally, written everywhere, checked.

Joins are compared with one unsharded database holding the same rows, the
shards that ran SQL are read from engine events, and what each copy holds is
read with plain SQL on each shard's engine.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.exc import IntegrityError

import shardlib
from shardlib import SHARD_IDS, Country, WeatherLocation as WL, trace
from shardlib.geonames import COUNTRIES
from shardlib.reference import ReferenceCopiesDiffer

from .conftest import loaded_world

DATA = [("Europe", "London", []), ("Europe", "Dublin", [1.0]), ("Asia", "Tokyo", [2.0]),
        ("South America", "Quito", [3.0]), ("North America", "Toronto", [])]


def copies(world: Any) -> dict[str, set[tuple[str, str, str]]]:
    async def go() -> dict[str, set[tuple[str, str, str]]]:
        found = {}
        for shard, engine in world.engines.items():
            async with engine.connect() as conn:
                found[shard] = {tuple(r) for r in await conn.execute(text("SELECT code, name, continent FROM countries"))}
        return found

    return world.run(go())


@pytest.fixture(scope="module")
def loaded():
    with loaded_world(DATA) as (world, unsharded):
        unsharded.insert(Country, [dict(code=c, name=n, continent=k) for c, n, k in COUNTRIES])
        yield world, unsharded


def test_every_shard_has_the_geonames_countries_after_reset(loaded) -> None:
    world, _ = loaded
    assert copies(world) == {s: set(COUNTRIES) for s in SHARD_IDS}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(continents=st.sets(st.sampled_from(["Europe", "Asia", "South America", "North America", "Atlantis"])),
       columns=st.sampled_from(["entities", "columns"]), ordered=st.booleans())
def test_joins_with_a_reference_table_run_inside_each_shard_and_equal_the_unsharded_answer(
        loaded, continents: set[str], columns: str, ordered: bool) -> None:
    world, unsharded = loaded
    if columns == "entities":
        statement = select(WL, Country)
    else:
        statement = select(WL.id, WL.city, Country.code, Country.name)
    statement = statement.join(Country, Country.continent == WL.continent).where(WL.continent.in_(sorted(continents)))
    if ordered:
        statement = statement.order_by(WL.id, Country.code)

    async def go() -> list[Any]:
        async with world.Session() as session:
            return list((await session.execute(statement)).all())

    with trace(world.engines) as t:
        got = world.run(go())
    plain = select(WL.id, WL.city, Country.code, Country.name).join(
        Country, Country.continent == WL.continent).where(WL.continent.in_(sorted(continents)))
    expected = unsharded.rows(plain.order_by(WL.id, Country.code))
    if columns == "entities":
        got = [(w.id, w.city, c.code, c.name) for w, c in got]
    assert (got if ordered else sorted(got)) == (expected if ordered else sorted(expected))
    wanted = sorted({shardlib.shard_for_continent(c) for c in continents if c in shardlib.CONTINENTS},
                    key=SHARD_IDS.index)
    assert t.shards() == (wanted or [SHARD_IDS[0]])


def test_a_reference_table_alone_is_read_on_one_shard_and_gathered_once(loaded) -> None:
    world, unsharded = loaded

    async def go() -> Any:
        async with world.Session() as session:
            return list((await session.scalars(select(Country.code).where(Country.continent == "Europe"))).all())

    with trace(world.engines) as t:
        got = world.run(go())
    assert sorted(got) == sorted(r[0] for r in unsharded.rows(select(Country.code).where(Country.continent == "Europe")))
    assert len(t.shards()) == 1
    counted = world.run(shardlib.gather(world.engines, select(func.count()).select_from(Country)))
    assert counted[0][0] == len(COUNTRIES)  # not four times as many


def test_writes_go_to_every_copy_and_a_failure_on_one_leaves_nothing_anywhere(world) -> None:
    async def write(statement: Any, params: Any = None) -> None:
        async with world.Session() as session:
            await session.execute(statement, params)
            await session.commit()

    with trace(world.engines) as t:
        world.run(write(insert(Country), [dict(code="ZZ", name="Zland", continent="Europe")]))
    assert t.shards() == list(SHARD_IDS)
    assert all(("ZZ", "Zland", "Europe") in rows for rows in copies(world).values())
    world.run(write(update(Country).where(Country.code == "ZZ").values(name="Zedland")))
    assert all(("ZZ", "Zedland", "Europe") in rows for rows in copies(world).values())
    assert len(world.run(shardlib.reference.check_copies(world.engines))) == 0

    async def plant() -> None:  # one copy already has the row (a half-applied earlier write)
        async with world.engines["europe"].begin() as conn:
            await conn.execute(text("INSERT INTO countries VALUES ('QQ', 'Qland', 'Asia')"))

    world.run(plant())
    before = copies(world)
    with pytest.raises(IntegrityError):
        world.run(write(insert(Country), [dict(code="QQ", name="Qland", continent="Asia")]))
    assert copies(world) == before  # the other shards' INSERTs were rolled back with the session

    frame = world.run(shardlib.reference.check_copies(world.engines))
    assert list(frame["code"]) == ["QQ"] and frame.iloc[0]["present on"] == "europe"
    assert frame.iloc[0]["missing on"] == "north_america, asia, south_america"
    with pytest.raises(ReferenceCopiesDiffer, match="'QQ'.*missing on north_america, asia, south_america"):
        world.run(shardlib.reference.check_copies(world.engines, raise_if_different=True))
    world.run(write(delete(Country).where(Country.code == "ZZ")))
    assert all(not any(r[0] == "ZZ" for r in rows) for rows in copies(world).values())
    assert world.run(shardlib.reference.copy_from(world.engines, "countries", "asia")) == len(COUNTRIES)
    assert copies(world) == {s: set(COUNTRIES) for s in SHARD_IDS}


def test_an_orm_object_of_a_reference_table_is_refused_by_name(world) -> None:
    async def go() -> None:
        async with world.Session() as session:
            session.add(Country("ZZ", "Zland", "Europe"))
            await session.commit()

    with pytest.raises(ValueError, match=r"Country is a reference table, copied to every shard.*insert\(Country\)"):
        world.run(go())
    assert all(not any(r[0] == "ZZ" for r in rows) for rows in copies(world).values())
