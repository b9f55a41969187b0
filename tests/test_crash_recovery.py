"""Two-phase commit under real crashes: the commit log, roll-forward and recover().

Runs under ``make test-pg``; skipped on SQLite (no PREPARE TRANSACTION there).
The kill tests SIGKILL a coordinator process, or a shard's server (``kill -9``
of its postmaster and backends, then a restart with WAL crash recovery); they
need the servers of ``scripts/pg.sh`` and are skipped for servers elsewhere.
The full matrix (3 victims x 5 points x 2 sizes) is ``scripts/kill_matrix.py``.

Outcomes are observed on the servers themselves: rows per shard, the
``pg_prepared_xacts`` view and a ``LOCK TABLE ... NOWAIT`` that any lock
still held would refuse; never through shardlib's own account.
"""

from __future__ import annotations

import asyncio
import os
import threading
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select, text

import shardlib
from shardlib import WeatherLocation, crashlab, twophase

from .conftest import on_postgres

pytestmark = pytest.mark.skipif(not on_postgres(), reason="needs SHARDLIB_URLS pointing at PostgreSQL")


def _urls() -> dict[str, str]:
    return shardlib.parse_urls(os.environ["SHARDLIB_URLS"])


def _servers() -> crashlab.Servers:
    servers = crashlab.Servers.find(_urls())
    if servers is None:
        pytest.skip("the servers in SHARDLIB_URLS are not the ones scripts/pg.sh runs here")
    return servers


FOREIGN = "not-sqlalchemy-"
"""Prefix of the prepared transactions these tests make by hand (recover() leaves them alone)."""


async def _recover_all() -> None:
    engines = shardlib.make_engines(_urls())
    try:
        await shardlib.recover(engines, min_age=0)
        for engine in engines.values():
            async with engine.connect() as conn:
                await conn.execution_options(isolation_level="AUTOCOMMIT")
                for gid in (await conn.execute(text("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE :p"),
                                               {"p": FOREIGN + "%"})).scalars().all():
                    await conn.execute(text(f"ROLLBACK PREPARED '{gid}'"))
    finally:
        await shardlib.dispose(engines)


@pytest.fixture(autouse=True)
def _nothing_left_prepared() -> Iterator[None]:
    """A failing test must not leave prepared transactions for the next test's reset()."""
    asyncio.run(_recover_all())
    yield
    asyncio.run(_recover_all())


def _promised(point: str) -> str:
    decided = crashlab.KILL_POINTS.index(point) >= crashlab.KILL_POINTS.index(crashlab.COMMITTED_AFTER)
    return "committed on all" if decided else "rolled back on all"


def _tag() -> str:
    return "t" + uuid.uuid4().hex[:10]


# ------------------------------------------------------------- real kills

@pytest.mark.parametrize("point", crashlab.KILL_POINTS)
@pytest.mark.parametrize("shards", [["asia", "europe"], list(shardlib.SHARD_IDS)], ids=["2 shards", "4 shards"])
def test_coordinator_killed_at_each_point(world, point, shards) -> None:
    """SIGKILL the coordinator process: before the decision is logged the
    transaction rolls back everywhere, after it commits everywhere."""
    outcome = world.run(crashlab.crash_case(_urls(), None, point, shards, "coordinator", _tag()))
    assert outcome.outcome == _promised(point), outcome.row()
    assert outcome.prepared_left == 0 and outcome.locks_free, outcome.row()
    assert outcome.fresh_session_rows == sum(outcome.rows_per_shard.values())


@pytest.mark.parametrize("point", crashlab.KILL_POINTS)
def test_participant_server_killed_and_restarted_at_each_point(world, point) -> None:
    """SIGKILL the server the coordinator is about to touch, let the coordinator
    go on (it fails), restart the server: one outcome on both shards."""
    outcome = world.run(crashlab.crash_case(_urls(), _servers(), point, ["asia", "europe"], "participant", _tag()))
    assert outcome.atomic, outcome.row()
    assert outcome.coordinator_said.startswith("failed ShardUnavailable"), outcome.row()
    # a server that dies before its PREPARE loses the transaction; one that dies
    # after the decision is logged commits it when it comes back
    if point in ("before_prepare", "after_some_prepares"):
        assert outcome.outcome == "rolled back on all", outcome.row()
    if point in ("after_logged", "after_some_commits"):
        assert outcome.outcome == "committed on all", outcome.row()


