"""bulk_insert: the fast path must route, allocate and validate like the ORM path."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select

import shardlib
from shardlib import SHARD_IDS, Report, WeatherLocation, bulk_insert, shard_for_id, trace

from .conftest import FIXED_TIME, Unsharded, locations_by_shard, on_postgres, standalone_world


def _frames(world, table):
    return world.run(shardlib.shard_frames(world.engines, table))


def test_bulk_insert_routes_allocates_once_and_batches(world) -> None:
    rows = [{"continent": shardlib.CONTINENTS[i % 4], "city": f"city {i}"} for i in range(2_500)]
    with trace(world.engines) as t:
        assert world.run(bulk_insert(world.engines, WeatherLocation, iter(rows), batch_size=1_000)) == 2_500
    assert sum("id_counter" in r["sql"] for r in t.records) == 1
    inserts = [r for r in t.records if r["sql"].startswith("INSERT")]
    # 625 rows each, batches of 1,000: one INSERT per shard (its cities in one parameter, see below)
    assert sorted(r["shard"] for r in inserts) == sorted(SHARD_IDS)
    frames = _frames(world, "weather_locations")
    ids = [i for f in frames.values() for i in f["id"]]
    assert len(ids) == len(set(ids)) == 2_500
    for shard, frame in frames.items():
        assert set(frame["continent"]) == set(shardlib.SHARD_FOR_CONTINENT) - {
            c for c, s in shardlib.SHARD_FOR_CONTINENT.items() if s != shard
        }
        assert {shard_for_id(i) for i in frame["id"]} == {shard}


def test_bulk_rows_are_ordinary_rows_for_the_orm(world) -> None:
    world.run(bulk_insert(world.engines, WeatherLocation, [{"continent": "Asia", "city": "Osaka"}]))

    async def go():
        async with world.Session() as session:
            osaka = (await session.execute(select(WeatherLocation).where(WeatherLocation.city == "Osaka"))).scalar_one()
            written = await bulk_insert(
                world.engines, Report,
                [{"location_id": osaka.id, "temperature": t, "report_time": FIXED_TIME} for t in (1.0, 2.5)],
            )
            assert written == 2
            reports = await osaka.awaitable_attrs.reports
            assert sorted(r.temperature for r in reports) == [1.0, 2.5]
            assert all(r.report_time == FIXED_TIME for r in reports)
            session.add(WeatherLocation("Asia", "Kyoto"))  # ORM ids continue after the bulk ones
            await session.commit()
            ids = (await session.execute(select(WeatherLocation.id))).scalars().all()
            assert len(set(ids)) == 2

    world.run(go())


@pytest.mark.parametrize(
    ("model", "rows", "message"),
    [
        (WeatherLocation, [{"continent": "Asia", "city": "a"}, {"continent": "Atlantis", "city": "b"}], "'Atlantis'"),
        (WeatherLocation, [{"continent": "Asia"}], "has no 'city'"),
        (WeatherLocation, [{"continent": "Asia", "city": "a", "id": 17}], "allocates ids itself"),
        # the same checks after a row of the same continent (bulk_insert's fast path)
        (WeatherLocation, [{"continent": "Asia", "city": "a"}, {"continent": "Asia", "city": "b", "id": 17}],
         "allocates ids itself"),
        (WeatherLocation, [{"continent": "Asia", "city": "a"}, {"continent": "Asia"}], "row 1 .* has no 'city'"),
        (WeatherLocation, [{"continent": ["Asia"], "city": "a"}], "unknown continent \\['Asia'\\]"),
        (Report, [{"location_id": 5, "temperature": 1.0}], "location_id 5 names no shard"),
        (Report, [{"location_id": 17}], "no 'temperature'"),
    ],
)
def test_bad_rows_write_nothing_anywhere(world, model, rows, message) -> None:
    before = _frames(world, "id_counter")["north_america"]["next_value"][0]
    with pytest.raises(ValueError, match=message):
        world.run(bulk_insert(world.engines, model, rows))
    assert all(len(f) == 0 for f in _frames(world, model.__tablename__).values())
    assert _frames(world, "id_counter")["north_america"]["next_value"][0] == before


def test_bulk_insert_argument_errors(world) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        world.run(bulk_insert(world.engines, WeatherLocation, [], batch_size=0))
    with pytest.raises(ValueError, match="WeatherLocation or Report"):
        world.run(bulk_insert(world.engines, shardlib.Base, []))
    assert world.run(bulk_insert(world.engines, WeatherLocation, [])) == 0


def test_progress_bar(world, capsys) -> None:
    rows = [{"continent": "Europe", "city": f"c{i}"} for i in range(50)]
    assert world.run(bulk_insert(world.engines, WeatherLocation, rows, progress=True, batch_size=10)) == 50
    err = capsys.readouterr().err
    assert "bulk_insert weather_locations" in err and "50/50" in err


def test_counts_match_after_a_large_load(world) -> None:
    rows = ({"continent": shardlib.CONTINENTS[i % 3], "city": str(i)} for i in range(30_000))
    assert world.run(bulk_insert(world.engines, WeatherLocation, rows)) == 30_000

    async def count():
        return await shardlib.gather(world.engines, select(func.count()).select_from(WeatherLocation))

    assert world.run(count())[0][0] == 30_000
    assert len(_frames(world, "weather_locations")["south_america"]) == 0


@pytest.mark.parametrize("concurrent", [True, False])
def test_concurrent_and_sequential_writes_store_the_same_rows(world, concurrent) -> None:
    rows = [{"continent": shardlib.CONTINENTS[i % 4], "city": f"c{i}"} for i in range(400)]
    assert world.run(bulk_insert(world.engines, WeatherLocation, rows, concurrent=concurrent, batch_size=30)) == 400
    frames = _frames(world, "weather_locations")
    assert {s: len(f) for s, f in frames.items()} == {s: 100 for s in SHARD_IDS}
    assert all(shard_for_id(i) == s for s, f in frames.items() for i in f["id"])


# ---------------------------------------------------------------------------------------------
# Generated loads against one unsharded database (the oracle), shards observed by engine events.

_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # any text a driver can encode
_CITY = st.one_of(_TEXT, st.sampled_from(["a\x00b", "\\u0000", "O'Hare", '"quoted"', "😀", "123", ""]))


@st.composite
def _loads(draw: Any) -> list[dict[str, Any]]:
    """Rows as users write them: mostly ``continent`` and ``city``, some with a (unique) station,
    some with ``station: None``, occasionally a city that is not text (stored as text by SQLite)."""
    n = draw(st.integers(0, 40))
    stations = iter(draw(st.lists(st.text("ABCDEFGHJK", min_size=1, max_size=6), min_size=n, max_size=n,
                                  unique=True)))
    rows = []
    for _ in range(n):
        row: dict[str, Any] = {"continent": draw(st.sampled_from(shardlib.CONTINENTS)),
                               "city": draw(st.one_of(_CITY, st.integers(0, 99)) if draw(st.integers(0, 9)) == 0
                                            else _CITY)}
        kind = draw(st.integers(0, 5))
        station = next(stations)
        if kind == 0:
            row["station"] = station
        elif kind == 1:
            row["station"] = None
        rows.append(row)
    return rows


def _stored(world: Any) -> dict[str, list[tuple[Any, ...]]]:
    return locations_by_shard(world, "id, continent, city, station")


@pytest.fixture(scope="module")
def load_world():
    with standalone_world() as world:
        world.run(shardlib.lookups.enable(world.engines))
        yield world


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=_loads(), batch_size=st.sampled_from([1, 3, 7, 10_000]))
def test_generated_loads_store_exactly_what_an_unsharded_database_stores(load_world, rows, batch_size) -> None:
    """Same multiset of (continent, city, station) as plain inserts into one database; each row on
    its continent's database with an id naming the continent's logical shard; INSERTs ran on exactly
    those databases; the counter moved by exactly the number of rows; the lookups still agree."""
    from sqlalchemy import delete, text

    world = load_world
    if on_postgres():  # PostgreSQL stores neither a NUL in text nor an int in a VARCHAR (both refuse)
        rows = [r for r in rows if isinstance(r["city"], str) and "\x00" not in r["city"]]

    async def clear() -> None:
        for shard, engine in world.engines.items():
            async with engine.begin() as conn:
                await conn.execute(text("DELETE FROM weather_locations"))
        async with world.engines[shardlib.COUNTER_SHARD].begin() as conn:
            for lookup in shardlib.models.LOOKUPS:
                await conn.execute(delete(lookup.table))

    world.run(clear())
    oracle = Unsharded(world.loop)
    try:
        if rows:
            oracle.insert(WeatherLocation, [dict(id=n + 1, continent=row["continent"], city=row["city"],
                                                 station=row.get("station")) for n, row in enumerate(rows)])
        expected = sorted((tuple(r) for r in oracle.rows(
            select(WeatherLocation.continent, WeatherLocation.city, WeatherLocation.station))), key=repr)
    finally:
        oracle.close()
    before = _frames(world, "id_counter")[shardlib.COUNTER_SHARD]["next_value"][0]
    with trace(world.engines) as t:
        assert world.run(bulk_insert(world.engines, WeatherLocation, iter(rows), batch_size=batch_size)) == len(rows)
    stored = _stored(world)
    assert sorted(((c, city, s) for found in stored.values() for _, c, city, s in found), key=repr) == expected
    ids = [i for found in stored.values() for i, *_ in found]
    assert len(ids) == len(set(ids))
    for shard, found in stored.items():
        for location_id, continent, _, _ in found:
            assert shardlib.SHARD_FOR_CONTINENT[continent] == shard
            assert shardlib.shards.slot_of_id(location_id) == shardlib.shards.slot_for_continent(continent)
    written = {r["shard"] for r in t.records if r["sql"].startswith("INSERT INTO weather_locations")}
    assert written == {shardlib.SHARD_FOR_CONTINENT[row["continent"]] for row in rows}
    after = _frames(world, "id_counter")[shardlib.COUNTER_SHARD]["next_value"][0]
    assert after - before == len(rows)
    assert all(before <= i >> shardlib.shards.SHARD_BITS < after for i in ids)  # numbers the counter handed out
    assert world.run(shardlib.lookups.verify(world.engines)).empty


@pytest.mark.parametrize(("city", "how"), [("Tokyo", "columnar"), ("a\x00b", "tuples"), (7, "tuples")])
def test_text_travels_as_one_column_parameter_and_anything_else_as_tuples(world, city, how) -> None:
    """The fast path sends each batch's cities as one parameter (SQLite: a JSON array for
    ``json_each``; PostgreSQL: an array for ``unnest``); values it could not carry exactly
    (SQLite's ``json_each`` ends text at a NUL; a number is not text) go as ``executemany``."""
    rows = [{"continent": "Asia", "city": "Kyoto"}, {"continent": "Asia", "city": city}]
    if on_postgres() and how == "tuples":
        pytest.skip("PostgreSQL refuses both a NUL in text and an int for a VARCHAR, whichever way they are sent")
    with trace(world.engines) as t:
        world.run(bulk_insert(world.engines, WeatherLocation, rows))
    inserts = [r for r in t.records if r["sql"].startswith("INSERT INTO weather_locations")]
    sqlite = world.engines["asia"].dialect.name == "sqlite"
    if how == "columnar":
        assert len(inserts) == 1 and not inserts[0]["executemany"]
        assert ("json_each" if sqlite else "unnest") in inserts[0]["sql"]
    else:
        assert len(inserts) == 1 and inserts[0]["executemany"]
    stored = sorted(c for found in _stored(world).values() for _, _, c, _ in found)
    assert stored == sorted(["Kyoto", str(city)])
