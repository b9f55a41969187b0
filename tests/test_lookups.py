"""Lookup tables (global secondary indexes): routing through them, unique stations,
every write path keeping them current, the consistent-lookup ordering, verify/repair.

Every query is compared with one unsharded database holding the same rows
(:class:`tests.conftest.Unsharded`), and which shards ran SQL is read from
engine events (``shardlib.trace``), never from shardlib's own account. What the
lookup tables hold is read with plain SQL on the counter shard's engine.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import and_, delete, event, insert, not_, or_, select, text, update

import shardlib
from shardlib import COUNTER_SHARD, SHARD_IDS, Report, WeatherLocation as WL, shard_for_continent, trace
from shardlib.lookups import DuplicateLookupValue

from .conftest import FIXED_TIME, Unsharded, on_postgres, standalone_world

CONTINENTS = ["North America", "Asia", "Europe", "South America"]
CITIES = ["London", "Quito", "Tokyo", "Perth", "Lima", "Victoria"]
STATIONS = ["EGLL", "SEQM", "RJTT", "YPPH", "SPJC", "CYYJ", "KJFK", "LFPG"]


# ------------------------------------------------------------------ independent readers


def lookup_rows(world: Any) -> dict[str, set[tuple[str, int]]]:
    """What the lookup tables hold, read with plain SQL on the counter shard's engine."""

    async def go() -> dict[str, set[tuple[str, int]]]:
        async with world.engines[COUNTER_SHARD].connect() as conn:
            return {name: {tuple(r) for r in await conn.execute(text(f"SELECT value, location_id FROM {name}_lookup"))}
                    for name in ("city", "station")}

    return world.run(go())


def stored_rows(world: Any) -> dict[str, set[tuple[str, int]]]:
    """(value, id) pairs the shards hold, read with plain SQL on each shard's engine."""

    async def go() -> dict[str, set[tuple[str, int]]]:
        found: dict[str, set[tuple[str, int]]] = {"city": set(), "station": set()}
        for engine in world.engines.values():
            async with engine.connect() as conn:
                for i, city, station in await conn.execute(text("SELECT id, city, station FROM weather_locations")):
                    found["city"].add((city, i))
                    if station is not None:
                        found["station"].add((station, i))
        return found

    return world.run(go())


def assert_lookups_exact(world: Any) -> None:
    assert lookup_rows(world) == stored_rows(world)


def main_statement_shards(t: Any) -> list[list[str]]:
    """Shards that ran each statement other than a lookup query (from the trace)."""
    return [g["shards"] for g in t.statements() if "_lookup" not in g["sql"]]


# ------------------------------------------------------------------ routing oracle (hypothesis)

rows_strategy = st.lists(
    st.tuples(st.sampled_from(CONTINENTS), st.sampled_from(CITIES), st.none() | st.sampled_from(STATIONS)),
    max_size=14,
).map(lambda rows: [(c, city, s) for i, (c, city, s) in enumerate(rows)
                    if s is None or s not in {x[2] for x in rows[:i]}])  # stations unique

city_values = st.sampled_from(CITIES + ["Atlantis"])
station_values = st.sampled_from(STATIONS + ["ZZZZ"])


def _leaf() -> Any:
    return st.one_of(
        st.tuples(st.sampled_from(["eq", "ne"]), st.just("city"), city_values),
        st.tuples(st.sampled_from(["eq", "ne"]), st.just("station"), station_values),
        st.tuples(st.sampled_from(["in", "notin"]), st.just("city"),
                  st.lists(city_values, max_size=3).map(lambda v: tuple(sorted(set(v))))),
        st.tuples(st.just("in"), st.just("station"),
                  st.lists(station_values, max_size=3).map(lambda v: tuple(sorted(set(v))))),
        st.tuples(st.just("eq"), st.just("continent"), st.sampled_from(CONTINENTS)),
    )


clauses = st.recursive(
    _leaf(),
    lambda inner: st.one_of(
        st.tuples(st.sampled_from(["and", "or"]), st.lists(inner, min_size=2, max_size=3).map(tuple)),
        st.tuples(st.just("not"), inner),
    ),
    max_leaves=4,
)