@pytest.mark.parametrize("point, promised", [("after_all_prepares", "rolled back on all"),
                                             ("after_logged", "committed on all")])
def test_commit_log_server_killed(world, point, promised) -> None:
    """The log's server (the counter's shard) dies; it is no participant here.
    Not logged yet: the decision cannot be written, so everything rolls back.
    Logged: the decision survived the crash (fsync), so everything commits."""
    outcome = world.run(crashlab.crash_case(_urls(), _servers(), point, ["asia", "europe"],
                                            shardlib.COUNTER_SHARD, _tag()))
    assert outcome.outcome == promised and outcome.atomic, outcome.row()
    assert outcome.recover_actions == [], outcome.row()  # the coordinator finished every participant itself


# ------------------------------------------------------------- recover() on hand-made prepared transactions

async def _prepare(engine, xid: str, city: str, continent: str = "Asia") -> None:
    """A prepared transaction inserting one location, as a dead coordinator leaves it."""
    number = uuid.uuid4().int % 10**7 + 1  # unique (a duplicate key would wait for the other prepared one), and the id fits INTEGER
    async with engine.connect() as conn:
        await conn.execute(text("BEGIN"))
        await conn.execute(
            text("INSERT INTO weather_locations (id, continent, city) VALUES (:id, :c, :city)"),
            {"id": shardlib.make_id(number, shardlib.shard_for_continent(continent)), "c": continent, "city": city},
        )
        await conn.execute(text(f"PREPARE TRANSACTION '{xid}'"))


async def _log(engines, xid: str, shard: str, decision: str = twophase.COMMIT) -> None:
    async with engines[shardlib.COUNTER_SHARD].begin() as conn:
        await conn.run_sync(twophase._create_log_table)
        await conn.execute(twophase.commit_log.insert().values(xid=xid, shard=shard, global_id="test", decision=decision))


async def _state(engines, shard: str, city: str) -> tuple[int, list[str]]:
    async with engines[shard].connect() as conn:
        rows = (await conn.execute(select(func.count()).where(WeatherLocation.city == city))).scalar_one()
        prepared = (await conn.execute(text(
            "SELECT gid FROM pg_prepared_xacts WHERE database = current_database()"))).scalars().all()
    return rows, list(prepared)


def _xid() -> str:
    return f"_sa_{uuid.uuid4().hex}"


def test_recover_commits_logged_rolls_back_the_rest_and_skips_young_ones(world) -> None:
    e = world.engines
    logged, orphan, foreign = _xid(), _xid(), FOREIGN + uuid.uuid4().hex[:6]

    async def go():
        await _prepare(e["asia"], logged, "Logged")
        await _prepare(e["europe"], orphan, "Orphan", "Europe")
        await _prepare(e["asia"], foreign, "Foreign")
        await _log(e, logged, "asia")
        young = await shardlib.recover(e, min_age=3600)
        assert set(young["action"]) == {"skipped: younger than min_age=3600 s (may be running)",
                                        "left alone: not made by SQLAlchemy"}
        assert set((await _state(e, "asia", "Logged"))[1]) == {logged, foreign}  # nothing touched
        done = await shardlib.recover(e, min_age=0)
        actions = {r.xid: (r.decision, r.action) for r in done.itertuples()}
        assert actions[logged] == ("commit", "committed")
        assert actions[orphan] == ("none (presumed abort)", "rolled back")
        assert actions[foreign][1] == "left alone: not made by SQLAlchemy"
        assert await _state(e, "asia", "Logged") == (1, [foreign])
        assert await _state(e, "europe", "Orphan") == (0, [])
        again = await shardlib.recover(e, min_age=0)  # idempotent: only the foreign one is seen
        assert list(again["xid"]) == [foreign]
        async with e["asia"].connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            await conn.execute(text(f"ROLLBACK PREPARED '{foreign}'"))
        async with e[shardlib.COUNTER_SHARD].connect() as conn:  # the finished commit's row is tidied
            left = (await conn.execute(select(twophase.commit_log.c.xid, twophase.commit_log.c.decision))).all()
        assert (logged, "commit") not in left and (orphan, "abort") in left  # the abort row stays

    world.run(go())


