"""A generative oracle for gather(): statements drawn from a grammar that mixes the constructs of
issue 11 class 4 (collations, expressions and positions in GROUP BY / ORDER BY, unknown and
per-row functions, subqueries in FROM and WHERE, joins off the shard key), each either merged
exactly (equal to one unsharded database, in order) or refused with :class:`GatherRefused`
naming the construct, before any SQL runs.

The grammar knows which of its choices must be refused; a refusal it did not expect fails, and so
does an answer where it expected a refusal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import desc, exists, func, literal_column, select, text
from sqlalchemy.orm import aliased

import shardlib
from shardlib import Report, WeatherLocation as WL, gather, trace
from shardlib.gather import GatherRefused

from .test_gather_exact import PG, nocase, normalize, xw  # noqa: F401  (xw: the module-scoped fixture)

W2 = aliased(WL)
COLLATIONS = {"C": None, "POSIX": None} if PG else {"NOCASE": nocase, "RTRIM": lambda s: s.rstrip(" "), "BINARY": None}


@dataclass
class Case:
    statement: Any = None
    refusal: set[str] = field(default_factory=set)  # any of these in the message; empty: must merge
    folds: list[Any] = field(default_factory=list)
    plain_table: bool = False  # FROM the tables themselves (not a subquery)
    continents: list[str] | None = None  # WHERE continent IN (...): the shards that may run SQL


@st.composite
def sources(draw, case: Case):
    """(FROM-able columns id, continent, city, temperature) and the FROM clause to use."""
    kind = draw(st.sampled_from(["join"] * 5 + ["subquery", "subquery", "cte", "bad_subquery", "cross"]))
    if kind == "join" or kind == "cross":
        cols = {"id": WL.id, "continent": WL.continent, "city": WL.city, "temperature": Report.temperature}
        if kind == "cross":
            case.refusal.add("not on the shard key")
            return cols, lambda s: s.select_from(WL).outerjoin(Report).join(W2, W2.city == WL.city)
        case.plain_table = True
        return cols, lambda s: s.select_from(WL).outerjoin(Report)
    inner = select(WL.id, WL.continent, WL.city).where(WL.id > draw(st.integers(0, 60)))
    if kind == "bad_subquery":
        breaker = draw(st.sampled_from(["distinct", "limit", "group"]))
        if breaker == "distinct":
            inner = inner.distinct()
            case.refusal.add("DISTINCT")
        elif breaker == "limit":
            inner = inner.order_by(WL.id).limit(5)
            case.refusal.add("LIMIT")
        else:
            inner = select(func.max(WL.id).label("id"), WL.continent, WL.city).group_by(WL.continent, WL.city)
            case.refusal.update({"GROUP BY", "aggregates"})
    sub = inner.cte() if kind == "cte" else inner.subquery()
    cols = {"id": sub.c.id, "continent": sub.c.continent, "city": sub.c.city, "temperature": Report.temperature}
    return cols, lambda s: s.select_from(sub).outerjoin(Report, Report.location_id == sub.c.id)


@st.composite
def wheres(draw, case: Case, cols: dict[str, Any]):
    kind = draw(st.sampled_from(["none"] * 4 + ["continent", "continent", "hot", "key_in", "uncorrelated", "city_in"]))
    if kind == "continent":
        case.continents = draw(st.lists(st.sampled_from(shardlib.CONTINENTS), max_size=3))
        return cols["continent"].in_(case.continents)
    if kind == "hot":
        R = aliased(Report)
        return exists().where(R.location_id == cols["id"], R.temperature > draw(st.integers(0, 10)))
    if kind == "uncorrelated":
        case.refusal.add("without tying")
        return exists().where(Report.temperature > 100)
    if kind == "key_in":
        R = aliased(Report)
        return cols["id"].in_(select(R.location_id).where(R.temperature < draw(st.integers(0, 10))))
    if kind == "city_in":
        case.refusal.add("without tying")
        return cols["city"].in_(select(W2.city).where(W2.continent == "Asia"))
    return None


def city_expression(draw, cols: dict[str, Any], case: Case) -> tuple[Any, Any]:
    """A text column and the fold that makes its values comparable (None: compare exactly)."""
    kind = draw(st.sampled_from(["city", "lower", "collated", "collated"]))
    if kind == "city":
        return cols["city"], None
    if kind == "lower":
        return func.lower(cols["city"]), None
    name = draw(st.sampled_from(sorted(COLLATIONS)))
    return cols["city"].collate(name), COLLATIONS[name]


@st.composite
def row_statements(draw):
    case = Case()
    cols, with_from = draw(sources(case))
    city, fold = city_expression(draw, cols, case)
    selected = [cols["id"], city.label("place"), cols["temperature"]]
    folds = [None, fold, None]
    extra = draw(st.sampled_from(["none"] * 5 + ["length", "min2", "udf", "group_concat"]))
    if extra == "length":
        selected.append(func.length(cols["city"]))
    elif extra == "min2" and not PG:
        selected.append(func.min(cols["id"], 40))  # SQLite's per-row min of two values
    elif extra == "udf":
        selected.append(func.my_udf(cols["city"]))
        case.refusal.add("my_udf()")
    elif extra == "group_concat":
        selected.append(func.group_concat(cols["city"]))
        case.refusal.add("group_concat()")
    folds += [None] * (len(selected) - len(folds))
    statement = with_from(select(*selected))
    where = draw(wheres(case, cols))
    if where is not None:
        statement = statement.where(where)
    distinct = draw(st.booleans())
    choices = ["place", "position", "name", "temperature"] + ([] if distinct else ["collate"])
    order = []
    for item in draw(st.lists(st.sampled_from(choices), max_size=3, unique=True)):
        if item == "place":
            expr = city
        elif item == "position":
            expr = literal_column(str(draw(st.integers(1, len(selected)))))
        elif item == "name":
            expr = text("place")
        elif item == "temperature":
            expr = cols["temperature"]
        else:
            name = draw(st.sampled_from(sorted(COLLATIONS)))
            expr = cols["city"].collate(name)
            wrap = draw(st.sampled_from(["none", "lower", "concat"]))
            if wrap == "lower":
                expr = func.lower(expr)  # takes the collation of its argument: merged
            elif wrap == "concat":
                expr = expr + "!"
                case.refusal.add("COLLATE inside an expression")
        order.append(desc(expr) if draw(st.booleans()) else expr)
    order += [cols["id"], cols["temperature"]]  # total order: ties are identical rows
    statement = statement.order_by(*order)
    if distinct:
        statement = statement.distinct()
    if draw(st.booleans()):
        statement = statement.limit(draw(st.integers(0, 10)))
    if draw(st.booleans()):
        statement = statement.offset(draw(st.integers(0, 10)))
    case.statement, case.folds = statement, folds
    return case


@st.composite
def group_statements(draw):
    case = Case()
    cols, with_from = draw(sources(case))
    candidates = ["continent", "city", "lower", "length"]
    names = draw(st.lists(st.sampled_from(candidates), max_size=2, unique=True))
    keys, folds = [], []
    for name in names:
        if name == "continent":
            keys.append(cols["continent"]); folds.append(None)
        elif name == "city":
            expr, fold = city_expression(draw, cols, case)
            keys.append(expr); folds.append(fold)
        elif name == "lower":
            keys.append(func.lower(cols["city"])); folds.append(None)
        else:
            keys.append(func.length(cols["city"])); folds.append(None)
    aggregates = []
    for i, name in enumerate(draw(st.lists(st.sampled_from(
            ["count_star", "count", "sum", "avg", "min", "max", "total", "min_city", "max_city", "group_concat",
             "udf", "min2"] + ["count", "sum", "avg", "min", "max", "min_city", "total"]), min_size=1, max_size=3))):
        if name == "count_star":
            aggregates.append(func.count()); folds.append(None)
        elif name in ("count", "sum", "avg", "min", "max"):
            aggregates.append(getattr(func, name)(cols["temperature"])); folds.append(None)
        elif name == "total" and not PG:
            aggregates.append(func.total(cols["temperature"])); folds.append(None)
        elif name in ("min_city", "max_city"):
            expr, fold = city_expression(draw, cols, case)
            aggregates.append((func.min if name == "min_city" else func.max)(expr)); folds.append(fold)
        elif name == "group_concat":
            aggregates.append(func.group_concat(cols["city"])); folds.append(None)
            case.refusal.add("group_concat()")
        elif name == "udf":
            aggregates.append(func.my_udf(cols["temperature"])); folds.append(None)
            case.refusal.add("my_udf()")
        elif name == "min2" and not PG:  # per-row inside an aggregate: merged
            aggregates.append(func.max(func.min(cols["id"], 40))); folds.append(None)
        else:
            aggregates.append(func.count(cols["temperature"])); folds.append(None)
    selected = [k.label(f"k{i}") for i, k in enumerate(keys)] + [a.label(f"a{i}") for i, a in enumerate(aggregates)]
    statement = with_from(select(*selected))
    where = draw(wheres(case, cols))
    if where is not None:
        statement = statement.where(where)
    if keys:
        style = draw(st.sampled_from(["expression", "position"]))
        statement = statement.group_by(*(literal_column(str(i + 1)) if style == "position" else k
                                         for i, k in enumerate(keys)))
        order = []
        if draw(st.booleans()):
            order.append(literal_column(str(len(keys) + 1)).desc())  # the first aggregate, by position
        for i, key in enumerate(keys):
            ref = draw(st.sampled_from(["expression", "position", "label"]))
            expr = key if ref == "expression" else (literal_column(str(i + 1)) if ref == "position" else text(f"k{i}"))
            order.append(desc(expr) if draw(st.booleans()) else expr)
        statement = statement.order_by(*order)
        if draw(st.booleans()):
            statement = statement.limit(draw(st.integers(0, 8))).offset(draw(st.integers(0, 4)))
    case.statement, case.folds = statement, folds
    return case


def run_case(xw, case: Case) -> None:  # noqa: F811
    run, engines, unsharded = xw
    with trace(engines) as t:
        try:
            got = run(gather(engines, case.statement))
        except GatherRefused as error:
            assert case.refusal, f"unexpected refusal: {error}\n{case.statement}"
            assert any(r in str(error) for r in case.refusal), f"{error}\nexpected one of {case.refusal}"
            assert t.records == [], "refused after running SQL"
            event("refused")
            return
    event(f"merged ({'empty' if not got else 'rows'})")
    assert not case.refusal, f"expected a refusal naming one of {case.refusal}, got {len(got)} rows\n{case.statement}"
    expected = unsharded.rows(case.statement)
    assert normalize(got, case.folds) == normalize(expected, case.folds), (
        f"\n got  {normalize(got, case.folds)}\n want {normalize(expected, case.folds)}\n sql  {case.statement}"
    )
    assert list(got[0]._fields if got else []) == list(expected[0]._fields if expected else [])
    if case.plain_table and case.continents is not None:  # the shards that ran SQL: only those of the continents
        wanted = [s for s in shardlib.SHARD_IDS if s in {shardlib.SHARD_FOR_CONTINENT[c] for c in case.continents}]
        assert t.shards() == wanted if wanted else len(t.shards()) <= 1, (t.shards(), case.continents)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=row_statements())
def test_property_rows(xw, case) -> None:  # noqa: F811
    run_case(xw, case)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=group_statements())
def test_property_groups(xw, case) -> None:  # noqa: F811
    run_case(xw, case)
