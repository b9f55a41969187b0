"""Bad input fails early, names the bad value and the valid ones, and writes nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import select

import shardlib
from shardlib import Report, WeatherLocation

from .conftest import FIXED_TIME


def _row_counts(world) -> dict[str, int]:
    return world.run(_counts(world))


async def _counts(world) -> dict[str, int]:
    """Rows per shard and table, and the id counter: everything a write could touch."""
    counts = {}
    for table in ("weather_locations", "weather_reports"):
        for shard, frame in (await shardlib.shard_frames(world.engines, table)).items():
            counts[f"{shard}.{table}"] = len(frame)
    counts["counter"] = int((await shardlib.shard_frames(world.engines, "id_counter"))["north_america"]["next_value"][0])
    return counts


def test_unknown_continent_on_construction_and_assignment() -> None:
    with pytest.raises(ValueError) as info:
        WeatherLocation("Atlantis", "Poseidonis")
    message = str(info.value)
    assert "'Atlantis'" in message
    for continent in shardlib.CONTINENTS:
        assert repr(continent) in message
    loc = WeatherLocation("Asia", "Tokyo")
    with pytest.raises(ValueError, match="unknown continent 'asia'"):
        loc.continent = "asia"  # case matters
    with pytest.raises(ValueError, match="unknown continent None"):
        loc.continent = None
    assert loc.continent == "Asia"


def test_a_bad_object_in_a_batch_writes_nothing_anywhere(world) -> None:
    before = _row_counts(world)

    async def go():
        async with world.Session() as session:
            good = [WeatherLocation(c, "Good") for c in shardlib.CONTINENTS]
            good[0].reports.append(Report(1.0, FIXED_TIME))
            orphan = Report(2.0, FIXED_TIME)  # no location: no shard to go to
            session.add_all([*good, orphan])
            with pytest.raises(ValueError, match="has no location"):
                await session.commit()
            await session.rollback()
            assert await _counts(world) == before  # not a row, not even an id
            session.add_all(good)  # rollback expunged the pending objects
            await session.commit()  # the session is usable after rollback
            return len((await session.execute(select(WeatherLocation))).scalars().all())

    assert world.run(go()) == 4


def test_nothing_written_when_the_flush_fails_validation(world) -> None:
    before = _row_counts(world)

    async def go():
        async with world.Session() as session:
            good = [WeatherLocation(c, "Good") for c in shardlib.CONTINENTS]
            bad = WeatherLocation("Europe", "Paris")
            bad.id = shardlib.make_id(99, "asia")  # an id naming the wrong shard
            session.add_all([*good, bad])
            with pytest.raises(ValueError, match="names shard 'asia'"):
                await session.flush()
            await session.rollback()

    world.run(go())
    assert _row_counts(world) == before  # not even the id counter moved


def test_changing_continent_of_a_stored_location_is_refused(world) -> None:
    async def go():
        async with world.Session() as session:
            loc = WeatherLocation("Asia", "Tokyo")
            session.add(loc)
            await session.commit()
            loc.continent = "Europe"
            with pytest.raises(ValueError, match="stored on 'asia'.*move_location"):
                await session.commit()
            await session.rollback()
            moved = await shardlib.move_location(session, loc, "Europe")
            await session.commit()
            assert shardlib.shard_for_id(moved.id) == "europe"
        frames = await shardlib.shard_frames(world.engines, "weather_locations")
        assert list(frames["asia"]["city"]) == [] and list(frames["europe"]["city"]) == ["Tokyo"]

    world.run(go())


def test_move_location_takes_its_reports_along(world) -> None:
    async def go():
        async with world.Session() as session:
            loc = WeatherLocation("Asia", "Tokyo")
            loc.reports.extend([Report(1.0, FIXED_TIME), Report(2.0, FIXED_TIME)])
            session.add(loc)
            await session.commit()
            moved = await shardlib.move_location(session, loc, "South America")
            await session.commit()
        reports = await shardlib.shard_frames(world.engines, "weather_reports")
        assert len(reports["asia"]) == 0
        assert list(reports["south_america"]["location_id"]) == [moved.id, moved.id]

    world.run(go())


def test_shard_chooser_without_an_object_explains_itself(world) -> None:
    async def go():
        async with world.Session() as session:
            with pytest.raises(ValueError, match="bind_arguments"):
                await session.connection()

    world.run(go())
