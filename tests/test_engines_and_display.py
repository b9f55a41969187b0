"""Engines, reset, the trace and the DataFrame display helpers."""

from __future__ import annotations

import sqlite3
from html import escape as html_escape
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
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
    # the counter and the lookups live on north_america only; alembic_version: every shard's own
    # migration record; countries: a reference table, copied to every shard
    assert tables == {"alembic_version", "weather_locations", "weather_reports", "countries"}


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
            assert list(frame.columns) == ["shards", "sql", "params"]
            assert list(frame["shards"]) == ["europe"]
            assert frame["sql"][0].startswith("SELECT weather_locations.id")
            assert list(t.frame(per_shard=True)["shard"]) == ["europe"]
            assert t.counts().to_dict() == {"north_america": 0, "asia": 0, "europe": 1, "south_america": 0}
            # after the block, nothing more is recorded
            await session.execute(select(WeatherLocation))
            assert len(t.records) == 1

    world.run(go())


def test_trace_frame_has_one_row_per_statement_with_the_shards_that_ran_it(world) -> None:
    """A scatter SELECT is one row naming four shards; per_shard=True keeps the four raw rows."""
    scatter = select(WeatherLocation).where(WeatherLocation.city == "London")

    async def go():
        async with world.Session() as session:
            session.add_all(seed_locations())
            await session.commit()
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                await session.execute(scatter)
                await session.execute(scatter)  # the same statement again: a second execution
                await session.execute(select(WeatherLocation).where(WeatherLocation.continent.in_(["Asia", "Europe"])))
        return t

    t = world.run(go())
    per_shard = t.frame(per_shard=True)
    assert list(per_shard.columns) == ["shard", "sql", "params"]
    assert list(per_shard["shard"]) == [*SHARD_IDS, *SHARD_IDS, "asia", "europe"]
    frame = t.frame()
    everywhere = ", ".join(SHARD_IDS)
    assert list(frame["shards"]) == [everywhere, everywhere, "asia, europe"], frame
    assert frame["sql"].tolist() == [per_shard["sql"][0], per_shard["sql"][4], per_shard["sql"][8]]
    assert list(t.frame(params=False).columns) == ["shards", "sql"]
    assert [g["shards"] for g in t.statements()] == [list(SHARD_IDS), list(SHARD_IDS), ["asia", "europe"]]


def test_trace_frame_keeps_different_parameters_apart(world) -> None:
    """A flush sends each shard its own rows: same SQL, different parameters, one row each."""
    async def go():
        async with world.Session() as session:
            session.add_all(seed_locations())
            with shardlib.trace(world.engines) as t:
                await session.commit()
        return t

    t = world.run(go())
    inserts = t.frame()[t.frame()["sql"].str.startswith("INSERT INTO weather_locations")]
    assert inserts["shards"].tolist() == list(SHARD_IDS)
    assert len(t.frame()) == len(t.records)  # nothing folded: every shard got its own parameters


def test_trace_html_shows_the_sql_whole_and_wrapped(world) -> None:
    scatter = select(WeatherLocation).where(WeatherLocation.city == "London")

    async def go():
        async with world.Session() as session:
            with shardlib.trace(world.engines) as t:
                await session.execute(scatter)
        return t

    t = world.run(go())
    frame = t.frame()
    sql = frame["sql"][0]
    assert len(sql) > 120 and not sql.endswith("...")
    html = frame._repr_html_()
    assert html.count("<tr>") == 2  # the header and one statement, not four
    assert html_escape(sql) in html and "white-space: pre-wrap" in html
    assert sql in repr(frame)  # the plain-text form is not cut at display.max_colwidth either
    assert sql in repr(frame[frame["shards"] != ""])  # nor that of a frame derived from it


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(SHARD_IDS), st.sampled_from(["S1", "S2"]), st.sampled_from([(1,), (2,)])),
                max_size=12))
def test_trace_statements_fold_exactly_the_repeats_on_other_shards(records) -> None:
    """Folding loses nothing and merges only one execution's copies on distinct shards."""
    t = shardlib.Trace([{"shard": shard, "sql": sql, "params": repr(p), "raw_params": p, "executemany": False}
                        for shard, sql, p in records])
    groups = t.statements()
    # unfolding gives back the records, in order
    assert [(s, g["sql"], g["raw_params"]) for g in groups for s in g["shards"]] == records
    for group in groups:
        assert len(set(group["shards"])) == len(group["shards"])
    # maximal: the next record could not have joined the previous group
    for before, after in zip(groups, groups[1:]):
        assert (before["sql"], before["raw_params"]) != (after["sql"], after["raw_params"]) or \
            after["shards"][0] in before["shards"]
    assert len(t.frame()) == len(groups)


def test_wrapped_frame_renders_long_text_whole() -> None:
    long = "x " * 200
    frame = shardlib.wrapped(pd.DataFrame({"label": ["a"], "text": [long]}).set_index("label"))
    assert isinstance(frame, pd.DataFrame) and long.strip() in repr(frame)
    assert long in frame._repr_html_() and "<th>label</th>" in frame._repr_html_()
    assert frame.loc["a", "text"] == long


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
    assert isinstance(frames["asia"], pd.DataFrame) and list(frames["asia"].columns) == ["id", "continent", "city", "station"]
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