def test_recover_runs_concurrently_with_itself(world) -> None:
    """Three recover() calls at once, each with its own engines: every prepared
    transaction is finished exactly once, and no call fails."""
    xids = {_xid(): ("asia", "Asia"), _xid(): ("europe", "Europe"), _xid(): ("south_america", "South America")}

    async def go():
        for n, (xid, (shard, continent)) in enumerate(xids.items()):
            await _prepare(world.engines[shard], xid, f"Concurrent{n}", continent)
            if n == 0:
                await _log(world.engines, xid, shard)
        sets = [shardlib.make_engines(_urls()) for _ in range(3)]
        try:
            results = await asyncio.gather(*(shardlib.recover(s, min_age=0) for s in sets))
        finally:
            for s in sets:
                await shardlib.dispose(s)
        finished = [r.xid for frame in results for r in frame.itertuples() if r.action in ("committed", "rolled back")]
        assert sorted(finished) == sorted(xids)
        for n, (xid, (shard, _)) in enumerate(xids.items()):
            assert await _state(world.engines, shard, f"Concurrent{n}") == (1 if n == 0 else 0, [])

    world.run(go())


def test_a_late_coordinator_cannot_commit_what_recover_rolled_back(world) -> None:
    """recover() runs while the coordinator sits between its PREPAREs and its
    decision (a long GC pause, a network stall): recover's abort row wins, the
    coordinator's decision is refused, and the transaction is nowhere."""
    Session = shardlib.make_sessionmaker(world.engines, twophase=True)
    urls = _urls()
    reports = []

    def recover_meanwhile(point, details):
        if point == "decide":
            def other_process():
                async def go():
                    engines = shardlib.make_engines(urls)
                    try:
                        reports.append(await shardlib.recover(engines, min_age=0))
                    finally:
                        await shardlib.dispose(engines)
                asyncio.run(go())
            thread = threading.Thread(target=other_process)
            thread.start()
            thread.join()

    async def go():
        with twophase.watch(recover_meanwhile):
            async with Session() as session:
                session.add_all([WeatherLocation("Asia", "Late"), WeatherLocation("Europe", "Late")])
                with pytest.raises(twophase.DecisionRefused, match="recover\\(\\) already decided to roll back"):
                    await session.commit()
        assert sorted(reports[0]["action"]) == ["rolled back", "rolled back"]
        for shard in ("asia", "europe"):
            assert await _state(world.engines, shard, "Late") == (0, [])

    world.run(go())


class InjectedFailure(Exception):
    pass


def test_a_failed_commit_prepared_rolls_forward_never_back(world) -> None:
    """The second phase fails on the second of three shards. SQLAlchemy leaves
    that one prepared and, leaving the session, would ROLLBACK PREPARED the
    third: committed on one shard, rolled back on another. shardlib sends the
    third COMMIT PREPARED instead (roll forward), and recover() commits the
    second."""
    Session = shardlib.make_sessionmaker(world.engines, twophase=True)
    shards = ["asia", "europe", "south_america"]
    order = []

    def note(point, details):
        if point == "commit":
            order.append(details["shard"])

    failed_once = []

    def fail_second_commit(conn, cursor, statement, *args):
        if statement.startswith("COMMIT PREPARED") and len(order) == 2 and not failed_once:
            failed_once.append(conn.engine)
            raise InjectedFailure("injected COMMIT PREPARED failure")

    engines = [world.engines[s].sync_engine for s in shards]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", fail_second_commit)

    async def go():
        with twophase.watch(note):
            async with Session() as session:
                session.add_all([WeatherLocation(c, "Forward") for c in ("Asia", "Europe", "South America")])
                with pytest.raises(InjectedFailure):
                    await session.commit()
        first, failed = order
        third = next(s for s in shards if s not in order)
        assert await _state(world.engines, first, "Forward") == (1, [])
        assert await _state(world.engines, third, "Forward") == (1, [])  # rolled forward
        rows, prepared = await _state(world.engines, failed, "Forward")
        assert rows == 0 and len(prepared) == 1  # in doubt, decided: left for recover()
        done = await shardlib.recover(world.engines, min_age=0)
        assert list(done["action"]) == ["committed"]
        assert await _state(world.engines, failed, "Forward") == (1, [])

    try:
        world.run(go())
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", fail_second_commit)


