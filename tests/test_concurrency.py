"""Concurrent writers across shards: they all commit, or fail fast and retryably.

Every test checks the final rows with an *independent* per-shard reader (the
standard library's ``sqlite3``, or a fresh engine on the same URL: no
shardlib code), that every row sits on the shard its continent names, that
the counts are what was written, and compares with one unsharded database
holding the rows the writers reported as committed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
from collections import Counter
from typing import Any

import pytest
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

import shardlib
import shardlib.locking
from shardlib import SHARD_FOR_CONTINENT, SHARD_IDS, ShardConflict, ShardLockTimeout, WeatherLocation

from .conftest import Unsharded, World, on_postgres

LOCK_TIMEOUT_S = 0.5
"""Lock wait for the tests that expect a conflict: short, so that they end quickly."""

ORDERS = [
    ("Asia", "Europe"), ("Europe", "Asia"),
    ("North America", "South America"), ("South America", "North America"),
    ("Asia", "North America"), ("North America", "Asia"),
]
"""Pairs of continents written in both orders; North America holds the id counter."""


# --------------------------------------------------------------------------- helpers

async def independent_rows(engines: dict[str, Any]) -> dict[str, list[tuple[int, str, str]]]:
    """(id, continent, city) per shard, read without shardlib."""
    rows: dict[str, list[tuple[int, str, str]]] = {}
    for shard in SHARD_IDS:
        url = engines[shard].url
        query = "SELECT id, continent, city FROM weather_locations ORDER BY id"
        if url.get_backend_name() == "sqlite":
            with sqlite3.connect(url.database) as conn:
                rows[shard] = [tuple(r) for r in conn.execute(query)]
        else:
            engine = create_async_engine(url.render_as_string(hide_password=False), poolclass=NullPool)
            async with engine.connect() as conn:
                rows[shard] = [tuple(r) for r in (await conn.execute(text(query))).all()]
            await engine.dispose()
    return rows


def check_final_rows(loop: asyncio.AbstractEventLoop, engines: dict[str, Any],
                     written: list[tuple[str, str]]) -> None:
    """Placement, counts, and equality with an unsharded database of ``written``."""
    per_shard = loop.run_until_complete(independent_rows(engines))
    for shard, rows in per_shard.items():
        for location_id, continent, city in rows:
            assert SHARD_FOR_CONTINENT[continent] == shard, f"{city} ({continent}) stored on {shard}"
            assert shardlib.shard_for_id(location_id) == shard, f"id {location_id} of {city} on {shard}"
    stored = [(continent, city) for rows in per_shard.values() for _, continent, city in rows]
    ids = [location_id for rows in per_shard.values() for location_id, _, _ in rows]
    assert len(ids) == len(set(ids)), "an id was given twice"
    oracle = Unsharded(loop)
    try:
        if written:
            oracle.insert(WeatherLocation.__table__, [
                {"id": i + 1, "continent": c, "city": city} for i, (c, city) in enumerate(written)])
        expected = oracle.rows(select(WeatherLocation.continent, WeatherLocation.city))
        by_continent = dict(oracle.rows(select(WeatherLocation.continent, func.count()).group_by(WeatherLocation.continent)))
    finally:
        oracle.close()
    assert Counter(stored) == Counter(tuple(r) for r in expected)
    assert Counter(c for c, _ in stored) == Counter(by_continent)


@pytest.fixture
def fast_world(loop, tmp_path):
    """A world whose lock waits end after LOCK_TIMEOUT_S (busy timeout / lock_timeout)."""
    world = World.__new__(World)
    world.loop = loop
    world.engines = shardlib.make_engines(data_dir=str(tmp_path / "shards"), lock_timeout=LOCK_TIMEOUT_S)
    world.Session = shardlib.make_sessionmaker(world.engines)
    world.run(shardlib.reset(world.engines))
    yield world
    world.close()


def sqlite_only(world) -> None:
    if world.engines["north_america"].dialect.name != "sqlite":
        pytest.skip("SQLite behaviour")


async def opposite_order_writer(Session, name: str, first: str, second: str,
                                mine: asyncio.Event | None = None,
                                other: asyncio.Event | None = None,
                                pause: float = 0.01) -> list[tuple[str, str]]:
    """Two flushes, ``first`` then ``second``; with events, wait (briefly) until the
    other writer has flushed too, so that without lock ordering both hold one
    shard's write lock when they ask for the other's."""
    async with Session() as session:
        session.add(WeatherLocation(first, f"{name} 1"))
        await session.flush()
        if mine is not None and other is not None:
            mine.set()
            try:
                await asyncio.wait_for(other.wait(), timeout=0.5)
            except TimeoutError:
                pass  # the other writer is waiting for us: go on
        else:
            await asyncio.sleep(pause)
        session.add(WeatherLocation(second, f"{name} 2"))
        await session.flush()
        await session.commit()
    return [(first, f"{name} 1"), (second, f"{name} 2")]


# --------------------------------------------------------------------------- opposite-order writers

def test_two_opposite_order_writers_both_commit(world) -> None:
    async def go():
        a_flushed, b_flushed = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(
            opposite_order_writer(world.Session, "A", "Asia", "Europe", a_flushed, b_flushed),
            opposite_order_writer(world.Session, "B", "Europe", "Asia", b_flushed, a_flushed),
            return_exceptions=True,
        )

    results = world.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors
    check_final_rows(world.loop, world.engines, [row for r in results for row in r])


def test_thirty_opposite_order_writers_all_commit(world) -> None:
    async def go():
        return await asyncio.gather(
            *(opposite_order_writer(world.Session, f"w{n}", *ORDERS[n % len(ORDERS)]) for n in range(30)),
            return_exceptions=True,
        )

    results = world.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of 30 failed: {errors[:2]}"
    written = [row for r in results for row in r]
    assert len(written) == 60
    check_final_rows(world.loop, world.engines, written)


def test_readers_then_writers_all_commit(world) -> None:
    """Each session reads every shard, then writes two shards in its own order,
    reading again in between, while the others commit."""

    async def reader_writer(n: int) -> list[tuple[str, str]]:
        first, second = ORDERS[n % len(ORDERS)]
        async with world.Session() as session:
            await session.execute(select(WeatherLocation))
            await asyncio.sleep(0.01)
            session.add(WeatherLocation(first, f"r{n} 1"))
            await session.flush()
            await session.execute(select(WeatherLocation).where(WeatherLocation.continent == second))
            session.add(WeatherLocation(second, f"r{n} 2"))
            await session.commit()
        return [(first, f"r{n} 1"), (second, f"r{n} 2")]

    async def go():
        async with world.Session() as session:
            session.add_all([WeatherLocation(c, f"seed {c}") for c in shardlib.CONTINENTS])
            await session.commit()
        return await asyncio.gather(*(reader_writer(n) for n in range(20)), return_exceptions=True)

    results = world.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:2]
    seeds = [(c, f"seed {c}") for c in shardlib.CONTINENTS]
    check_final_rows(world.loop, world.engines, seeds + [row for r in results for row in r])


def _ticket_is_taken(path: str) -> bool:
    """Ask the ticket file itself, with the standard library: can I take its write lock now?"""
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError as error:
        assert "locked" in str(error)
        return True
    finally:
        conn.close()


def test_the_write_ticket_is_held_from_the_first_write_to_the_end_and_costs_the_shards_nothing(world) -> None:
    """SQLite: the ticket file is locked from the first write (flush or DML) to the
    commit or rollback, not by reads; the shards run exactly the SQL they ran
    before (engine events); servers take no ticket at all."""
    sqlite = world.engines["north_america"].dialect.name == "sqlite"
    ticket = str(shardlib.locking.ticket_path(world.engines["north_america"].url.database or ":memory:"))
    from sqlalchemy import update

    async def go():
        seen = {}
        async with world.Session() as session:
            with shardlib.trace(world.engines) as reads:
                await session.execute(select(WeatherLocation).where(WeatherLocation.continent == "Asia"))
            seen["after read"] = sqlite and _ticket_is_taken(ticket)
            session.add(WeatherLocation("Asia", "Tokyo"))
            with shardlib.trace(world.engines) as first:
                await session.flush()
            seen["after flush"] = sqlite and _ticket_is_taken(ticket)
            session.add(WeatherLocation("Europe", "Paris"))
            await session.commit()
            seen["after commit"] = sqlite and _ticket_is_taken(ticket)
        async with world.Session() as session:
            await session.execute(update(WeatherLocation).where(WeatherLocation.continent == "Europe")
                                  .values(city="PARIS"))
            seen["after bulk update"] = sqlite and _ticket_is_taken(ticket)
            await session.rollback()
            seen["after rollback"] = sqlite and _ticket_is_taken(ticket)
        return reads, first, seen

    reads, first, seen = world.run(go())
    if sqlite:  # the data directory holds the shards and the shard map's catalog, nothing else
        data_dir = os.path.dirname(world.engines["asia"].url.database)
        assert {name.split(".")[0] for name in os.listdir(data_dir)} == {*SHARD_IDS, "catalog"}
    assert reads.shards() == ["asia"]
    assert [(r["shard"], r["sql"].split(" ")[0]) for r in first.records if "id_counter" not in r["sql"]] == [
        ("asia", "INSERT")]
    assert seen == {"after read": False, "after flush": sqlite, "after commit": False,
                    "after bulk update": sqlite, "after rollback": False}


def test_opposite_order_bulk_updates_and_deletes_commit_on_sqlite(world) -> None:
    """ORM-enabled UPDATE/DELETE through the session take the ticket too (they are
    not flushes): two sessions updating asia and europe in opposite order, each
    waiting briefly for the other, both commit."""
    sqlite_only(world)
    from sqlalchemy import delete, update

    async def one(first: str, second: str, mine: asyncio.Event, other: asyncio.Event) -> None:
        async with world.Session() as session:
            await session.execute(update(WeatherLocation)
                                  .where(WeatherLocation.continent == first, ~WeatherLocation.city.startswith("gone"))
                                  .values(city=func.upper(WeatherLocation.city)))
            mine.set()
            try:
                await asyncio.wait_for(other.wait(), timeout=0.5)
            except TimeoutError:
                pass
            await session.execute(delete(WeatherLocation).where(WeatherLocation.city == f"gone {second}"))
            await session.commit()

    async def go():
        async with world.Session() as session:
            session.add_all([WeatherLocation("Asia", "tokyo"), WeatherLocation("Europe", "paris"),
                             WeatherLocation("Asia", "gone Asia"), WeatherLocation("Europe", "gone Europe")])
            await session.commit()
        a, b = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(one("Asia", "Europe", a, b), one("Europe", "Asia", b, a),
                                    return_exceptions=True)

    results = world.run(go())
    assert results == [None, None], results
    check_final_rows(world.loop, world.engines, [("Asia", "TOKYO"), ("Europe", "PARIS")])


def test_a_second_writing_session_in_the_same_task_times_out_clearly(fast_world) -> None:
    """The documented limit: the ticket is held until commit, so a second session
    that writes before the first commits waits, then gets a retryable error."""
    world = fast_world
    sqlite_only(world)

    async def go():
        async with world.Session() as first, world.Session() as second:
            first.add(WeatherLocation("Asia", "Tokyo"))
            await first.flush()
            second.add(WeatherLocation("Europe", "Paris"))
            with pytest.raises(ShardLockTimeout) as info:
                await second.flush()
            await second.rollback()
            await first.commit()
            second.add(WeatherLocation("Europe", "Paris"))  # now the ticket is free
            await second.commit()
        return info.value

    error = world.run(asyncio.wait_for(go(), timeout=60))
    assert error.shard == "write_ticket" and "write ticket" in str(error) and shardlib.is_retryable(error)
    check_final_rows(world.loop, world.engines, [("Asia", "Tokyo"), ("Europe", "Paris")])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # SQLAlchemy: "non-checked-in connection"
def test_a_session_dropped_without_closing_gives_the_ticket_back(fast_world) -> None:
    import gc

    world = fast_world
    sqlite_only(world)

    async def go():
        abandoned = world.Session()
        abandoned.add(WeatherLocation("Asia", "Tokyo"))
        await abandoned.flush()  # holds the ticket ...
        del abandoned  # ... and is dropped without commit, rollback or close
        gc.collect()
        await asyncio.sleep(0)
        async with world.Session() as session:
            session.add(WeatherLocation("Europe", "Paris"))
            await session.commit()

    world.run(asyncio.wait_for(go(), timeout=60))
    check_final_rows(world.loop, world.engines, [("Europe", "Paris")])


# --------------------------------------------------------------------------- bounded waits, retryable errors

async def _deadlock_pair(Session, rows: dict[str, int]) -> list[Any]:
    """A updates Tokyo (asia) then London (europe); B the other way round: a
    cross-shard lock cycle on any database, since both rows already exist."""
    from sqlalchemy import update

    async def one(first: str, second: str, mine: asyncio.Event, other: asyncio.Event) -> str:
        async with Session() as session:
            await session.execute(update(WeatherLocation).where(WeatherLocation.id == rows[first])
                                  .values(city=f"{first} by {second}-writer"))
            mine.set()
            await asyncio.wait_for(other.wait(), timeout=30)
            await session.execute(update(WeatherLocation).where(WeatherLocation.id == rows[second])
                                  .values(city=f"{second} by {second}-writer"))
            await session.commit()
            return "committed"

    a, b = asyncio.Event(), asyncio.Event()
    return await asyncio.gather(one("Tokyo", "London", a, b), one("London", "Tokyo", b, a),
                                return_exceptions=True)


def _run_guarded(coro_factory, seconds: float) -> Any:
    """Run ``coro_factory()`` on a fresh loop in a thread; fail if it is still
    running after ``seconds`` (a hang), rather than timing how fast it was."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = asyncio.run(coro_factory())
        except BaseException as error:  # pragma: no cover - reported below
            box["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        return "HUNG"
    if "error" in box:
        raise box["error"]
    return box["result"]


def _end_hung_backends(urls: dict[str, str]) -> None:
    """After a hang on PostgreSQL: end the blocked sessions so the suite can go on."""
    async def go():
        for url in urls.values():
            engine = create_async_engine(url, poolclass=NullPool)
            async with engine.connect() as conn:
                await conn.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"))
            await engine.dispose()

    asyncio.run(go())


def test_a_cross_shard_deadlock_ends_with_a_retryable_error_then_run_transaction_commits(tmp_path) -> None:
    """Two sessions lock rows on asia and europe in opposite order. PostgreSQL's
    deadlock detector cannot see the cycle (it spans two databases), and on
    SQLite the write ticket is switched off to build the same cycle: the
    bounded lock wait must end it with ShardLockTimeout naming the shard. Then
    run_transaction runs the same two transactions to completion."""
    data_dir = str(tmp_path / "shards")

    async def scenario():
        engines = shardlib.make_engines(data_dir=data_dir, lock_timeout=LOCK_TIMEOUT_S)
        try:
            await shardlib.reset(engines)
            Session = shardlib.make_sessionmaker(engines, info={"shardlib.write_ticket": False})
            async with Session() as session:
                tokyo, london = WeatherLocation("Asia", "Tokyo"), WeatherLocation("Europe", "London")
                session.add_all([tokyo, london])
                await session.commit()
            rows = {"Tokyo": tokyo.id, "London": london.id}
            outcome = await _deadlock_pair(Session, rows)

            attempts = Counter()

            async def swap(first: str, second: str):
                from sqlalchemy import update

                async def fn(session):
                    attempts[first] += 1
                    await session.execute(update(WeatherLocation).where(WeatherLocation.id == rows[first])
                                          .values(city=first.upper()))
                    await asyncio.sleep(0.05)
                    await session.execute(update(WeatherLocation).where(WeatherLocation.id == rows[second])
                                          .values(city=second.upper()))
                    return first

                return await shardlib.run_transaction(Session, fn, max_attempts=20, backoff=0.05)

            retried = await asyncio.gather(swap("Tokyo", "London"), swap("London", "Tokyo"))
            return outcome, retried, dict(attempts), await independent_rows(engines)
        finally:
            await shardlib.dispose(engines)

    result = _run_guarded(scenario, seconds=60)
    if result == "HUNG":
        if on_postgres():
            _end_hung_backends(shardlib.parse_urls(os.environ["SHARDLIB_URLS"]))
        pytest.fail("the cross-shard deadlock did not end within 60 s: no bounded lock wait")
    outcome, retried, attempts, rows = result
    timeouts = [r for r in outcome if isinstance(r, ShardLockTimeout)]
    assert timeouts, f"expected a ShardLockTimeout, got {outcome!r}"
    assert all(r == "committed" or isinstance(r, ShardLockTimeout) for r in outcome), outcome
    for error in timeouts:
        assert error.shard in ("asia", "europe") and f"shard {error.shard!r}" in str(error)
        assert shardlib.is_retryable(error) and "run_transaction" in str(error)
        assert error.db_code in ("55P03", "SQLITE_BUSY")
    assert sorted(retried) == ["London", "Tokyo"]
    assert rows["asia"][0][1:] == ("Asia", "TOKYO") and rows["europe"][0][1:] == ("Europe", "LONDON")
    assert len(rows["asia"]) == len(rows["europe"]) == 1


def test_opposite_order_updates_on_one_shard(world) -> None:
    """Both rows on asia, locked in opposite order. SQLite: the ticket orders the
    two sessions, both commit. PostgreSQL: one server sees the whole cycle and
    its deadlock detector ends it (40P01), raised as ShardConflict naming asia;
    run_transaction then commits both."""
    from sqlalchemy import update

    async def go():
        async with world.Session() as session:
            tokyo, osaka = WeatherLocation("Asia", "Tokyo"), WeatherLocation("Asia", "Osaka")
            session.add_all([tokyo, osaka])
            await session.commit()
        ids = {"Tokyo": tokyo.id, "Osaka": osaka.id}

        async def one(first, second, mine, other, session):
            await session.execute(update(WeatherLocation).where(WeatherLocation.id == ids[first]).values(city=first.upper()))
            mine.set()
            try:
                await asyncio.wait_for(other.wait(), timeout=0.5)
            except TimeoutError:
                pass
            await session.execute(update(WeatherLocation).where(WeatherLocation.id == ids[second]).values(city=second.upper()))

        async def plain(first, second, mine, other):
            async with world.Session() as session:
                await one(first, second, mine, other, session)
                await session.commit()

        a, b = asyncio.Event(), asyncio.Event()
        outcome = await asyncio.gather(plain("Tokyo", "Osaka", a, b), plain("Osaka", "Tokyo", b, a),
                                       return_exceptions=True)
        c, d = asyncio.Event(), asyncio.Event()
        await asyncio.gather(
            shardlib.run_transaction(world.Session, lambda s: one("Tokyo", "Osaka", c, d, s), backoff=0.05),
            shardlib.run_transaction(world.Session, lambda s: one("Osaka", "Tokyo", d, c, s), backoff=0.05))
        return outcome

    outcome = world.run(asyncio.wait_for(go(), timeout=120))
    if world.engines["asia"].dialect.name == "sqlite":
        assert outcome == [None, None], outcome
    else:
        conflicts = [r for r in outcome if isinstance(r, ShardConflict)]
        assert conflicts and all(r is None or isinstance(r, ShardConflict) for r in outcome), outcome
        assert all(c.shard == "asia" and c.db_code == "40P01" and "shard 'asia'" in str(c) for c in conflicts)
    check_final_rows(world.loop, world.engines, [("Asia", "TOKYO"), ("Asia", "OSAKA")])


def test_lock_timeout_reaches_every_connection(tmp_path, loop) -> None:
    """Asked of the database itself: PRAGMA busy_timeout / SHOW lock_timeout."""

    async def settings(**kw):
        engines = shardlib.make_engines(data_dir=str(tmp_path / "shards"), **kw)
        try:
            found = {}
            for shard, engine in engines.items():
                async with engine.connect() as conn:
                    if conn.dialect.name == "sqlite":
                        found[shard] = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar_one()
                    else:
                        found[shard] = (await conn.exec_driver_sql("SHOW lock_timeout")).scalar_one()
            return engines["asia"].dialect.name, found
        finally:
            await shardlib.dispose(engines)

    dialect, chosen = loop.run_until_complete(settings(lock_timeout=0.25))
    _, default = loop.run_until_complete(settings())
    if dialect == "sqlite":
        assert chosen == dict.fromkeys(SHARD_IDS, 250) and default == dict.fromkeys(SHARD_IDS, 30_000)
    else:
        assert chosen == dict.fromkeys(SHARD_IDS, "250ms") and default == dict.fromkeys(SHARD_IDS, "10s")
    for bad in (-1, True):
        with pytest.raises(ValueError, match=f"lock_timeout must be a number of seconds >= 0, got {bad!r}"):
            shardlib.make_engines(data_dir=str(tmp_path / "shards"), lock_timeout=bad)


# --------------------------------------------------------------------------- run_transaction

async def _hold_lock_on(engines, shard: str):
    """A separate transaction that blocks writes to ``shard``'s weather_locations."""
    conn = await engines[shard].connect()
    if conn.dialect.name == "sqlite":
        await conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        await conn.execute(text("LOCK TABLE weather_locations IN SHARE MODE"))
    return conn


def test_run_transaction_retries_a_lost_conflict_and_rolls_back_between_attempts(fast_world) -> None:
    world = fast_world
    calls = []

    async def go():
        blocker = await _hold_lock_on(world.engines, "asia")

        async def fn(session):
            calls.append(len(calls) + 1)
            if len(calls) == 2:
                await blocker.rollback()  # the competing transaction finishes
            session.add(WeatherLocation("Europe", f"Paris {len(calls)}"))
            await session.flush()  # europe written, inside this attempt
            session.add(WeatherLocation("Asia", "Osaka"))
            await session.flush()  # asia: blocked on attempt 1
            return len(calls)

        try:
            return await shardlib.run_transaction(world.Session, fn, backoff=0.01)
        finally:
            await blocker.close()

    assert world.run(asyncio.wait_for(go(), timeout=60)) == 2  # a hang fails, not a slow run
    assert calls == [1, 2]
    check_final_rows(world.loop, world.engines, [("Europe", "Paris 2"), ("Asia", "Osaka")])


def test_run_transaction_never_retries_what_is_not_a_conflict(world) -> None:
    calls = []

    async def bad_city(session):
        calls.append("bad")
        session.add(WeatherLocation("Europe", "Paris"))
        await session.flush()
        raise ValueError("not a conflict")

    async def duplicate_id(session):
        calls.append("dup")
        session.add(WeatherLocation("Asia", "Tokyo"))
        await session.flush()
        await session.execute(text("INSERT INTO weather_locations (id, continent, city) "
                                   "SELECT id, continent, city FROM weather_locations"),
                              bind_arguments={"shard_id": "asia"})

    async def go():
        with pytest.raises(ValueError, match="not a conflict"):
            await shardlib.run_transaction(world.Session, bad_city, backoff=0)
        with pytest.raises(IntegrityError):
            await shardlib.run_transaction(world.Session, duplicate_id, backoff=0)

    world.run(go())
    assert calls == ["bad", "dup"]
    check_final_rows(world.loop, world.engines, [])  # both rolled back


def test_run_transaction_gives_up_after_max_attempts(fast_world) -> None:
    world = fast_world
    calls = []

    async def go():
        blocker = await _hold_lock_on(world.engines, "europe")
        try:
            async def fn(session):
                calls.append(1)
                session.add(WeatherLocation("Europe", "Paris"))
                await session.flush()

            with pytest.raises(ShardLockTimeout) as info:
                await shardlib.run_transaction(world.Session, fn, max_attempts=3, backoff=0.01)
            return info.value
        finally:
            await blocker.rollback()
            await blocker.close()

    error = world.run(asyncio.wait_for(go(), timeout=60))  # a hang fails, not a slow run
    assert len(calls) == 3
    assert error.shard == "europe" and "gave up after 3 attempts" in "".join(error.__notes__)
    check_final_rows(world.loop, world.engines, [])


def test_run_transaction_argument_errors(world) -> None:
    async def fn(session):
        return 1

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"max_attempts must be an int >= 1, got {bad!r}"):
            world.run(shardlib.run_transaction(world.Session, fn, max_attempts=bad))
    with pytest.raises(ValueError, match="backoff"):
        world.run(shardlib.run_transaction(world.Session, fn, backoff=-1))
    assert world.run(shardlib.run_transaction(world.Session, fn)) == 1


