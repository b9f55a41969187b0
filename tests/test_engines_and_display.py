"""Engines, reset, the trace and the DataFrame display helpers."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from sqlalchemy.ext.horizontal_shard import set_shard_id

import shardlib
from shardlib import SHARD_IDS, WeatherLocation

from .conftest import on_postgres, seed_locations


def test_make_engines_rejects_wrong_shard_names() -> None:
    urls = {s: "sqlite+aiosqlite://" for s in SHARD_IDS}
    with pytest.raises(ValueError, match="missing 'asia'"):
        shardlib.make_engines({k: v for k, v in urls.items() if k != "asia"})
    with pytest.raises(ValueError, match="unknown 'mars'"):
        shardlib.make_engines({**urls, "mars": "sqlite+aiosqlite://"})


def test_parse_urls() -> None:
    assert shardlib.parse_urls(" asia=postgresql://h/a , europe=sqlite:///e.db ") == {
        "asia": "postgresql://h/a",
        "europe": "sqlite:///e.db",
    }
    with pytest.raises(ValueError, match="'asia'.*shard_id=url"):
        shardlib.parse_urls("asia")


def test_environment_variables_choose_the_databases(monkeypatch, tmp_path, loop) -> None:
    monkeypatch.delenv("SHARDLIB_URLS", raising=False)
    monkeypatch.setenv("SHARDLIB_DATA_DIR", str(tmp_path / "elsewhere"))
    engines = shardlib.make_engines()
    assert {Path(e.url.database).name for e in engines.values()} == {f"{s}.db" for s in SHARD_IDS}
    assert all(Path(e.url.database).parent == tmp_path / "elsewhere" for e in engines.values())
    loop.run_until_complete(shardlib.dispose(engines))
    monkeypatch.setenv("SHARDLIB_URLS", ",".join(f"{s}=sqlite+aiosqlite:///{tmp_path}/{s}-url.db" for s in SHARD_IDS))
    engines = shardlib.make_engines()
    assert engines["asia"].url.database.endswith("asia-url.db")
    loop.run_until_complete(shardlib.dispose(engines))


@pytest.mark.skipif(on_postgres(), reason="inspects SQLite files")
def test_each_shard_is_a_separate_sqlite_file(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add_all(seed_locations())
            await session.commit()

    world.run(go())
    path = world.engines["asia"].url.database
    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT city FROM weather_locations").fetchall() == [("Tokyo",)]
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    # the counter lives on north_america only; alembic_version: every shard's own migration record
    assert tables == {"alembic_version", "weather_locations", "weather_reports"}


def test_reset_gives_the_same_ids_every_time(world) -> None:
    async def once():
        await shardlib.reset(world.engines)
        async with world.Session() as session:
            locations = seed_locations()
            session.add_all(locations)
            await session.commit()
            return [loc.id for loc in locations]

    first = world.run(once())
    assert world.run(once()) == first


def test_trace_records_shard_and_sql(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add_all(seed_locations())
            await session.commit()
            with shardlib.trace(world.engines) as t:
                await session.execute(select(WeatherLocation).where(WeatherLocation.continent == "Europe"))
            frame = t.frame()
            assert list(frame.columns) == ["shard", "sql", "params"]
            assert list(frame["shard"]) == ["europe"]
            assert frame["sql"][0].startswith("SELECT weather_locations.id")
            assert t.counts().to_dict() == {"north_america": 0, "asia": 0, "europe": 1, "south_america": 0}
            # after the block, nothing more is recorded
            await session.execute(select(WeatherLocation))
            assert len(t.records) == 1

    world.run(go())


def test_shard_frames_and_show_shards(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add_all(seed_locations())
            await session.commit()
        frames = await shardlib.shard_frames(world.engines, "weather_locations")
        shown = await shardlib.show_shards(world.engines, "weather_reports")
        counter = await shardlib.shard_frames(world.engines, "id_counter")
        return frames, shown, counter

    frames, shown, counter = world.run(go())
    assert list(frames) == list(SHARD_IDS)
    assert list(frames["europe"]["city"]) == ["London", "Dublin"]
    assert isinstance(frames["asia"], pd.DataFrame) and list(frames["asia"].columns) == ["id", "continent", "city"]
    html = shown._repr_html_()
    assert all(f">{s} <" in html for s in SHARD_IDS) and html.count("<table") == 3  # europe has no reports
    assert "(no rows)" in html and "--- asia: weather_reports (1 rows) ---" in repr(shown)
    assert len(counter["asia"]) == 0 and len(counter["north_america"]) == 1
    assert counter["asia"].attrs["missing_table"] and "(no such table)" in repr(shardlib.ShardTables("id_counter", counter))
    with pytest.raises(ValueError, match="unknown table 'nope'"):
        world.run(shardlib.shard_frames(world.engines, "nope"))


def test_unknown_shard_ids_in_bind_arguments_and_set_shard_id(world) -> None:
    async def go():
        async with world.Session() as session:
            with pytest.raises(ValueError, match="unknown shard id 'mars'"):
                await session.execute(select(WeatherLocation), bind_arguments={"shard_id": "mars"})
            with pytest.raises(ValueError, match="unknown shard id 'mars'"):
                await session.execute(select(WeatherLocation).options(set_shard_id("mars")))

    world.run(go())


def test_routing_frame_marks_the_chosen_shards() -> None:
    frame = shardlib.routing_frame(
        {"asia only": select(WeatherLocation).where(WeatherLocation.continent == "Asia")}
    )
    assert frame.iloc[0].to_dict() == {"query": "asia only", "north_america": "", "asia": "✓", "europe": "", "south_america": ""}