def to_sql(node: Any, table: Any = WL) -> Any:
    kind = node[0]
    if kind in ("and", "or"):
        parts = [to_sql(n, table) for n in node[1]]
        return and_(*parts) if kind == "and" else or_(*parts)
    if kind == "not":
        return not_(to_sql(node[1], table))
    column = getattr(table, node[1])
    return {"eq": lambda: column == node[2], "ne": lambda: column != node[2],
            "in": lambda: column.in_(node[2]), "notin": lambda: column.not_in(node[2])}[kind]()


def load(world: Any, rows: list[tuple[str, str, str | None]]) -> list[tuple[int, str, str, str | None]]:
    async def go() -> list[tuple[int, str, str, str | None]]:
        async with world.Session() as session:
            locations = [WL(c, city, s) for c, city, s in rows]
            for i, location in enumerate(locations):
                location.reports.append(shardlib.Report(float(i), FIXED_TIME))
            session.add_all(locations)
            await session.commit()
            return [(x.id, x.continent, x.city, x.station) for x in locations]

    return world.run(go())


@pytest.fixture(scope="module")
def module_world():
    with standalone_world() as world:
        yield world


@pytest.fixture
def world(world):  # every test here starts with the lookups built (and so routing through them)
    world.run(shardlib.lookups.enable(world.engines))
    return world


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(rows=rows_strategy, clause=clauses, through_reports=st.booleans())
def test_lookup_routed_queries_equal_the_unsharded_answer_and_visit_only_needed_shards(
        module_world: Any, rows: Any, clause: Any, through_reports: bool) -> None:
    world = module_world
    world.run(shardlib.reset(world.engines))
    world.run(shardlib.lookups.enable(world.engines))
    stored = load(world, rows)
    oracle = Unsharded(world.loop)
    try:
        if stored:
            oracle.insert(WL, [dict(id=i, continent=c, city=city, station=s) for i, c, city, s in stored])
            oracle.insert(Report, [dict(location_id=i, temperature=float(n), report_time=FIXED_TIME)
                                   for n, (i, *_) in enumerate(stored)])
        if through_reports:
            statement = (select(Report.location_id, Report.temperature).join(Report.location)
                         .where(to_sql(clause)))
        else:
            statement = select(WL.id, WL.continent, WL.city, WL.station).where(to_sql(clause))
        expected = sorted(oracle.rows(statement))

        async def go() -> list[Any]:
            async with world.Session() as session:
                return list((await session.execute(statement)).all())

        with trace(world.engines) as t:
            got = sorted(world.run(go()))
        assert got == expected
        # the shards that ran the statement: never fewer than those holding a matching row
        matching_ids = {r[0] for r in expected}
        holding = {shard_for_continent(c) for i, c, *_ in stored if i in matching_ids}
        ran = main_statement_shards(t)
        visited = set(ran[0]) if ran else set()
        assert holding <= visited
        if clause[0] in ("eq", "in") and clause[1] in ("city", "station"):
            # a positive lookup predicate: exactly the shards whose rows hold the value, none if nobody does
            values = {clause[2]} if clause[0] == "eq" else set(clause[2])
            column = 2 if clause[1] == "city" else 3
            wanted = {shard_for_continent(c) for i, c, *v in stored if (i, c, *v)[column] in values}
            assert visited == wanted, (clause, visited, wanted)
            assert (ran == []) == (not wanted)  # nobody stores it: no shard at all, only the lookup query
    finally:
        oracle.close()


def test_city_filter_asks_the_lookup_then_one_shard_and_nowhere_for_an_unknown_city(world) -> None:
    load(world, [("South America", "Quito", "SEQM"), ("Europe", "London", "EGLL"),
                 ("North America", "London", None), ("Asia", "Tokyo", "RJTT")])

    async def go(statement: Any) -> list[Any]:
        async with world.Session() as session:
            return list((await session.scalars(statement)).all())

    with trace(world.engines) as t:
        quito = world.run(go(select(WL).where(WL.city == "Quito")))
    assert [x.city for x in quito] == ["Quito"]
    assert [g["shards"] for g in t.statements()] == [[COUNTER_SHARD], ["south_america"]]
    assert "city_lookup" in t.statements()[0]["sql"]

    with trace(world.engines) as t:
        london = world.run(go(select(WL).where(WL.city.in_(["London"])).order_by(WL.id)))
    assert [x.continent for x in london] == ["Europe", "North America"]
    assert main_statement_shards(t) == [["north_america", "europe"]]

    with trace(world.engines) as t:
        assert world.run(go(select(WL).where(WL.city == "Atlantis"))) == []
    assert len(t.statements()) == 1 and "city_lookup" in t.statements()[0]["sql"]  # no shard ran the SELECT

    # with the continent named too (one shard by routing alone), the lookup still has the last word:
    for continent, city in (("Asia", "Atlantis"), ("Europe", "Tokyo")):  # nobody / only asia holds it
        for _ in range(2):  # the second run is a routing-cache hit
            with trace(world.engines) as t:
                assert world.run(go(select(WL).where(WL.continent == continent, WL.city == city))) == []
            assert len(t.statements()) == 1 and "city_lookup" in t.statements()[0]["sql"], t.statements()

    with trace(world.engines) as t:
        egll = world.run(go(select(WL).where(WL.station == "EGLL")))
    assert [x.city for x in egll] == ["London"] and main_statement_shards(t) == [["europe"]]

    with trace(world.engines) as t:  # through a join from Report
        world.run(go(select(Report).join(Report.location).where(WL.city == "Tokyo")))
    assert main_statement_shards(t) == [["asia"]]


