"""What a real server adds: two-phase commit across shards. Runs under make test-pg."""

from __future__ import annotations

import pytest
from sqlalchemy import event, select, text

import shardlib
from shardlib import WeatherLocation

from .conftest import on_postgres

pytestmark = pytest.mark.skipif(not on_postgres(), reason="needs SHARDLIB_URLS pointing at PostgreSQL")


class InjectedFailure(Exception):
    pass


def _fail_on(engine, prefix: str):
    def before(conn, cursor, statement, *args):
        if statement.startswith(prefix):
            raise InjectedFailure(f"injected failure before {prefix!r}")

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return lambda: event.remove(engine.sync_engine, "before_cursor_execute", before)


CITY_ON = {"Asia": "Osaka", "Europe": "Paris", "North America": "Toronto"}


async def _commit_that_fails(Session, continents: list[str]) -> None:
    """Add one city per continent; the commit must raise the injected failure."""
    async with Session() as session:
        session.add_all([WeatherLocation(c, CITY_ON[c]) for c in continents])
        with pytest.raises(InjectedFailure):
            await session.commit()
        await session.rollback()


def _cities(world) -> dict[str, list[str]]:
    frames = world.run(shardlib.shard_frames(world.engines, "weather_locations"))
    return {s: sorted(f["city"]) for s, f in frames.items()}


def test_max_prepared_transactions_is_enabled(world) -> None:
    async def go():
        async with world.engines["asia"].connect() as conn:
            return int((await conn.execute(text("SHOW max_prepared_transactions"))).scalar_one())

    assert world.run(go()) > 0


def test_two_phase_commit_writes_all_shards_or_none(world) -> None:
    Session = shardlib.make_sessionmaker(world.engines, twophase=True)
    remove = _fail_on(world.engines["europe"], "PREPARE TRANSACTION")

    try:
        world.run(_commit_that_fails(Session, ["Asia", "Europe", "North America"]))
    finally:
        remove()
    assert _cities(world) == {s: [] for s in shardlib.SHARD_IDS}

    async def succeed():
        async with Session() as session:
            session.add_all([WeatherLocation("Asia", "Osaka"), WeatherLocation("Europe", "Paris")])
            await session.commit()
        async with world.engines["asia"].connect() as conn:  # nothing left prepared
            return (await conn.execute(text("SELECT count(*) FROM pg_prepared_xacts"))).scalar_one()

    assert world.run(succeed()) == 0
    assert _cities(world)["europe"] == ["Paris"] and _cities(world)["asia"] == ["Osaka"]


@pytest.mark.filterwarnings("ignore:transaction already deassociated:sqlalchemy.exc.SAWarning")
def test_without_two_phase_commit_a_late_failure_leaves_half_the_shards_committed(world) -> None:
    """The contrast: plain commits go shard by shard; a failing COMMIT can't undo the others."""
    Session = shardlib.make_sessionmaker(world.engines)

    def fail_commit(conn):
        raise InjectedFailure("injected COMMIT failure on europe")

    event.listen(world.engines["europe"].sync_engine, "commit", fail_commit)

    try:
        world.run(_commit_that_fails(Session, ["Asia", "Europe"]))
    finally:
        event.remove(world.engines["europe"].sync_engine, "commit", fail_commit)
    cities = _cities(world)
    assert cities["europe"] == []
    assert cities["asia"] in ([], ["Osaka"])  # shards commit in no fixed order


def test_session_reads_see_committed_rows(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add(WeatherLocation("South America", "Quito"))
            await session.commit()
            return (await session.execute(select(WeatherLocation.city))).scalars().all()

    assert world.run(go()) == ["Quito"]


def test_reset_refuses_to_hang_on_an_in_doubt_prepared_transaction(world) -> None:
    async def go():
        async with world.engines["asia"].connect() as conn:
            await conn.execute(text("BEGIN"))
            await conn.execute(text("INSERT INTO weather_locations (id, continent, city) VALUES (17, 'Asia', 'Tokyo')"))
            await conn.execute(text("PREPARE TRANSACTION 'shardlab-test-in-doubt'"))
        try:
            with pytest.raises(RuntimeError, match="shardlab-test-in-doubt"):
                await shardlib.reset(world.engines)
        finally:
            async with world.engines["asia"].connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                await conn.execute(text("ROLLBACK PREPARED 'shardlab-test-in-doubt'"))
        await shardlib.reset(world.engines)

    world.run(go())
