"""gather(): scatter-gather must return exactly what one unsharded database returns."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import desc, distinct, func, select

import shardlib
from shardlib import Report, WeatherLocation as WL, gather, trace

from .conftest import loaded_world, on_postgres

CITIES = ["Victoria", "Santiago", "Cordoba", "London", "Tokyo", "Lima", "Perth"]


def _data() -> list[tuple[str, str, list[float]]]:
    rows = []
    for i, continent in enumerate(shardlib.CONTINENTS):
        for j, city in enumerate(CITIES):
            if (i + j) % 4 == 0:
                continue
            temps = [float((i * 7 + j * 3 + k * 5) % 9) for k in range((i + 2 * j) % 4)]  # 0-3 reports: NULLs via outer join, ties
            rows.append((continent, city, temps))
    return rows


@pytest.fixture(scope="module")
def gw():
    """(run, engines, unsharded) over the data above."""
    with loaded_world(_data()) as (world, unsharded):
        yield world.run, world.engines, unsharded


def _same(got: list, expected: list) -> bool:
    if len(got) != len(expected):
        return False
    for a, b in zip(got, expected):
        if len(a) != len(b):
            return False
        for x, y in zip(a, b):
            if isinstance(x, float) or isinstance(y, float):
                if x is None or y is None or not math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-9):
                    if x != y:
                        return False
            elif x != y:
                return False
    return True


def check(gw, statement, params=None) -> list:
    run, engines, unsharded = gw
    got = run(gather(engines, statement, params))
    expected = unsharded.rows(statement, params)
    assert _same([tuple(r) for r in got], [tuple(r) for r in expected]), f"\n got {got}\n want {expected}"
    assert list(got[0]._fields) == list(expected[0]._fields) if expected else True
    return got


joined = select(WL.id, WL.continent, WL.city, Report.temperature).outerjoin(Report)


@pytest.mark.parametrize(
    "statement",
    [
        joined.order_by(Report.temperature, WL.id).limit(5),
        joined.order_by(Report.temperature.desc(), WL.id).limit(7).offset(3),
        joined.order_by(Report.temperature.nulls_last(), WL.city.desc(), WL.id).limit(6),
        joined.order_by(desc(Report.temperature).nulls_first(), WL.id.desc()).offset(10),
        select(WL.city).order_by(WL.city, WL.id),
        select(WL.city).distinct().order_by(WL.city),
        select(WL.city).distinct().order_by(WL.city.desc()).limit(3).offset(1),
        select(WL.continent.label("c"), WL.city).order_by("c", WL.city).limit(4),
        select(WL.city.label("c"), WL.id).order_by(WL.city.label("c").desc(), WL.id).limit(5),
        select(WL.city.label("c"), WL.id).order_by(WL.city.label("c"), WL.id.desc()).offset(3),
        select(func.count()).select_from(WL),
        select(func.count(Report.id), func.sum(Report.temperature), func.avg(Report.temperature),
               func.min(Report.temperature), func.max(Report.temperature)),
        select(WL.continent, func.count(Report.id), func.avg(Report.temperature))
        .join(Report).group_by(WL.continent).order_by(WL.continent),
        select(WL.city, func.avg(Report.temperature).label("mean"), func.count())
        .outerjoin(Report).group_by(WL.city).order_by(desc("mean"), WL.city).limit(3),
        select(WL.city).group_by(WL.city).order_by(WL.city),
        select(func.avg(Report.temperature)).select_from(WL).join(Report).where(WL.continent == "Atlantis"),
        select(func.count()).select_from(WL).where(WL.continent == "Asia"),
        select(WL.continent, func.max(Report.temperature)).join(Report)
        .where(WL.continent.in_(["Asia", "Europe"])).group_by(WL.continent).order_by(WL.continent.desc()),
    ],
    ids=lambda s: str(s).replace("\n", " ")[:90],
)
def test_gather_matches_one_unsharded_database(gw, statement) -> None:
    check(gw, statement)


def test_gather_uses_routing_and_execute_time_parameters(gw) -> None:
    from sqlalchemy import bindparam

    run, engines, _ = gw
    statement = select(WL.city).where(WL.continent == bindparam("c")).order_by(WL.city)
    with trace(engines) as t:
        check(gw, statement, {"c": "Europe"})
    assert t.shards() == ["europe"]


def test_concatenation_is_wrong_where_gather_is_right(gw) -> None:
    run, engines, _ = gw
    Session = shardlib.make_sessionmaker(engines)
    statement = select(func.count()).select_from(WL)

    async def through_the_session():
        async with Session() as session:
            merged = (await session.execute(statement)).scalars().all()  # merged as gather merges
            explicit = statement.execution_options(shardlib_concatenate=True)
            return merged, (await session.execute(explicit)).scalars().all()

    merged, concatenated = run(through_the_session())
    assert len(concatenated) == 4  # one count per shard, when asked for explicitly
    gathered = check(gw, statement)
    assert len(gathered) == 1 and merged == [gathered[0][0]] == [sum(concatenated)]


@pytest.mark.parametrize(
    ("statement", "construct"),
    [
        (select(WL.city, func.row_number().over(order_by=WL.city)), "window functions"),
        (select(WL.city, func.count()).group_by(WL.city).having(func.count() > 1), "HAVING"),
        (select(func.count(distinct(WL.city))), "DISTINCT"),
        (select(func.count() + 1).select_from(WL), "inside an expression"),
        (select(WL.city, func.count()).select_from(WL), "neither in GROUP BY"),
        (select(WL.city).intersect(select(WL.continent)), "INTERSECT"),
        (select(WL.city).distinct().order_by(WL.id), "not selected"),
    ],
)
def test_unmergeable_constructs_are_refused_by_name(gw, statement, construct) -> None:
    run, engines, _ = gw
    with pytest.raises(NotImplementedError, match=construct):
        run(gather(engines, statement))


# ------------------------------------------------------------------ property-based

order_columns = {"continent": WL.continent, "city": WL.city, "temperature": Report.temperature, "id": WL.id}


@st.composite
def row_queries(draw):
    keys = draw(st.lists(st.sampled_from(sorted(order_columns)), max_size=3, unique=True))
    items = []
    for key in keys:
        column = order_columns[key]
        item = column.desc() if draw(st.booleans()) else column.asc()
        nulls = draw(st.sampled_from([None, "first", "last"]))
        items.append(item if nulls is None else (item.nulls_first() if nulls == "first" else item.nulls_last()))
    items += [WL.id, Report.temperature]  # total order: ties are identical rows
    statement = joined.order_by(*items)
    limit = draw(st.one_of(st.none(), st.integers(0, 12)))
    offset = draw(st.one_of(st.none(), st.integers(0, 12)))
    if limit is not None:
        statement = statement.limit(limit)
    if offset is not None:
        statement = statement.offset(offset)
    return statement


@st.composite
def group_queries(draw):
    keys = draw(st.lists(st.sampled_from(["continent", "city"]), max_size=2, unique=True))
    group = [getattr(WL, k) for k in keys]
    aggregates = draw(
        st.lists(
            st.sampled_from(["count_star", "count", "sum", "min", "max", "avg"]), min_size=1, max_size=4
        )
    )
    made = []
    for i, name in enumerate(aggregates):
        if name == "count_star":
            made.append(func.count().label(f"a{i}"))
        else:
            made.append(getattr(func, name)(Report.temperature).label(f"a{i}"))
    statement = select(*group, *made).select_from(WL).outerjoin(Report).group_by(*group)
    if draw(st.booleans()):
        statement = statement.where(WL.continent.in_(draw(st.lists(st.sampled_from(shardlib.CONTINENTS), max_size=3))))
    order = [g.desc() if draw(st.booleans()) else g for g in group]
    statement = statement.order_by(*order)
    if group and draw(st.booleans()):
        statement = statement.limit(draw(st.integers(0, 6))).offset(draw(st.integers(0, 4)))
    return statement


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(statement=row_queries())
def test_property_ordered_sliced_rows(gw, statement) -> None:
    check(gw, statement)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(statement=group_queries())
def test_property_grouped_aggregates(gw, statement) -> None:
    check(gw, statement)


@pytest.mark.skipif(on_postgres(), reason="PostgreSQL sleeps with pg_sleep on the server")
def test_injected_latency_sleeps_off_the_event_loop_thread(gw, monkeypatch) -> None:
    import threading

    from shardlib import latency

    run, engines, _ = gw
    threads = []
    monkeypatch.setattr(latency, "_sleep", lambda s: threads.append((threading.get_ident(), s)) or 0)
    with latency.injected_latency(engines, 0.001):
        run(gather(engines, select(func.count()).select_from(WL)))
    assert len(threads) == 4 and all(s == 0.001 for _, s in threads)
    assert threading.get_ident() not in {t for t, _ in threads}
    run(gather(engines, select(func.count()).select_from(WL)))
    assert len(threads) == 4  # removed after the block
    with pytest.raises(ValueError, match="latency must be >= 0"):
        with latency.injected_latency(engines, -1):
            pass