# ------------------------------------------------------------------ unique stations


def test_a_duplicate_station_is_refused_naming_it_and_nothing_is_written(world) -> None:
    load(world, [("Europe", "London", "EGLL")])
    before = (stored_rows(world), lookup_rows(world))

    async def go(*locations: WL) -> None:
        async with world.Session() as session:
            session.add_all(locations)
            await session.commit()

    with pytest.raises(DuplicateLookupValue, match=r"station 'EGLL' is already used by location \d+ on shard 'europe'"):
        world.run(go(WL("Asia", "Elsewhere"), WL("North America", "Heathrow too", "EGLL")))
    assert (stored_rows(world), lookup_rows(world)) == before
    with pytest.raises(DuplicateLookupValue, match="'KJFK' is given to two locations in one write"):
        world.run(go(WL("Asia", "A", "KJFK"), WL("Europe", "B", "KJFK")))
    assert (stored_rows(world), lookup_rows(world)) == before


def test_two_concurrent_sessions_race_for_one_station_exactly_one_wins(world) -> None:
    async def claim(continent: str, city: str, started: asyncio.Event, go_on: asyncio.Event) -> str:
        try:
            async with world.Session() as session:
                session.add(WL(continent, city, "RJTT"))
                started.set()
                await go_on.wait()
                await session.commit()
                return "won"
        except DuplicateLookupValue as error:
            assert "'RJTT' is already used" in str(error)
            return "lost"

    async def race() -> list[str]:
        go_on = asyncio.Event()
        a, b = asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(claim("Asia", "Tokyo", a, go_on)),
                 asyncio.create_task(claim("Europe", "Not Tokyo", b, go_on))]
        await a.wait()
        await b.wait()
        go_on.set()
        return await asyncio.gather(*tasks)

    outcomes = world.run(race())
    assert sorted(outcomes) == ["lost", "won"]
    stations = [s for s, _ in stored_rows(world)["station"]]
    assert stations == ["RJTT"]
    assert_lookups_exact(world)


def test_a_stale_unique_entry_is_taken_over_and_a_stale_city_entry_costs_only_a_visit(world) -> None:
    [(london_id, *_)] = load(world, [("Europe", "London", "EGLL")])

    async def plant() -> None:  # a writer that crashed after its lookup commit, before its row commit
        async with world.engines[COUNTER_SHARD].begin() as conn:
            ghost = shardlib.make_id(9_999, "asia")
            await conn.execute(text("INSERT INTO station_lookup (value, location_id) VALUES ('RJTT', :i)"), {"i": ghost})
            await conn.execute(text("INSERT INTO city_lookup (value, location_id) VALUES ('London', :i)"), {"i": ghost})

    world.run(plant())
    frame = world.run(shardlib.lookups.verify(world.engines))
    assert sorted(frame["problem"]) == ["stale", "stale"] and set(frame["shard"]) == {"asia"}

    async def query() -> list[Any]:
        async with world.Session() as session:
            return list((await session.execute(select(WL.id).where(WL.city == "London"))).scalars())

    with trace(world.engines) as t:
        assert world.run(query()) == [london_id]  # still the right answer ...
    assert main_statement_shards(t) == [["asia", "europe"]]  # ... with one wasted visit

    async def take_over() -> int:
        async with world.Session() as session:
            tokyo = WL("Asia", "Tokyo", "RJTT")
            session.add(tokyo)
            await session.commit()
            return tokyo.id

    tokyo_id = world.run(take_over())
    assert ("RJTT", tokyo_id) in lookup_rows(world)["station"]
    repaired = world.run(shardlib.lookups.repair(world.engines))
    assert list(repaired["problem"]) == ["stale"] and list(repaired["repaired"]) == [True]
    assert_lookups_exact(world)
    assert len(world.run(shardlib.lookups.verify(world.engines))) == 0