def test_a_commit_prepared_that_keeps_failing_is_left_for_recover(world) -> None:
    Session = shardlib.make_sessionmaker(world.engines, twophase=True)
    first = []

    def note(point, details):
        if point == "commit" and not first:
            first.append(details["shard"])

    def fail_on_second_shard(conn, cursor, statement, *args):
        if statement.startswith("COMMIT PREPARED") and first and conn.engine is not world.engines[first[0]].sync_engine:
            raise InjectedFailure("injected: this shard never answers COMMIT PREPARED")

    engines = [world.engines[s].sync_engine for s in ("asia", "europe")]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", fail_on_second_shard)

    async def go():
        with twophase.watch(note):
            async with Session() as session:
                session.add_all([WeatherLocation("Asia", "Stuck"), WeatherLocation("Europe", "Stuck")])
                with pytest.raises(InjectedFailure):
                    await session.commit()
        other = "europe" if first[0] == "asia" else "asia"
        assert await _state(world.engines, first[0], "Stuck") == (1, [])
        rows, prepared = await _state(world.engines, other, "Stuck")
        assert rows == 0 and len(prepared) == 1  # in doubt, but decided: never rolled back
        for engine in engines:
            event.remove(engine, "before_cursor_execute", fail_on_second_shard)
        done = await shardlib.recover(world.engines, min_age=0)
        assert list(done["action"]) == ["committed"] and list(done["decision"]) == ["commit"]
        assert await _state(world.engines, other, "Stuck") == (1, [])

    try:
        world.run(go())
    finally:
        for engine in engines:
            if event.contains(engine, "before_cursor_execute", fail_on_second_shard):
                event.remove(engine, "before_cursor_execute", fail_on_second_shard)


def test_a_successful_commit_leaves_no_log_rows_and_nothing_prepared(world) -> None:
    Session = shardlib.make_sessionmaker(world.engines, twophase=True)
    points, participants, logged_rows = [], {}, []

    def note(point, details):
        points.append(point)
        if point == "logged":
            participants.update(details["participants"])
            # the decision is committed in the log before the first COMMIT PREPARED (a new connection sees it)
            with world.engines[shardlib.COUNTER_SHARD].sync_engine.connect() as conn:
                logged_rows.extend(conn.execute(select(twophase.commit_log.c.shard, twophase.commit_log.c.decision)
                                                .where(twophase.commit_log.c.xid.in_(list(participants.values())))))

    async def go():
        with twophase.watch(note):
            async with Session() as session:
                session.add_all([WeatherLocation(c, "Fine") for c in shardlib.CONTINENTS])
                await session.commit()
        async with world.engines[shardlib.COUNTER_SHARD].connect() as conn:
            left = (await conn.execute(select(func.count()).where(
                twophase.commit_log.c.xid.in_(list(participants.values()))))).scalar_one()
        assert sorted(logged_rows) == sorted((s, "commit") for s in shardlib.SHARD_IDS)
        assert len(participants) == 4 and left == 0  # logged, then deleted
        for shard in shardlib.SHARD_IDS:
            assert await _state(world.engines, shard, "Fine") == (1, [])

    world.run(go())
    assert points == ["prepare"] * 4 + ["decide", "logged"] + ["commit"] * 4 + ["committed"]


