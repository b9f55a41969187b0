"""Global ids: unique everywhere, naming their shard, cheap, and deadlock-free."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

import shardlib
from shardlib import SHARD_IDS, IdAllocator, WeatherLocation, make_id, shard_for_id, trace

from .conftest import FIXED_TIME


def test_id_layout_round_trips() -> None:
    for shard in SHARD_IDS:
        for n in (1, 2, 1000, 2**40):
            assert shard_for_id(make_id(n, shard)) == shard
            assert make_id(n, shard) >> shardlib.SHARD_BITS == n
    assert shard_for_id(7) is None and shard_for_id("17") is None and shard_for_id(True) is None
    assert shard_for_id((1 << 4) | 9) is None  # index 9 names no shard
    with pytest.raises(ValueError, match="'mars'.*valid ones are 'north_america'"):
        make_id(1, "mars")


def test_one_counter_statement_per_flush_and_blocks_are_reused(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add_all([WeatherLocation(c, f"city {i}") for i in range(50) for c in shardlib.CONTINENTS])
            with trace(world.engines) as t:
                await session.commit()
            counter_statements = [r for r in t.records if "id_counter" in r["sql"]]
            assert len(counter_statements) == 1
            # inserts are batched per shard although objects were added interleaved
            inserts = [r for r in t.records if r["sql"].startswith("INSERT INTO weather_locations")]
            assert [r["shard"] for r in inserts] == list(SHARD_IDS)
        async with world.Session() as session:
            session.add(WeatherLocation("Asia", "Osaka"))
            with trace(world.engines) as t:
                await session.commit()
            assert not [r for r in t.records if "id_counter" in r["sql"]]  # came from the cached block

    world.run(go())


def test_ids_are_unique_and_name_their_shard(world) -> None:
    async def go():
        async with world.Session() as session:
            locations = [WeatherLocation(c, f"c{i}") for i in range(30) for c in shardlib.CONTINENTS]
            session.add_all(locations)
            await session.commit()
        ids = [loc.id for loc in locations]
        assert len(set(ids)) == len(ids)
        for loc in locations:
            assert shard_for_id(loc.id) == shardlib.shard_for_continent(loc.continent)
        frames = await shardlib.shard_frames(world.engines, "weather_locations")
        for shard, frame in frames.items():
            assert {shard_for_id(i) for i in frame["id"]} <= {shard}

    world.run(go())


def test_allocation_inside_a_session_that_already_wrote_the_counter_shard(world) -> None:
    """The session holds north_america's write lock; a second connection would deadlock.

    On SQLite the counter is advanced inside the session's own transaction. On
    PostgreSQL the session never holds the counter's row lock, so the
    allocator's own short transaction cannot wait for it.
    """
    from shardlib import ids as ids_module

    async def go():
        async with world.Session() as session:
            session.add(WeatherLocation("North America", "Boston"))
            await session.flush()  # north_america is now locked by this session's transaction
            world_alloc = session.sync_session.info["shardlib.allocator"]
            world_alloc.forget()  # force a trip to the counter
            session.add(WeatherLocation("North America", "Denver"))
            with trace(world.engines) as t:
                await asyncio.wait_for(session.flush(), timeout=20)
            counter = [r for r in t.records if "id_counter" in r["sql"]]
            assert len(counter) == 1
            if world.engines["north_america"].dialect.name == "sqlite":
                assert counter[0]["raw_params"] == (1,)  # inside the session: exact, not a block
            else:
                assert counter[0]["raw_params"] == (ids_module.DEFAULT_BLOCK_SIZE,)  # row lock: own txn
            await session.commit()
        async with world.Session() as session:
            names = (await session.execute(select(WeatherLocation.city).order_by(WeatherLocation.city))).scalars()
            assert list(names) == ["Boston", "Denver"]

    assert ids_module.DEFAULT_BLOCK_SIZE > 1
    world.run(go())


def test_rolled_back_in_transaction_allocation_is_not_reused_from_cache(world) -> None:
    async def go():
        async with world.Session() as session:
            session.add(WeatherLocation("North America", "Boston"))
            await session.flush()
            session.sync_session.info["shardlib.allocator"].forget()
            session.add(WeatherLocation("Asia", "Osaka"))
            await session.flush()
            await session.rollback()
        async with world.Session() as session:
            locations = [WeatherLocation("Asia", f"a{i}") for i in range(5)]
            session.add_all(locations)
            await session.commit()
        assert len({loc.id for loc in locations}) == 5

    world.run(go())


def test_fifty_concurrent_writers(world) -> None:
    async def writer(n: int) -> list[int]:
        async with world.Session() as session:
            batch = [WeatherLocation(c, f"w{n}-{c}") for c in shardlib.CONTINENTS]
            for loc in batch:
                loc.reports.append(shardlib.Report(float(n), FIXED_TIME))
            session.add_all(batch)
            await session.commit()
            return [loc.id for loc in batch]

    async def go():
        results = await asyncio.gather(*(writer(n) for n in range(50)))
        ids = [i for r in results for i in r]
        assert len(ids) == len(set(ids)) == 200
        async with world.Session() as session:
            stored = (await session.execute(select(WeatherLocation.id))).scalars().all()
            reports = [row.count_1 for row in await shardlib.gather(
                world.engines, select(func.count()).select_from(shardlib.Report))]
        assert sorted(stored) == sorted(ids)
        assert sum(reports) == 200

    world.run(go())


def test_allocator_blocks_are_disjoint_between_allocators(world) -> None:
    engine = world.engines["north_america"].sync_engine

    async def go():
        a, b = IdAllocator(engine, block_size=10), IdAllocator(engine, block_size=10)
        from sqlalchemy.util import greenlet_spawn

        taken = []
        for _ in range(5):
            taken += await greenlet_spawn(a.allocate, 7)
            taken += await greenlet_spawn(b.allocate, 3)
        assert len(taken) == len(set(taken)) == 50

    world.run(go())
    with pytest.raises(ValueError, match="block_size"):
        IdAllocator(engine, block_size=0)


def test_a_big_flush_pauses_the_cyclic_gc_and_always_restores_it(world) -> None:
    import gc

    from shardlib import session as session_module

    seen = []

    async def go():
        async with world.Session() as session:
            session.add_all([WeatherLocation("Asia", f"a{i}") for i in range(session_module.GC_PAUSE_MIN_OBJECTS)])
            await session.commit()
        async with world.Session() as session:
            locations = [WeatherLocation("Asia", f"b{i}") for i in range(session_module.GC_PAUSE_MIN_OBJECTS)]
            locations[-1].reports.append(shardlib.Report(1.0, FIXED_TIME))
            session.add_all(locations)
            session.add(shardlib.Report(2.0, FIXED_TIME))  # no location: the flush fails
            with pytest.raises(ValueError):
                await session.commit()
            await session.rollback()

    from sqlalchemy import event

    def probe(session, context):
        seen.append(gc.isenabled())

    event.listen(shardlib.ShardlibSession, "after_flush", probe)
    try:
        assert gc.isenabled()
        world.run(go())
    finally:
        event.remove(shardlib.ShardlibSession, "after_flush", probe)
    assert seen == [False]  # paused during the big flush
    assert gc.isenabled()  # and back on, also after the failed one