def test_repair_adds_missing_entries_and_reports_duplicates_it_cannot_decide(world) -> None:
    stored = load(world, [("Europe", "London", "EGLL"), ("Asia", "Tokyo", None)])

    async def break_it() -> None:
        async with world.engines[COUNTER_SHARD].begin() as conn:
            await conn.execute(text("DELETE FROM city_lookup WHERE value = 'Tokyo'"))
        async with world.engines["asia"].begin() as conn:  # behind shardlib's back: a second EGLL
            await conn.execute(text("UPDATE weather_locations SET station = 'EGLL' WHERE city = 'Tokyo'"))

    world.run(break_it())
    frame = world.run(shardlib.lookups.verify(world.engines))
    tokyo_id = stored[1][0]
    assert ("city", "Tokyo", tokyo_id, "asia", "missing") in set(frame.itertuples(index=False, name=None))
    assert sorted(frame[frame["problem"] == "duplicate"]["location_id"]) == sorted([stored[0][0], tokyo_id])

    async def query() -> list[Any]:
        async with world.Session() as session:
            return list((await session.execute(select(WL.id).where(WL.city == "Tokyo"))).scalars())

    assert world.run(query()) == []  # what a missing entry does: the row is hidden
    repaired = world.run(shardlib.lookups.repair(world.engines))
    assert not repaired[repaired["problem"] == "duplicate"]["repaired"].any()
    assert world.run(query()) == [tokyo_id]
    after = world.run(shardlib.lookups.verify(world.engines))
    assert set(after["value"]) == {"EGLL"}  # only the duplicate (and its missing entry) is left to decide


# ------------------------------------------------------------------ every write path keeps them current


def _orm(world: Any, fn: Any) -> Any:
    async def go() -> Any:
        async with world.Session() as session:
            result = await fn(session)
            await session.commit()
            return result

    return world.run(go())


async def _one(session: Any, city: str) -> WL:
    return (await session.execute(select(WL).where(WL.city == city))).scalar_one()


WRITE_PATHS = {
    "orm add": lambda s: _add(s),
    "orm change city and station": lambda s: _change(s),
    "orm delete": lambda s: _delete(s),
    "move_location": lambda s: _move(s),
    "core insert": lambda s: s.execute(insert(WL).values(continent="Europe", city="Paris", station="LFPG")),
    "core insert executemany": lambda s: s.execute(insert(WL), [dict(continent="Asia", city="Perth", station="YPPH"),
                                                                 dict(continent="Europe", city="Lima")]),
    "core update": lambda s: s.execute(update(WL).where(WL.city == "Quito").values(city="Lima", station="SPJC")),
    "core update pinned": lambda s: s.execute(update(WL).where(WL.city == "London").values(station="EGLC"),
                                              bind_arguments={"shard_id": "europe"}),
    "core delete": lambda s: _core_delete(s),
}


async def _core_delete(session: Any) -> None:
    asian = select(WL.id).where(WL.continent == "Asia").scalar_subquery()
    await session.execute(delete(Report).where(Report.location_id.in_(asian)))
    await session.execute(delete(WL).where(WL.continent == "Asia"))


async def _add(session: Any) -> None:
    session.add_all([WL("Asia", "Quito", "VQPR"), WL("North America", "Victoria", "CYYJ")])


async def _change(session: Any) -> None:
    quito = await _one(session, "Quito")
    quito.city, quito.station = "Lima", "SPJC"
    tokyo = await _one(session, "Tokyo")
    tokyo.station = None


async def _delete(session: Any) -> None:
    await session.delete(await _one(session, "Tokyo"))


async def _move(session: Any) -> None:
    await shardlib.move_location(session, await _one(session, "Quito"), "Asia")