def test_the_recovery_task_finishes_an_orphan_in_the_background(world) -> None:
    """recovery_task() is recover() every ``interval`` seconds until cancelled."""
    orphan = _xid()

    async def go():
        await _prepare(world.engines["europe"], orphan, "Background", "Europe")
        task = asyncio.create_task(shardlib.recovery_task(world.engines, interval=0.2, min_age=0))
        try:
            for _ in range(300):  # polls until done (a guard, not a timing claim: usually the first round)
                if not (await _state(world.engines, "europe", "Background"))[1]:
                    break
                await asyncio.sleep(0.1)
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert await _state(world.engines, "europe", "Background") == (0, [])

    world.run(go())


KINDS = ("logged commit", "logged abort", "no decision", "not SQLAlchemy's")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(st.tuples(st.sampled_from(shardlib.SHARD_IDS), st.sampled_from(KINDS)), min_size=1, max_size=6),
       old_enough=st.booleans())
def test_recover_against_a_model(world, cases, old_enough) -> None:
    """Any mix of prepared transactions: recover() commits exactly the logged
    commits, rolls back exactly the other SQLAlchemy ones, and only when they
    are older than min_age; a second run finds nothing of its own left."""
    async def go():
        made = []
        for n, (shard, kind) in enumerate(cases):
            xid = FOREIGN + uuid.uuid4().hex[:8] if kind == "not SQLAlchemy's" else _xid()
            city = f"Model{n}-{uuid.uuid4().hex[:6]}"
            continent = next(c for c, s in shardlib.SHARD_FOR_CONTINENT.items() if s == shard)
            await _prepare(world.engines[shard], xid, city, continent)
            if kind in ("logged commit", "logged abort"):
                await _log(world.engines, xid, shard, twophase.COMMIT if kind == "logged commit" else twophase.ABORT)
            made.append((shard, kind, xid, city))
        await shardlib.recover(world.engines, min_age=0 if old_enough else 3600)
        for shard, kind, xid, city in made:
            rows, prepared = await _state(world.engines, shard, city)
            still = xid in prepared
            if kind == "not SQLAlchemy's" or not old_enough:
                assert (rows, still) == (0, True), (kind, old_enough)
            elif kind == "logged commit":
                assert (rows, still) == (1, False), kind
            else:
                assert (rows, still) == (0, False), kind
        again = await shardlib.recover(world.engines, min_age=0)
        left = {r.xid for r in again.itertuples() if r.action in ("committed", "rolled back")}
        assert left == ({x for _, k, x, _ in made if k != "not SQLAlchemy's"} if not old_enough else set())

    try:
        world.run(go())
    finally:
        asyncio.run(_recover_all())


def test_without_the_log_sqlalchemy_alone_rolls_back_after_a_phase_2_failure(world) -> None:
    """commit_log_engine=False: SQLAlchemy's own two-phase commit, for comparison.
    The same phase-2 failure as above ends half-committed: the shards not yet
    committed get ROLLBACK PREPARED when the session is left."""
    Session = shardlib.make_sessionmaker(world.engines, twophase=True, commit_log_engine=False)
    shards = ["asia", "europe", "south_america"]
    sent = []

    def fail_later_commits(conn, cursor, statement, *args):
        if statement.startswith("COMMIT PREPARED"):
            sent.append(statement)
            if len(sent) > 1:
                raise InjectedFailure("injected COMMIT PREPARED failure")

    engines = [world.engines[s].sync_engine for s in shards]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", fail_later_commits)

    async def go():
        async with Session() as session:
            session.add_all([WeatherLocation(c, "Alone") for c in ("Asia", "Europe", "South America")])
            with pytest.raises(InjectedFailure):
                await session.commit()
        states = [await _state(world.engines, s, "Alone") for s in shards]
        assert sorted(rows for rows, _ in states) == [0, 0, 1]  # one committed ...
        assert sum(len(prepared) for _, prepared in states) == 1  # ... one in doubt, one rolled back

    try:
        world.run(go())
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", fail_later_commits)