def test_is_retryable_reads_the_codes() -> None:
    from sqlalchemy.exc import OperationalError

    class FakePg(Exception):
        def __init__(self, sqlstate):
            self.sqlstate = sqlstate

    def wrapped(orig):
        return OperationalError("SELECT 1", {}, orig)

    for state in ("40001", "40P01", "55P03"):
        assert shardlib.is_retryable(wrapped(FakePg(state)))
    for state in ("23505", "42P01", None):
        assert not shardlib.is_retryable(wrapped(FakePg(state)))
    busy = sqlite3.OperationalError("database is locked")
    busy.sqlite_errorcode = 5
    snapshot = sqlite3.OperationalError("database is locked")
    snapshot.sqlite_errorcode = 517
    readonly = sqlite3.OperationalError("attempt to write a readonly database")
    readonly.sqlite_errorcode = 8
    assert shardlib.is_retryable(wrapped(busy)) and shardlib.is_retryable(wrapped(snapshot))
    assert not shardlib.is_retryable(wrapped(readonly))
    assert not shardlib.is_retryable(ValueError("database is locked"))  # only database errors


def test_a_stale_read_snapshot_is_a_named_conflict_and_run_transaction_recovers(tmp_path, loop) -> None:
    """SQLite configured to BEGIN at the first SELECT (repeatable reads): a session
    that read before another committed cannot upgrade to write (WAL never waits
    there). It gets ShardConflict naming the shard; run_transaction retries."""
    engines = shardlib.make_engines(data_dir=str(tmp_path / "shards"))
    if engines["asia"].dialect.name != "sqlite":
        loop.run_until_complete(shardlib.dispose(engines))
        pytest.skip("SQLite behaviour")
    loop.run_until_complete(shardlib.reset(engines))  # migrations say BEGIN IMMEDIATE themselves
    for engine in engines.values():
        @event.listens_for(engine.sync_engine, "connect")
        def _no_driver_transactions(dbapi_connection, record):
            dbapi_connection.isolation_level = None  # we say BEGIN ourselves

        @event.listens_for(engine.sync_engine, "begin")
        def _begin(conn):
            conn.exec_driver_sql("BEGIN")

    Session = shardlib.make_sessionmaker(engines)

    async def commit_elsewhere(city: str) -> None:
        async with Session() as other:
            other.add(WeatherLocation("Asia", city))
            await other.commit()

    calls = []

    async def read_then_write(session):
        calls.append(1)
        count = (await session.execute(select(func.count()).select_from(WeatherLocation)
                                       .where(WeatherLocation.continent == "Asia"))).scalar_one()
        if len(calls) == 1:
            await commit_elsewhere("Kyoto")  # our asia snapshot is now stale
        session.add(WeatherLocation("Asia", f"city after {count}"))
        await session.flush()

    async def go():
        async with Session() as session:
            await session.execute(select(WeatherLocation).where(WeatherLocation.continent == "Asia"))
            await commit_elsewhere("Nara")
            session.add(WeatherLocation("Asia", "Osaka"))
            with pytest.raises(ShardConflict) as info:
                await session.flush()
            await session.rollback()
        await shardlib.run_transaction(Session, read_then_write, backoff=0.01)
        return info.value

    try:
        conflict = loop.run_until_complete(go())
    finally:
        loop.run_until_complete(shardlib.dispose(engines))
    assert conflict.shard == "asia" and conflict.db_code == "SQLITE_BUSY_SNAPSHOT"
    assert "shard 'asia'" in str(conflict) and shardlib.is_retryable(conflict)
    assert len(calls) == 2
    check_final_rows(loop, engines, [("Asia", "Nara"), ("Asia", "Kyoto"), ("Asia", "city after 2")])