@pytest.mark.parametrize("path", sorted(WRITE_PATHS))
def test_every_write_path_keeps_the_lookups_exact_and_queries_right(world, path: str) -> None:
    load(world, [("South America", "Quito", "SEQM"), ("Europe", "London", "EGLL"), ("Asia", "Tokyo", "RJTT"),
                 ("North America", "London", None)])
    _orm(world, WRITE_PATHS[path])
    assert_lookups_exact(world)
    truth = stored_rows(world)

    async def by_city(city: str) -> set[tuple[str, int]]:
        async with world.Session() as session:
            return {(city, i) for i in (await session.execute(select(WL.id).where(WL.city == city))).scalars()}

    for city in {c for c, _ in truth["city"]} | {"Quito", "Lima"}:
        assert world.run(by_city(city)) == {p for p in truth["city"] if p[0] == city}


def test_bulk_insert_writes_entries_first_and_refuses_a_station_in_use(world) -> None:
    load(world, [("Europe", "London", "EGLL")])
    rows = [{"continent": c, "city": city, "station": s} for c, city, s in
            [("Asia", "Tokyo", "RJTT"), ("Europe", "London", None), ("South America", "Quito", "SEQM")]]
    assert world.run(shardlib.bulk_insert(world.engines, WL, rows)) == 3
    assert_lookups_exact(world)
    before = stored_rows(world)
    with pytest.raises(DuplicateLookupValue, match="'EGLL' is already used"):
        world.run(shardlib.bulk_insert(world.engines, WL, [{"continent": "Asia", "city": "X", "station": "RJAA"},
                                                            {"continent": "Asia", "city": "Y", "station": "EGLL"}]))
    assert stored_rows(world) == before and lookup_rows(world) == before  # nothing written anywhere


# ------------------------------------------------------------------ the ordering: never missing


@pytest.mark.parametrize("counter_shard_written_first", [False, True])
def test_an_entry_is_committed_before_its_row_and_removed_only_after_the_rows_delete(
        world, counter_shard_written_first: bool) -> None:
    """At the instant each shard commits, an outside reader must already see the lookup entry
    of every row that commit makes visible (and still see it for a row it deletes). Both ways
    an entry is written: a short transaction of its own, or (SQLite, when the session already
    holds the counter shard's write lock) the session's own connection, committed first."""
    seen: list[tuple[str, bool]] = []
    watched: dict[str, Any] = {}

    def outside_sees(location_id: int) -> bool:  # runs inside the COMMIT event: a connection of its own
        with world.engines[COUNTER_SHARD].sync_engine.connect() as conn:
            return conn.execute(text("SELECT 1 FROM city_lookup WHERE location_id = :i"),
                                {"i": location_id}).first() is not None

    def on_commit(conn: Any) -> None:
        shard = next(s for s, e in world.engines.items() if e.sync_engine is conn.engine)
        if "id" in watched and shard != COUNTER_SHARD:
            seen.append((shard, outside_sees(watched["id"])))

    for engine in world.engines.values():
        event.listen(engine.sync_engine, "commit", on_commit)
    try:
        for continent in CONTINENTS[1:] * 3:  # commits of several shards, in whatever order the session picks
            seen.clear()

            async def add(session: Any, continent: str = continent) -> None:
                await session.execute(select(WL).where(WL.city == "warm-up"))  # the session reads the lookup first
                if counter_shard_written_first:
                    session.add(WL("North America", "Toronto"))
                    await session.flush()
                location = WL(continent, "Quito")
                session.add(location)
                session.add(WL("North America", "Toronto"))
                await session.flush()
                watched["id"] = location.id

            _orm(world, add)
            assert (shard_for_continent(continent), True) in seen, seen
            assert all(visible for _, visible in seen), seen

            async def remove(session: Any) -> None:
                await session.delete(await session.get(WL, watched["id"]))
                session.add(WL("North America", "Toronto"))

            seen.clear()
            _orm(world, remove)
            assert all(visible for _, visible in seen), seen  # still there while the delete commits ...
            assert all(i != watched["id"] for _, i in lookup_rows(world)["city"])  # ... and gone once it has
            watched.clear()
    finally:
        for engine in world.engines.values():
            event.remove(engine.sync_engine, "commit", on_commit)
    assert_lookups_exact(world)


