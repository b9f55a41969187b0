"""One shard server down: the others keep working, the down one fails fast and is named.

Runs under ``make test-pg`` with the servers of ``scripts/pg.sh`` (one per
shard), which these tests stop, SIGKILL, pause (SIGSTOP) and restart.
Skipped on SQLite and for servers not run by ``scripts/pg.sh`` here.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text

import shardlib
from shardlib import WeatherLocation, crashlab, outages

from .conftest import on_postgres

pytestmark = pytest.mark.skipif(not on_postgres(), reason="needs SHARDLIB_URLS pointing at PostgreSQL")


@pytest.fixture
def servers() -> Iterator[crashlab.Servers]:
    found = crashlab.Servers.find(shardlib.parse_urls(os.environ["SHARDLIB_URLS"]))
    if found is None:
        pytest.skip("the servers in SHARDLIB_URLS are not the ones scripts/pg.sh runs here")
    yield found
    for shard in shardlib.SHARD_IDS:  # whatever a test did, every server runs afterwards
        found.start(shard)


def _unavailable(error: BaseException) -> shardlib.ShardUnavailable:
    """The ShardUnavailable behind ``error``: itself, or the cause of a wrapper that
    names the shard too (a scatter-gather reports the first failing shard)."""
    cause = error if isinstance(error, shardlib.ShardUnavailable) else error.__cause__
    assert isinstance(cause, shardlib.ShardUnavailable), repr(error)
    assert getattr(error, "shard", None) == cause.shard and cause.shard in str(error), repr(error)
    return cause


def _seed(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add_all([WeatherLocation(c, f"City of {c}") for c in shardlib.CONTINENTS])
            await session.commit()

    world.run(go())


async def _city(Session, continent: str) -> list[str]:
    async with Session() as session:
        return list((await session.execute(
            select(WeatherLocation.city).where(WeatherLocation.continent == continent))).scalars())


def test_the_shards_are_separate_servers(world, servers) -> None:
    """Four addresses, four server processes with durable settings: one stopped,
    the other three answer."""
    urls = shardlib.parse_urls(os.environ["SHARDLIB_URLS"])
    from sqlalchemy.engine import make_url

    assert len({(make_url(u).host, make_url(u).port) for u in urls.values()}) == 4

    async def pids() -> dict[str, object]:
        found = {}
        for shard, engine in world.engines.items():
            try:
                async with engine.connect() as conn:
                    found[shard] = (await conn.execute(text(
                        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'checkpointer'"))).scalar_one()
            except shardlib.ShardUnavailable as error:
                found[shard] = error
        return found

    async def settings() -> set[tuple[str, str]]:
        found = set()
        for engine in world.engines.values():
            async with engine.connect() as conn:
                for name in ("fsync", "synchronous_commit", "full_page_writes"):
                    found.add((name, (await conn.execute(text(f"SHOW {name}"))).scalar_one()))
        return found

    assert world.run(settings()) == {("fsync", "on"), ("synchronous_commit", "on"), ("full_page_writes", "on")}
    before = world.run(pids())
    assert len(set(before.values())) == 4  # four checkpointers: four servers
    servers.stop("europe")
    after = world.run(pids())
    assert isinstance(after["europe"], shardlib.ShardUnavailable) and after["europe"].shard == "europe"
    assert {s: after[s] for s in after if s != "europe"} == {s: before[s] for s in before if s != "europe"}


def test_statements_not_needing_the_down_shard_keep_working(world, servers) -> None:
    _seed(world)
    servers.kill9("asia")  # the pool still holds connections to it: they die under the next statement

    async def go():
        for continent in ("Europe", "North America", "South America"):
            assert await _city(world.Session, continent) == [f"City of {continent}"]
        rows = await shardlib.gather(world.engines, select(func.count()).where(WeatherLocation.continent == "Europe"))
        assert rows[0][0] == 1
        async with world.Session() as session:  # writes elsewhere too (ids come from north_america)
            session.add(WeatherLocation("Europe", "Oslo"))
            await session.commit()
        for attempt in range(2):  # a dead pooled connection, then a refused connect: both named
            with pytest.raises(shardlib.ShardUnavailable, match="shard 'asia' is unavailable") as caught:
                await _city(world.Session, "Asia")
            assert caught.value.shard == "asia"
        with pytest.raises(Exception) as caught:  # every shard: fails on asia
            async with world.Session() as session:
                await session.execute(select(WeatherLocation.city))
        assert _unavailable(caught.value).shard == "asia"

    world.run(go())


def test_gather_says_which_shard_failed(world, servers) -> None:
    _seed(world)
    servers.stop("south_america")

    async def go():
        with pytest.raises(Exception) as caught:
            await shardlib.gather(world.engines, select(func.count()).select_from(WeatherLocation))
        assert _unavailable(caught.value).shard == "south_america"
        north = await shardlib.gather(world.engines, select(WeatherLocation.city).where(
            WeatherLocation.continent.in_(["North America", "Asia"])).order_by(WeatherLocation.city))
        assert [r.city for r in north] == ["City of Asia", "City of North America"]

    world.run(go())


def test_a_server_that_does_not_answer_fails_after_the_connect_timeout(world, servers, monkeypatch) -> None:
    """SIGSTOP: the kernel still accepts TCP connections, the server never replies.
    Without a connect timeout asyncpg waits 60 s; here the timeout ends it."""
    monkeypatch.setattr(outages, "CONNECT_TIMEOUT_S", 1.0)
    engines = shardlib.make_engines(shardlib.parse_urls(os.environ["SHARDLIB_URLS"]))
    Session = shardlib.make_sessionmaker(engines)
    pids = servers.pause("europe")
    try:
        async def go():
            with pytest.raises(shardlib.ShardUnavailable, match="shard 'europe'.*connect failed.*TimeoutError"):
                # a guard against hanging, 30x the timeout: asyncio.TimeoutError here means no timeout was set
                await asyncio.wait_for(_city(Session, "Europe"), 30)
            assert await _city(Session, "Asia") == []

        world.run(go())
    finally:
        servers.resume(pids)
        world.run(shardlib.dispose(engines))


def test_a_server_that_stops_answering_mid_session_fails_after_the_statement_timeout(world, servers, monkeypatch) -> None:
    """A pooled connection to a server that hangs (every backend stopped): the
    statement would wait forever; the statement timeout ends it, the shard named."""
    monkeypatch.setattr(outages, "STATEMENT_TIMEOUT_S", 1.0)
    engines = shardlib.make_engines(shardlib.parse_urls(os.environ["SHARDLIB_URLS"]))
    Session = shardlib.make_sessionmaker(engines)

    async def go():
        assert await _city(Session, "Asia") == []  # the pool now holds a connection to asia
        pids = servers.pause("asia", backends=True)
        try:
            with pytest.raises(shardlib.ShardUnavailable, match="shard 'asia'.*no answer within the statement timeout"):
                await asyncio.wait_for(_city(Session, "Asia"), 30)  # hang guard, 30x the timeout
        finally:
            servers.resume(pids)
        assert await _city(Session, "Europe") == []

    try:
        world.run(go())
    finally:
        world.run(shardlib.dispose(engines))


def test_counter_shard_down_inserts_go_on_while_the_id_block_lasts(world, servers) -> None:
    """The id counter lives on north_america. A process holding a block of ids
    goes on inserting elsewhere; a process without one cannot insert a
    location anywhere, and its flush writes nothing; reads go on."""
    _seed(world)  # this process now holds a block of ids
    servers.stop(shardlib.COUNTER_SHARD)

    async def go():
        async with world.Session() as session:
            session.add(WeatherLocation("Asia", "Osaka"))
            await session.commit()
        fresh = shardlib.make_engines(shardlib.parse_urls(os.environ["SHARDLIB_URLS"]))  # no ids held
        try:
            async with shardlib.make_sessionmaker(fresh)() as session:
                session.add(WeatherLocation("Asia", "Kyoto"))
                with pytest.raises(shardlib.ShardUnavailable) as caught:
                    await session.commit()
                assert caught.value.shard == shardlib.COUNTER_SHARD
            assert sorted(await _city(shardlib.make_sessionmaker(fresh), "Asia")) == ["City of Asia", "Osaka"]
        finally:
            await shardlib.dispose(fresh)

    world.run(go())