class _InjectedBusy(sqlite3.OperationalError):
    """Looks like SQLite's "database is locked" to is_retryable (a lost conflict)."""

    sqlite_errorcode = 5


def _fail_nth_commit(world, n: int) -> tuple[list[str], Any]:
    """Make the ``n``-th COMMIT (counted over asia and europe) fail once, retryably."""
    from sqlalchemy.exc import OperationalError

    order: list[str] = []

    def listener_for(shard):
        def on_commit(conn):
            order.append(shard)
            if len(order) == n:
                raise OperationalError("COMMIT", None, _InjectedBusy(f"injected busy at {shard}'s COMMIT"))
        return on_commit

    listeners = [(world.engines[s].sync_engine, listener_for(s)) for s in ("asia", "europe")]
    for engine, fn in listeners:
        event.listen(engine, "commit", fn)

    def remove():
        for engine, fn in listeners:
            event.remove(engine, "commit", fn)

    return order, remove


async def _tokyo_and_paris(calls, session):
    calls.append(1)
    session.add_all([WeatherLocation("Asia", "Tokyo"), WeatherLocation("Europe", "Paris")])
    await session.flush()


def test_run_transaction_does_not_retry_a_commit_that_reached_a_shard(world) -> None:
    """The second shard's COMMIT fails (retryably) after the first shard's COMMIT
    ran: retrying would write the first shard's rows twice. PartialCommitError
    names both shards; the first shard keeps its row, the second has none."""
    calls: list[int] = []
    order, remove = _fail_nth_commit(world, 2)
    try:
        with pytest.raises(shardlib.PartialCommitError) as info:
            world.run(shardlib.run_transaction(world.Session, lambda s: _tokyo_and_paris(calls, s), backoff=0))
    finally:
        remove()
    first, second = order[:2]
    assert calls == [1] and info.value.committed == [first] and info.value.failed == second
    assert "injected busy" in str(info.value.__cause__) and not shardlib.is_retryable(info.value)
    assert f"{first!r} had committed" in str(info.value)
    check_final_rows(world.loop, world.engines, [("Asia", "Tokyo") if first == "asia" else ("Europe", "Paris")])