def test_a_session_finds_its_own_uncommitted_rows_through_the_lookup(world) -> None:
    """Entries written on the session's own connection (it holds the counter shard's write lock,
    or runs two-phase) are not committed yet: the session's own queries must still see them."""

    async def go() -> tuple[list[str], list[str]]:
        async with world.Session() as session:
            session.add(WL("North America", "Toronto"))  # the session writes the counter shard first
            await session.flush()
            session.add_all([WL("Asia", "Lima", "SPJC"), WL("Europe", "Lima")])
            await session.flush()
            by_city = (await session.scalars(select(WL.continent).where(WL.city == "Lima").order_by(WL.continent))).all()
            by_station = (await session.scalars(select(WL.city).where(WL.station == "SPJC"))).all()
            await session.rollback()
            return list(by_city), list(by_station)

    assert world.run(go()) == (["Asia", "Europe"], ["Lima"])
    # rolled back: no row is left, and entries committed ahead of their rows in a transaction of
    # their own are stale (a wasted visit, never a missing row). On SQLite the entries written
    # inside the session's own transaction (after it wrote the counter shard) are gone with it.
    assert stored_rows(world) == {"city": set(), "station": set()}
    assert set(world.run(shardlib.lookups.verify(world.engines))["problem"]) <= {"stale"}
    if not on_postgres():
        assert lookup_rows(world)["station"] == set() and {v for v, _ in lookup_rows(world)["city"]} == {"Toronto"}


def test_without_lookup_routing_filters_scatter_but_the_lookups_are_still_kept(world) -> None:
    load(world, [("South America", "Quito", "SEQM")])
    plain = shardlib.make_sessionmaker(world.engines, lookup_routing=False)

    async def go() -> list[Any]:
        async with plain() as session:
            return list((await session.scalars(select(WL.city).where(WL.city == "Quito"))).all())

    with trace(world.engines) as t:
        assert world.run(go()) == ["Quito"]
    assert [g["shards"] for g in t.statements()] == [list(SHARD_IDS)]  # no lookup query, every shard
    assert_lookups_exact(world)


def test_with_two_phase_commit_the_entries_are_part_of_the_same_atomic_commit(world) -> None:
    """PostgreSQL, twophase=True: the lookup writes go through the session's own connection to
    the counter shard, which PREPAREs with the row's shard (seen through engine events); until
    COMMIT PREPARED nobody outside sees the entry, and a delete removes it in the same commit."""
    if not on_postgres():
        pytest.skip("two-phase commit needs PostgreSQL (SQLite has no PREPARE TRANSACTION)")
    TwoPhase = shardlib.make_sessionmaker(world.engines, twophase=True)
    prepared: list[str] = []
    listeners = []
    for shard, engine in world.engines.items():
        def on_prepare(conn: Any, xid: Any, shard: str = shard) -> None:
            prepared.append(shard)
        event.listen(engine.sync_engine, "prepare_twophase", on_prepare)
        listeners.append((engine.sync_engine, on_prepare))

    async def add() -> tuple[int, set[tuple[str, int]]]:
        async with TwoPhase() as session:
            tokyo = WL("Asia", "Tokyo", "RJTT")
            session.add(tokyo)
            await session.flush()
            async with world.engines[COUNTER_SHARD].connect() as outside:
                seen = {tuple(r) for r in await outside.execute(text("SELECT value, location_id FROM station_lookup"))}
            await session.commit()
            return tokyo.id, seen

    try:
        tokyo_id, seen_before_commit = world.run(add())
        assert seen_before_commit == set()
        assert sorted(prepared) == sorted([COUNTER_SHARD, "asia"])
        assert lookup_rows(world)["station"] == {("RJTT", tokyo_id)}

        async def remove() -> None:
            async with TwoPhase() as session:
                await session.delete(await session.get(WL, tokyo_id))
                await session.commit()

        prepared.clear()
        world.run(remove())
        assert sorted(prepared) == sorted([COUNTER_SHARD, "asia"])
        assert_lookups_exact(world)
    finally:
        for engine, fn in listeners:
            event.remove(engine, "prepare_twophase", fn)


