"""bulk_insert: the fast path must route, allocate and validate like the ORM path."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

import shardlib
from shardlib import SHARD_IDS, Report, WeatherLocation, bulk_insert, shard_for_id, trace

from .conftest import FIXED_TIME


def _frames(world, table):
    return world.run(shardlib.shard_frames(world.engines, table))


def test_bulk_insert_routes_allocates_once_and_batches(world) -> None:
    rows = [{"continent": shardlib.CONTINENTS[i % 4], "city": f"city {i}"} for i in range(2_500)]
    with trace(world.engines) as t:
        assert world.run(bulk_insert(world.engines, WeatherLocation, iter(rows), batch_size=1_000)) == 2_500
    assert sum("id_counter" in r["sql"] for r in t.records) == 1
    inserts = [r for r in t.records if r["sql"].startswith("INSERT")]
    assert sorted(r["shard"] for r in inserts) == sorted(SHARD_IDS)  # 625 rows each: one batch per shard
    assert all(r["executemany"] for r in inserts)
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