def test_run_transaction_retries_a_commit_that_failed_on_its_first_shard(world) -> None:
    calls: list[int] = []
    order, remove = _fail_nth_commit(world, 1)
    try:
        world.run(shardlib.run_transaction(world.Session, lambda s: _tokyo_and_paris(calls, s), backoff=0))
    finally:
        remove()
    assert calls == [1, 1]
    check_final_rows(world.loop, world.engines, [("Asia", "Tokyo"), ("Europe", "Paris")])


# --------------------------------------------------------------------------- generated workloads

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

writer_plans = st.tuples(
    st.booleans(),  # read every shard first
    st.lists(st.sampled_from(shardlib.CONTINENTS), min_size=1, max_size=4),  # one flush per continent
    st.booleans(),  # change its own first row before committing
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans=st.lists(writer_plans, min_size=2, max_size=12))
def test_generated_concurrent_workloads_all_commit(world, plans) -> None:
    """Any mix of writers (reads first or not, 1-4 flushes on any continents in
    any order, an UPDATE of an own row) running at once: all commit, and the
    shards hold exactly what an unsharded database of the same rows holds."""

    async def run(n: int, read_first: bool, continents: list[str], rename: bool) -> list[tuple[str, str]]:
        rows = []
        async with world.Session() as session:
            if read_first:
                await session.execute(select(WeatherLocation))
            for k, continent in enumerate(continents):
                location = WeatherLocation(continent, f"g{n}.{k}")
                session.add(location)
                rows.append(location)
                await session.flush()
                await asyncio.sleep(0.001 * (n % 3))
            if rename:
                rows[0].city = rows[0].city.upper()
            await session.commit()
        return [(r.continent, r.city) for r in rows]

    async def go():
        await shardlib.reset(world.engines)
        return await asyncio.gather(*(run(n, *plan) for n, plan in enumerate(plans)), return_exceptions=True)

    results = world.run(go())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, errors[:2]
    check_final_rows(world.loop, world.engines, [row for r in results for row in r])