def test_two_phase_sessions_racing_for_one_station_let_exactly_one_win(world) -> None:
    if not on_postgres():
        pytest.skip("two-phase commit needs PostgreSQL")
    TwoPhase = shardlib.make_sessionmaker(world.engines, twophase=True)

    async def claim(continent: str, go_on: asyncio.Event, ready: asyncio.Event) -> str:
        try:
            async with TwoPhase() as session:
                session.add(WL(continent, "Somewhere", "EGLL"))
                ready.set()
                await go_on.wait()
                await session.commit()
                return "won"
        except DuplicateLookupValue:
            return "lost"

    async def race() -> list[str]:
        go_on, a, b = asyncio.Event(), asyncio.Event(), asyncio.Event()
        tasks = [asyncio.create_task(claim("Europe", go_on, a)), asyncio.create_task(claim("Asia", go_on, b))]
        await a.wait()
        await b.wait()
        go_on.set()
        return await asyncio.gather(*tasks)

    assert sorted(world.run(race())) == ["lost", "won"]
    assert [v for v, _ in stored_rows(world)["station"]] == ["EGLL"]
    assert_lookups_exact(world)


def test_before_enable_nothing_changes_and_a_station_is_refused_then_enable_fills_the_lookups(loop, tmp_path) -> None:
    from .conftest import World

    world = World(loop, str(tmp_path / "shards"))  # fresh shards: reset() leaves the lookups unbuilt
    try:
        async def write_and_read() -> list[Any]:
            async with world.Session() as session:
                session.add_all([WL("Europe", "London"), WL("North America", "London")])
                await session.commit()
                return list((await session.scalars(select(WL.continent).where(WL.city == "London"))).all())

        with trace(world.engines) as t:
            assert sorted(world.run(write_and_read())) == ["Europe", "North America"]
        assert not [r for r in t.records if "_lookup" in r["sql"]]  # no lookup SQL at all
        assert main_statement_shards(t)[-1] == list(SHARD_IDS)  # the filter scatters

        async def station() -> None:
            async with world.Session() as session:
                session.add(WL("Asia", "Tokyo", "RJTT"))
                await session.commit()

        before = stored_rows(world)
        with trace(world.engines) as t, pytest.raises(shardlib.lookups.LookupsNotEnabled, match="'RJTT'.*enable"):
            world.run(station())
        assert t.records == [] and stored_rows(world) == before
        with pytest.raises(shardlib.lookups.LookupsNotEnabled):
            world.run(shardlib.bulk_insert(world.engines, WL, [{"continent": "Asia", "city": "X", "station": "RJAA"}]))
        assert stored_rows(world) == before

        filled = world.run(shardlib.lookups.enable(world.engines))
        assert sorted(filled["problem"]) == ["missing", "missing"] and filled["repaired"].all()
        assert_lookups_exact(world)
        with trace(world.engines) as t:
            assert sorted(world.run(write_and_read())) == ["Europe", "Europe", "North America", "North America"]
        assert main_statement_shards(t)[-1] == ["north_america", "europe"]
        world.run(station())
        assert_lookups_exact(world)
    finally:
        world.close()


def test_a_city_changed_and_changed_back_in_one_transaction_keeps_its_entry(world) -> None:
    """Quito -> Lima -> Quito before one commit: the entry for Quito is queued for removal by the
    first change and must survive it (the row holds Quito again when the removal runs)."""
    [(quito_id, *_)] = load(world, [("South America", "Quito", None)])

    async def there_and_back(session: Any) -> None:
        quito = await session.get(WL, quito_id)
        quito.city = "Lima"
        await session.flush()
        quito.city = "Quito"
        await session.flush()

    _orm(world, there_and_back)
    assert_lookups_exact(world)


def test_a_claim_waits_for_the_writer_holding_the_value_and_then_refuses(world) -> None:
    """A has flushed EGLL (its entry committed, its row not yet): B's claim must not take the
    entry over as stale, but wait for A to finish (SQLite: the write ticket; PostgreSQL: the
    advisory lock A holds on its row's shard) and then refuse."""

    async def go() -> str:
        async with world.Session() as a:
            a.add(WL("Europe", "A", "EGLL"))
            await a.flush()
            async with world.Session() as b:
                b.add(WL("Asia", "B", "EGLL"))
                pending = asyncio.create_task(b.commit())
                await asyncio.sleep(0.3)  # let B reach its claim (it must wait there for A)
                await a.commit()
                try:
                    await pending
                    return "B won"
                except DuplicateLookupValue:
                    return "B refused"

    assert world.run(go()) == "B refused"
    assert sorted(stored_rows(world)["station"]) == [("EGLL", i) for _, i in lookup_rows(world)["station"]]
    assert len(stored_rows(world)["station"]) == 1
