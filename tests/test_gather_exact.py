"""gather() is never silently wrong (issue 11, class 4): one case per kind of defect.

Every answer is compared with one unsharded database holding the same rows
(``Unsharded``); every refusal must happen before any SQL runs, and the
shards that ran SQL are observed through engine events (``shardlib.trace``).

The data are built to make the classic merge mistakes visible: city names
that differ only in ASCII case (``Lima``/``lima``), only in trailing spaces
(``Lima``/``Lima ``), or in non-ASCII case (``Ñandú``/``ñandú``, which
SQLite's NOCASE does *not* fold), spread over different shards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import exists, func, literal, literal_column, select, text, union, union_all
from sqlalchemy.orm import aliased

import shardlib
from shardlib import Report, WeatherLocation as WL, gather, trace
from shardlib.gather import GatherPlan, GatherRefused, plan

from .conftest import Unsharded, loaded_world, on_postgres

CITIES = {
    "Asia": ["Tokyo", "osaka", "Lima ", "Ñandú", "apple", "Zed"],
    "Europe": ["TOKYO", "London", "london", "Lima", "éclair", "ñandú", "Apple"],
    "North America": ["Lima", "Toronto", "tokyo", "Zed", "apple", "B"],
    "South America": ["lima", "Quito", "Tokyo ", "zed", "a"],
}
W2 = aliased(WL)
PG = on_postgres()
only_sqlite = pytest.mark.skipif(PG, reason="SQLite function or collation")
only_pg = pytest.mark.skipif(not PG, reason="PostgreSQL function")


def _data() -> list[tuple[str, str, list[float]]]:
    rows = []
    for i, (continent, cities) in enumerate(CITIES.items()):
        for j, city in enumerate(cities):
            temps = [float((i * 5 + j * 3 + k * 7) % 11) for k in range((i + j) % 4)]
            rows.append((continent, city, temps))
    return rows


@pytest.fixture(scope="module")
def xw():
    """(run, engines, unsharded) over the data above."""
    with loaded_world(_data()) as (world, unsharded):
        yield world.run, world.engines, unsharded


# ------------------------------------------------------------------ comparing


def nocase(value: str) -> str:
    return value.translate({c: c + 32 for c in range(65, 91)})


def _norm(value: Any, fold: Callable[[str], str] | None) -> Any:
    if isinstance(value, (float, Decimal)):
        return round(float(value), 9)
    if isinstance(value, str) and fold is not None:
        return fold(value)
    return value


def normalize(rows: Sequence[Sequence[Any]], folds: Sequence[Callable[[str], str] | None] = ()) -> list[tuple]:
    out = []
    for row in rows:
        f = list(folds) + [None] * (len(row) - len(folds))
        out.append(tuple(_norm(v, fold) for v, fold in zip(row, f)))
    return out


def check(xw, statement, *, folds=(), ordered=True, params=None, shards=None) -> list:
    """gather == the unsharded database (values folded where the database may pick any member of a group)."""
    run, engines, unsharded = xw
    with trace(engines) as t:
        got = run(gather(engines, statement, params))
    expected = unsharded.rows(statement, params)
    g, e = normalize(got, folds), normalize(expected, folds)
    if not ordered:
        g, e = sorted(g, key=repr), sorted(e, key=repr)
    assert g == e, f"\n got  {g}\n want {e}\n sql  {statement}"
    assert list(got[0]._fields if got else []) == list(expected[0]._fields if expected else [])
    if shards is not None:
        assert t.shards() == shards
    return got


def refused(xw, statement, *match: str) -> str:
    """gather raises GatherRefused whose message contains every ``match``, before any SQL runs."""
    run, engines, _ = xw
    with trace(engines) as t:
        with pytest.raises(GatherRefused) as info:
            run(gather(engines, statement))
    message = str(info.value)
    for m in match:
        assert m in message, message
    assert t.records == [], "a refusal must come before any SQL"
    assert isinstance(info.value, NotImplementedError)
    return message


# ------------------------------------------------------------------ 1. functions


@pytest.mark.parametrize(
    ("column", "name"),
    [
        (func.group_concat(WL.city), "group_concat"),
        (func.string_agg(WL.city, ","), "string_agg"),
        (func.json_group_array(WL.city), "json_group_array"),
        (func.aggregate_strings(WL.city, ","), "aggregate_strings"),
        (func.array_agg(WL.city), "array_agg"),
        (func.my_own_udf(WL.city), "my_own_udf"),  # might be per-row, might be an aggregate: refuse
        (func.median(Report.temperature), "median"),
    ],
)
def test_functions_gather_cannot_classify_or_merge_are_refused_by_name(xw, column, name) -> None:
    message = refused(xw, select(column).select_from(WL).outerjoin(Report), f"{name}()", "set_shard_id")
    assert "Python" in message
    refused(xw, select(WL.continent, column).select_from(WL).outerjoin(Report).group_by(WL.continent), f"{name}()")
    refused(xw, select(WL.city).order_by(func.my_own_udf(WL.city)), "my_own_udf()")
    refused(xw, select(func.count()).select_from(WL).group_by(func.my_own_udf(WL.city)), "my_own_udf()")


def test_known_per_row_functions_merge_like_columns(xw) -> None:
    check(xw, select(WL.id, func.lower(WL.city), func.length(WL.city), func.abs(WL.id - 50),
                     func.coalesce(Report.temperature, -1.0), func.round(Report.temperature / 3),
                     func.substr(WL.city, 1, 2), func.trim(WL.city))
          .outerjoin(Report).order_by(func.lower(WL.city), WL.id, Report.temperature).limit(9).offset(2))


@only_sqlite
def test_total_is_a_sum_that_is_zero_over_no_rows(xw) -> None:
    check(xw, select(func.total(Report.temperature), func.sum(Report.temperature)))
    got = check(xw, select(func.total(Report.temperature), func.sum(Report.temperature))
                .join(WL).where(WL.continent == "Atlantis"))
    assert [tuple(r) for r in got] == [(0.0, None)]
    check(xw, select(WL.continent, func.total(Report.temperature).label("t")).outerjoin(Report)
          .group_by(WL.continent).order_by(WL.continent))


@only_sqlite
def test_sqlite_two_argument_min_and_max_are_per_row(xw) -> None:
    # min(a, b) is the smaller of two values in one row, not an aggregate: one row per location
    got = check(xw, select(WL.id, func.min(WL.id, 60).label("lo"), func.max(WL.id, 60)).order_by(WL.id))
    assert len(got) == sum(map(len, CITIES.values()))
    check(xw, select(func.max(func.min(WL.id, 60)), func.min(func.max(WL.id, 60)), func.count()))
    check(xw, select(func.min(WL.id, 60).label("lo")).distinct().order_by("lo"))


@only_pg
def test_bool_and_bool_or_every(xw) -> None:
    check(xw, select(WL.continent, func.bool_and(Report.temperature > 2), func.bool_or(Report.temperature > 9),
                     func.every(Report.temperature >= 0)).outerjoin(Report).group_by(WL.continent)
          .order_by(WL.continent))


# ------------------------------------------------------------------ 2. collations

CASE_FOLD = "NOCASE" if not PG else "C"  # PostgreSQL has no NOCASE; "C" is its code-point collation


@only_sqlite
@pytest.mark.parametrize("collation", ["NOCASE", "RTRIM", "BINARY", "nocase"])
def test_order_by_collation_merges_in_that_collation(xw, collation) -> None:
    # tie-broken by id: the expected order is fixed, and differs from code-point order
    statement = select(WL.city, WL.id).order_by(WL.city.collate(collation), WL.id)
    check(xw, statement)
    check(xw, statement.limit(6).offset(3))
    check(xw, select(WL.city, WL.id).order_by(WL.city.collate(collation).desc(), WL.id.desc()).limit(7))
    check(xw, select(WL.city.collate(collation).label("c"), WL.id).order_by("c", WL.id).limit(8))


@pytest.mark.parametrize("collation", ["C", "POSIX"] if PG else ["BINARY"])
def test_code_point_collations(xw, collation) -> None:
    check(xw, select(WL.city, WL.id).order_by(WL.city.collate(collation), WL.id).limit(10))
    check(xw, select(WL.city.collate(collation).label("c")).distinct().order_by("c"))
    check(xw, select(WL.city.collate(collation).label("c"), func.count()).group_by(WL.city.collate(collation))
          .order_by("c"))


@only_sqlite
def test_group_by_distinct_and_min_max_under_nocase(xw) -> None:
    # 'Lima' and 'lima' are one group under NOCASE (which member names it is the database's choice),
    # 'Lima ' is another, and 'Ñandú' / 'ñandú' stay apart (NOCASE folds ASCII only)
    nocase_city = WL.city.collate("NOCASE")
    got = check(xw, select(nocase_city.label("c"), func.count().label("n")).group_by(nocase_city).order_by("c"),
                folds=[nocase])
    counts = {nocase(r.c): r.n for r in got}
    assert counts["lima"] == 3 and counts["lima "] == 1 and counts["ñandú"] == 1 and counts["Ñandú"] == 1
    check(xw, select(nocase_city.label("c")).distinct().order_by("c"), folds=[nocase])
    check(xw, select(nocase_city.label("c")).distinct().order_by("c").limit(4).offset(2), folds=[nocase])
    check(xw, select(WL.continent, func.min(nocase_city), func.max(nocase_city)).group_by(WL.continent)
          .order_by(WL.continent), folds=[None, nocase, nocase])
    rtrim_city = WL.city.collate("RTRIM")
    check(xw, select(rtrim_city.label("c"), func.count()).group_by(rtrim_city).order_by("c"),
          folds=[lambda s: s.rstrip(" ")])


@pytest.mark.parametrize("collation", ["de_DE", "en-US-x-icu", "und-x-icu"])
def test_collations_gather_cannot_reproduce_are_refused_by_name(xw, collation) -> None:
    refused(xw, select(WL.city).order_by(WL.city.collate(collation)), repr(collation), "NOCASE")
    refused(xw, select(WL.city.collate(collation).label("c")).distinct(), repr(collation))
    refused(xw, select(WL.city.collate(collation).label("c"), func.count()).group_by(WL.city.collate(collation)),
            repr(collation))
    refused(xw, select(func.max(WL.city.collate(collation))), repr(collation))


def test_collate_nested_inside_an_expression_is_refused(xw) -> None:
    refused(xw, select(WL.city).order_by(WL.city.collate(CASE_FOLD) + "!"), "COLLATE inside an expression")
    refused(xw, select(WL.city).order_by(func.coalesce(WL.city.collate(CASE_FOLD), WL.continent.collate(CASE_FOLD))),
            "COLLATE inside an expression")


@only_sqlite
def test_a_function_of_one_collated_argument_takes_its_collation(xw) -> None:
    check(xw, select(WL.city, WL.id).order_by(func.trim(WL.city.collate("NOCASE")), WL.id))
    check(xw, select(WL.continent, func.max(WL.city.collate("NOCASE")).label("m")).group_by(WL.continent)
          .order_by(literal_column("2"), WL.continent), folds=[None, nocase])


# ------------------------------------------------------------------ 3. ORDER BY / GROUP BY by position or name


def test_order_by_position_is_resolved_not_merged_on_a_constant(xw) -> None:
    for first in (literal_column("1"), text("1")):
        check(xw, select(WL.city, WL.id).order_by(first, WL.id).limit(5))
    check(xw, select(WL.id, WL.city).order_by(literal_column("2").desc(), literal_column("1")).limit(6).offset(1))
    check(xw, select(WL.continent, func.count()).group_by(WL.continent).order_by(literal_column("2").desc(),
                                                                                     literal_column("1")))
    refused(xw, select(WL.city).order_by(literal_column("3")), "position 3", "1 column")


def test_order_by_text_name_of_a_selected_column(xw) -> None:
    check(xw, select(WL.city, WL.id).order_by(text("city"), WL.id).limit(7))
    check(xw, select(WL.city.label("place"), WL.id).order_by(text("place"), text("id")).limit(7))
    message = refused(xw, select(WL.city).order_by(text("continent")), "'continent'", "1=city")
    assert message.strip()
    refused(xw, select(WL.city).order_by(text("city DESC")), "'city DESC'")


def test_group_by_position_and_name(xw) -> None:
    check(xw, select(WL.continent, func.count()).group_by(text("1")).order_by(WL.continent))
    check(xw, select(func.lower(WL.city), func.count()).group_by(literal_column("1")).order_by(literal_column("1")))
    check(xw, select(WL.continent, func.count()).group_by(text("continent")).order_by(WL.continent))
    refused(xw, select(WL.city, func.count()).group_by(text("4")), "GROUP BY position 4")


# ------------------------------------------------------------------ 4. subqueries and CTEs


def test_count_over_a_distinct_subquery_is_refused_and_gathering_distinct_is_exact(xw) -> None:
    run, engines, unsharded = xw
    per_city = select(WL.city).distinct().subquery()
    refused(xw, select(func.count()).select_from(per_city), "DISTINCT", "gather the subquery on its own")
    truth = unsharded.rows(select(func.count()).select_from(per_city))[0][0]
    assert len(run(gather(engines, select(WL.city).distinct()))) == truth


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        (select(func.count()).select_from(select(WL.city).limit(3).subquery()), ["LIMIT"]),
        (select(func.avg(select(WL.continent, func.count().label("n")).group_by(WL.continent).subquery().c.n)),
         ["GROUP BY", "count"]),
        ((lambda c: select(c.c.continent).select_from(c))(
            select(WL.continent, func.max(WL.id).label("m")).group_by(WL.continent).cte()), ["a CTE", "GROUP BY"]),
        (select(func.count()).select_from(union(select(WL.city), select(WL.continent)).subquery()), ["UNION"]),
        (select(WL.city).where(WL.id == select(func.max(WL.id)).scalar_subquery()), ["without tying", "bindparam"]),
        (select(WL.city, select(func.count()).select_from(Report).scalar_subquery()), ["without tying"]),
        (select(WL.city).where(exists().where(Report.temperature > 9)), ["without tying"]),
        (select(WL.city).where(WL.city.in_(select(W2.city).where(W2.continent == "Asia"))), ["without tying"]),
        (select(WL.city).where(WL.id.in_(select(Report.location_id).limit(2))), ["without tying"]),
        (select(WL.city).where(WL.id.in_(union(select(WL.id), select(Report.location_id)))), ["UNION"]),
        (select(WL.city, W2.city).join(W2, WL.city == W2.city), ["not on the shard key"]),
        (select(WL.city, Report.temperature), ["not on the shard key"]),
        (select(WL.city, W2.city).join(W2, WL.id != W2.id), ["not on the shard key"]),
        (select(W2.city).where(W2.id.in_(select(WL.id).where(WL.city.in_(select(Report.temperature))))),
         ["without tying"]),
    ],
    ids=lambda v: str(v).replace("\n", " ")[:70] if not isinstance(v, list) else "-",
)
def test_subqueries_and_joins_across_shards_are_refused(xw, statement, words) -> None:
    refused(xw, statement, *words)


def test_subqueries_over_the_same_shards_rows_are_merged(xw) -> None:
    big = select(WL).where(WL.id > 30).subquery()
    check(xw, select(func.count(), func.min(big.c.city)).select_from(big))
    check(xw, select(big.c.city, Report.temperature).join(Report, Report.location_id == big.c.id)
          .order_by(Report.temperature.desc(), big.c.city, big.c.id).limit(6))
    cte = select(WL.id, WL.continent, func.upper(WL.city).label("up")).where(WL.city != "Zed").cte()
    check(xw, select(cte.c.continent, func.count()).group_by(cte.c.continent).order_by(cte.c.continent))
    n_reports = select(func.count(Report.id)).where(Report.location_id == WL.id).scalar_subquery()
    check(xw, select(WL.city, n_reports.label("n")).order_by(n_reports.desc(), WL.city, WL.id).limit(8))
    neighbours = select(func.count(W2.id)).where(W2.continent == WL.continent).scalar_subquery()
    check(xw, select(WL.id, neighbours.label("same_continent")).order_by(WL.id))
    hot = exists().where(Report.location_id == WL.id, Report.temperature > 6)
    check(xw, select(func.count()).select_from(WL).where(hot))
    check(xw, select(WL.city, WL.id).where(~hot).order_by(WL.id))
    check(xw, select(WL.city, WL.id).where(WL.id.in_(select(Report.location_id).where(Report.temperature < 3)))
          .order_by(WL.city, WL.id))
    check(xw, select(WL.city, W2.city, WL.id, W2.id).join(W2, WL.continent == W2.continent)
          .where(WL.city == "Tokyo").order_by(WL.id, W2.id))


def test_self_join_with_conditions_on_both_aliases(xw) -> None:
    check(xw, select(WL.city, W2.city, WL.id, W2.id).join(W2, WL.continent == W2.continent)
          .where(WL.city == "Tokyo", W2.city != "Tokyo").order_by(WL.id, W2.id))


# ------------------------------------------------------------------ 5. no FROM; EXISTS


def test_a_statement_without_tables_runs_once_on_one_shard(xw) -> None:
    run, engines, _ = xw
    with trace(engines) as t:
        got = run(gather(engines, select(literal(1).label("one"), literal("x"))))
    assert [tuple(r) for r in got] == [(1, "x")] and list(got[0]._fields) == ["one", "anon_1"]
    assert len(t.records) == 1
    with trace(engines) as t:
        assert len(run(gather(engines, select(func.now())))) == 1
    assert len(t.records) == 1
    check(xw, select(func.count()))  # count() with no FROM: 1 (one row), not 4


@pytest.mark.parametrize(
    ("statement", "shards"),
    [
        (select(exists().where(WL.continent == "Asia")), ["asia"]),
        (select(exists().where(WL.continent == "Atlantis")), None),
        (select(~exists().where(WL.continent == "Asia")), ["asia"]),
        (select(~exists().where(WL.city == "London")), None),
        (select(exists().where(WL.city == "Quito"), ~exists().where(WL.city == "Atlantis"),
                literal(7).label("seven")), None),
        (select(exists().where(WL.city == "Quito").label("q"),
                exists().where(WL.city == "London", WL.continent == "Europe").label("l")), None),
        (select(exists().where(Report.location_id == WL.id, Report.temperature > 9)), None),
        (select(exists().where(WL.city == "nowhere")), None),
    ],
)
def test_exists_is_merged_with_or_and_not_exists_with_and(xw, statement, shards) -> None:
    check(xw, statement)
    if shards is not None:
        check(xw, statement, shards=shards)


def test_exists_that_would_be_wrong_per_shard_is_refused(xw) -> None:
    refused(xw, select(exists(select(WL.city).group_by(WL.city).having(func.count() > 1))), "HAVING")
    refused(xw, select(exists(select(WL.city).offset(30))), "LIMIT/OFFSET")
    refused(xw, select(exists().where(WL.city == W2.city, WL.id != W2.id)), "not on the shard key")
    refused(xw, select(select(func.count()).select_from(WL).scalar_subquery()), "no FROM", "select_from")


# ------------------------------------------------------------------ 6. GROUP BY expressions


def test_group_by_expressions(xw) -> None:
    lower = func.lower(WL.city)
    check(xw, select(lower, func.count()).group_by(lower).order_by(lower))
    check(xw, select(lower.label("l"), WL.continent, func.avg(Report.temperature)).outerjoin(Report)
          .group_by(lower, WL.continent).order_by("l", WL.continent.desc()).limit(5).offset(2))
    check(xw, select(func.length(WL.city), func.count(), func.min(WL.city)).group_by(func.length(WL.city))
          .order_by(func.length(WL.city).desc()))
    check(xw, select(func.count().label("n")).select_from(WL).group_by(func.upper(WL.city)).order_by("n"), ordered=False)
    refused(xw, select(WL.city, func.count()).group_by(lower), "neither in GROUP BY nor an aggregate")


def test_gather_runs_sql_only_on_the_shards_that_can_hold_rows(xw) -> None:
    check(xw, select(func.count(), func.max(WL.city.collate(CASE_FOLD))).select_from(WL)
          .where(WL.continent.in_(["Europe", "Asia"])), folds=[None, nocase], shards=["asia", "europe"])
    check(xw, select(WL.city, WL.id).where(WL.continent == "South America").order_by(literal_column("1"), WL.id)
          .limit(2), shards=["south_america"])


# ------------------------------------------------------------------ UNION / UNION ALL


def test_union_and_union_all(xw) -> None:
    asia = select(WL.city.label("name")).where(WL.continent == "Asia")
    north = select(WL.city).where(WL.continent == "North America")
    reports = select(func.lower(WL.city)).join(Report).where(Report.temperature > 5)
    # 'apple' and 'Zed' are in Asia and North America: one copy each after UNION
    check(xw, union(asia, north).order_by(literal_column("1")), shards=["north_america", "asia"])
    check(xw, asia.union_all(north).order_by(text("name")), shards=["north_america", "asia"])
    check(xw, union(select(WL.city), reports).order_by(literal_column("1").desc())
          .limit(5).offset(2))
    check(xw, union_all(select(WL.continent), select(WL.city)), ordered=False)
    check(xw, select(WL.city).union(select(WL.continent)).order_by("city").limit(4))


@only_sqlite
def test_union_compares_by_the_left_most_part_that_has_a_collation(xw) -> None:
    # lower(city) has no collation, so the NOCASE of the second part decides: 'tokyo' = 'TOKYO'
    got = check(xw, union(select(func.lower(WL.city)), select(WL.city.collate("NOCASE"))), folds=[nocase],
                ordered=False)
    assert sorted(nocase(r[0]) for r in got).count("tokyo") == 1
    # a table column has one (BINARY): 'Tokyo', 'tokyo' and 'TOKYO' stay apart
    got = check(xw, union(select(WL.continent), select(WL.city.collate("NOCASE"))).order_by(literal_column("1")))
    assert [r[0] for r in got].count("tokyo") + [r[0] for r in got].count("Tokyo") == 2


@pytest.mark.parametrize(
    ("statement", "words"),
    [
        (select(WL.city).intersect(select(WL.continent)), ["INTERSECT"]),
        (select(WL.city).except_(select(WL.continent)), ["EXCEPT"]),
        (union(select(WL.city).distinct(), select(WL.continent)), ["DISTINCT"]),
        (union_all(select(func.count()).select_from(WL), select(func.count()).select_from(Report)), ["aggregates"]),
        (union_all(select(WL.city), select(literal("Atlantis"))), ["reads no table"]),
        (union(select(WL.city), select(W2.city).join(WL, WL.city == W2.city)), ["not on the shard key"]),
        (union(select(WL.city), select(WL.continent)).order_by(func.lower(WL.city)), ["ordered by"]),
    ],
    ids=["intersect", "except", "distinct-part", "aggregate-parts", "no-table", "cross-join", "order"],
)
def test_set_operations_that_cannot_be_merged_are_refused(xw, statement, words) -> None:
    refused(xw, statement, *words)


# ------------------------------------------------------------------ 8. plan() is pure


def test_plan_needs_no_engine_and_merges_exactly() -> None:
    p = plan(select(WL.continent, func.avg(Report.temperature).label("a")).join(Report)
             .group_by(WL.continent).order_by(WL.continent.desc()), "sqlite")
    assert isinstance(p, GatherPlan) and p.keys == ("continent", "a")
    assert "sum(" in str(p.shard_statement) and "count(" in str(p.shard_statement)
    assert "ORDER BY" not in str(p.shard_statement)
    merged = p.merge([[("Asia", 10.0, 2), ("Europe", 3.0, 1)], [("Asia", 2.0, 2)], [], [("Europe", None, 0)]])
    assert merged == [("Europe", 3.0), ("Asia", 3.0)]

    rows = plan(select(WL.city).order_by(WL.city.collate("NOCASE")).limit(3), "sqlite")
    assert rows.merge([[("b",), ("C",)], [("A",), ("d",)]]) == [("A",), ("b",), ("C",)]
    one = plan(select(literal(1)), "postgresql")
    assert one.one_shard and one.shards() == ["north_america"]
    assert one.merge([[(1,)], [(1,)], [(1,)], [(1,)]]) == [(1,)]  # a session may hand it every shard's answer
    assert plan(select(exists().where(WL.id == 1)), "sqlite").merge([[(False,)], [(True,)], [(False,)]]) == [(True,)]
    with pytest.raises(GatherRefused, match="group_concat"):
        plan(select(func.group_concat(WL.city)), "sqlite")
    assert issubclass(GatherRefused, NotImplementedError)


def test_refusals_name_what_to_do_instead() -> None:
    for statement in [
        select(WL.city, func.row_number().over(order_by=WL.city)),
        select(func.foo(WL.city)),
        select(WL.city).order_by(WL.city.collate("sv_SE")),
        select(func.count()).select_from(select(WL.city).distinct().subquery()),
        select(WL.city, Report.temperature),
    ]:
        with pytest.raises(GatherRefused) as info:
            plan(statement, "sqlite")
        assert len(str(info.value)) > 40, str(info.value)
