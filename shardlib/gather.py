"""Scatter-gather: run a SELECT on its shards concurrently and merge exactly.

``ShardedSession`` runs a cross-shard statement on one shard after another and
*concatenates* what comes back. For plain row fetches that is fine; for
anything that summarises or slices, it is wrong:

=====================================  ==========================================
statement                              concatenation gives
=====================================  ==========================================
``ORDER BY temperature LIMIT 5``       up to 5 rows *per shard*, in shard order
``SELECT count(*)``                    one count per shard
``SELECT avg(temperature)``            one average per shard
``SELECT DISTINCT city``               a city repeated once per shard storing it
``SELECT EXISTS (...)``                one true/false per shard
=====================================  ==========================================

:func:`gather` does what Citus and Vitess do on their coordinator:

* **fan out in parallel**: one connection per shard, one task each, so the
  wall time is the slowest shard, not the sum of all of them;
* **push down** as much as can be merged exactly: each shard sorts, and is
  asked for ``LIMIT + OFFSET`` rows (the global slice can start anywhere);
  aggregates become *partial* aggregates (``avg(x)`` becomes ``sum(x)`` and
  ``count(x)``: never an average of averages);
* **merge** on the coordinator: a k-way merge of the sorted streams (NULLs
  placed as the database places them), the global ``OFFSET``/``LIMIT``,
  partial aggregates combined per group, ``DISTINCT`` applied last.

The analysis is :func:`plan`, which needs no engine and no event loop:
``plan(statement, "sqlite")`` returns a :class:`GatherPlan` with the SELECT
each shard runs (``.shard_statement``), the result column names (``.keys``)
and a pure-Python ``.merge(per_shard_rows)``. :func:`gather` is ``plan`` plus
concurrent execution; a sharded session can use ``plan`` to merge its own
per-shard results.

What is merged exactly
----------------------
* Plain rows, ``ORDER BY`` (by expression, by label, by ``text("name")`` of
  a selected column, by position ``text("1")`` / ``literal_column("1")``),
  ``LIMIT``/``OFFSET`` given as integers, ``DISTINCT``.
* The aggregates ``count``, ``sum``, ``total`` (SQLite: a sum that is
  ``0.0`` over no rows), ``min``, ``max``, ``avg``, ``bool_and``,
  ``bool_or``, ``every``, over the whole table or per ``GROUP BY`` key; group
  keys may be expressions (``func.lower(city)``), labels or positions.
* Per-row functions from an explicit allow-list (:data:`PER_ROW_FUNCTIONS`:
  ``lower``, ``upper``, ``length``, ``abs``, ``coalesce``, ``round``,
  ``substr``, ``trim``, ...; ``CAST``/``CASE`` are not functions and always
  per-row). ``min(a, b)`` and ``max(a, b)`` with two or more arguments are
  SQLite's per-row functions, not aggregates.
* Collations in ``ORDER BY``, ``GROUP BY``, ``DISTINCT`` and ``min``/``max``
  that Python can reproduce exactly: ``BINARY``, ``"C"``, ``"POSIX"``,
  ``UCS_BASIC`` (code-point order), SQLite's ``NOCASE`` (ASCII letters folded,
  nothing else) and ``RTRIM`` (trailing spaces ignored). Text with no
  collation is compared by code point, which is SQLite's default and
  PostgreSQL's ``"C"`` (``scripts/pg.sh`` creates its cluster with
  ``--locale=C``); under a language-aware database collation
  (``en_US.UTF-8``) write ``column.collate("C")``.
* Statements with no table at all (``select(literal(1))``,
  ``select(func.now())``) run once, on one shard.
* ``UNION ALL`` (every shard's rows) and ``UNION`` (de-duplicated) of
  row-wise SELECTs over sharded tables, with ``ORDER BY`` selected columns
  and ``LIMIT``/``OFFSET``.
* ``select(exists().where(...))``: true if any shard says true;
  ``select(~exists()...)``: true if every shard says true.
* Joins and subqueries whose rows live together on one shard: tables joined
  on the shard key (``continent = continent``, ``location_id = id``,
  ``id = id``), subqueries in FROM (and CTEs) that only filter and compute
  per-row values, and subqueries in WHERE or the SELECT list that are
  correlated to the outer row on the shard key (``exists().where(
  Report.location_id == WeatherLocation.id)``) or that are
  ``key IN (SELECT key ...)`` on the shard key.

What is refused (:class:`GatherRefused`, a ``NotImplementedError``)
------------------------------------------------------------------
Each refusal names the construct and an alternative, before any SQL runs:

* window functions, ``HAVING``, ``count(DISTINCT x)``, ``DISTINCT ON``,
  ``FILTER``/``WITHIN GROUP``, ``FETCH FIRST``, ``LIMIT``/``OFFSET`` given as
  expressions;
* an aggregate inside an expression (``count() + 1``), an aggregate of an
  aggregate, ``GROUP BY`` an aggregate, a column that is neither grouped nor
  aggregated, ``ORDER BY`` an expression that is neither selected nor a group
  key (aggregate queries), ``DISTINCT`` ordered by an unselected expression;
* aggregates gather cannot combine (:data:`UNMERGEABLE_AGGREGATES`:
  ``group_concat``, ``string_agg``, ``array_agg``, ``json_group_array``,
  ``median``, ...) and *any function on neither list* (it might be an
  aggregate: gather does not guess);
* a collation it cannot reproduce (``de_DE``, ICU collations, ...), a
  ``COLLATE`` nested inside an expression other than the one argument of a
  function;
* ``ORDER BY``/``GROUP BY`` positions out of range, and text that is not a
  position or the name of exactly one selected column (``text("city DESC")``);
* ``INTERSECT``/``EXCEPT``; a ``UNION`` nested in a subquery, or whose
  parts aggregate, group, de-duplicate, slice or read no table;
* subqueries and CTEs in FROM that aggregate, group, ``LIMIT``/``OFFSET``,
  de-duplicate or use set operations; recursive CTEs, ``LATERAL``,
  ``add_cte()``, table-valued functions over tables;
* subqueries in WHERE, ON, ORDER BY or the SELECT list that are not tied to
  the outer row on the shard key (``WHERE id = (SELECT max(id) ...)``,
  ``city IN (SELECT city FROM ... other continent)``);
* joins that are not on the shard key (``a.city = b.city``, a cross join);
* a statement without FROM that reads tables other than through
  ``EXISTS``/``NOT EXISTS`` columns, and such an ``EXISTS`` whose subquery
  aggregates, groups, de-duplicates or skips rows (``OFFSET``).

Failures: when one shard fails, :func:`gather` cancels the others, waits until
their connections are back in their pools and raises :class:`ShardFailed`
naming the shard. ``timeout=`` seconds cancels every shard still running and
raises ``TimeoutError`` naming the shards that had not answered.

What it gives up: each shard runs in its own transaction, so there is no
snapshot across shards: a row moved between shards during the query can be
seen twice or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from sqlalchemy import Row, func
from sqlalchemy.engine import Dialect
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    BinaryExpression,
    BooleanClauseList,
    ClauseList,
    ColumnClause,
    FunctionFilter,
    Grouping,
    Label,
    Over,
    TextClause,
    UnaryExpression,
    WithinGroup,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import (
    CTE,
    Alias,
    CompoundSelect,
    Exists,
    FromClause,
    Join,
    Lateral,
    ScalarSelect,
    Select,
    Subquery,
    TableClause,
    Values,
)

from . import routecache
from .reference import reads_only_reference
from .routing import shards_for
from .shards import SERVING_SHARD_IDS

__all__ = [
    "AGGREGATES", "PER_ROW_FUNCTIONS", "GatherPlan", "GatherRefused", "ShardFailed", "gather", "plan",
]

AGGREGATES = ("count", "sum", "total", "min", "max", "avg", "bool_and", "bool_or", "every")
"""Aggregates gather merges exactly from per-shard partial results."""

UNMERGEABLE_AGGREGATES = frozenset({
    "group_concat", "string_agg", "aggregate_strings", "array_agg", "json_agg", "jsonb_agg",
    "json_group_array", "json_group_object", "json_object_agg", "jsonb_object_agg", "xmlagg",
    "percentile_cont", "percentile_disc", "mode", "median", "stddev", "stddev_pop", "stddev_samp",
    "variance", "var_pop", "var_samp", "corr", "covar_pop", "covar_samp", "regr_slope",
    "bit_and", "bit_or", "bit_xor", "rank", "dense_rank", "percent_rank", "cume_dist", "row_number",
})
"""Aggregates known to exist that gather cannot combine from partials (refused by name)."""

PER_ROW_FUNCTIONS = frozenset({
    # text
    "lower", "upper", "length", "char_length", "character_length", "octet_length", "substr",
    "substring", "trim", "ltrim", "rtrim", "btrim", "replace", "instr", "strpos", "position",
    "concat", "concat_ws", "printf", "format", "lpad", "rpad", "left", "right", "reverse",
    "initcap", "split_part", "char", "chr", "unicode", "ascii", "hex", "quote", "md5", "like",
    "glob", "soundex", "repeat", "translate", "to_char",
    # numbers
    "abs", "round", "sign", "ceil", "ceiling", "floor", "trunc", "mod", "power", "pow", "sqrt",
    "exp", "ln", "log", "log10", "log2", "pi", "degrees", "radians", "sin", "cos", "tan",
    "greatest", "least", "random", "to_number",
    # NULLs and types
    "coalesce", "ifnull", "nullif", "iif", "typeof", "cast",
    # dates and times (the clock functions give one value per shard: any one is right)
    "now", "current_timestamp", "current_date", "current_time", "localtime", "localtimestamp",
    "date", "time", "datetime", "julianday", "unixepoch", "strftime", "date_trunc", "date_part",
    "extract", "age", "make_date", "to_date", "to_timestamp",
})
"""Functions known to compute one value per row: merged like plain columns."""

_CODE_POINT_COLLATIONS = frozenset({"binary", "c", "posix", "ucs_basic"})


class GatherRefused(NotImplementedError):
    """The statement cannot be merged exactly; the message names the construct and the alternative."""


class ShardFailed(RuntimeError):
    """One shard raised; the others were cancelled. ``.shard`` names it, ``__cause__`` is its error."""

    def __init__(self, shard: str, error: BaseException, cancelled: Sequence[str]) -> None:
        others = f"; cancelled {', '.join(map(repr, cancelled))}" if cancelled else ""
        super().__init__(f"shard {shard!r} failed: {type(error).__name__}: {error}{others}")
        self.shard = shard
        self.error = error


def _refuse(message: str) -> GatherRefused:
    return GatherRefused(message)


def _sql(expr: Any) -> str:
    try:
        return re.sub(r"\s+", " ", str(expr)).strip()
    except Exception:  # some constructs only compile for one dialect
        return type(expr).__name__


# ===================================================================== sort keys
#
# A merged ORDER BY / GROUP BY / DISTINCT must compare values as the database
# compares them. NULL placement is handled by the caller; here: type order
# (SQLite: numbers < text < blobs) and the collation of text.


def _fold_nocase(text: str) -> str:
    return text.translate(_ASCII_LOWER)


_ASCII_LOWER = {c: c + 32 for c in range(ord("A"), ord("Z") + 1)}


def _fold_rtrim(text: str) -> str:
    return text.rstrip(" ")


def _identity(text: str) -> str:
    return text


def _collation_fold(name: str | None, where: str) -> Callable[[str], str]:
    if name is None or name.lower() in _CODE_POINT_COLLATIONS:
        return _identity
    if name.lower() == "nocase":
        return _fold_nocase
    if name.lower() == "rtrim":
        return _fold_rtrim
    raise _refuse(
        f"gather cannot reproduce collation {name!r} in {where}: it merges only code-point collations "
        f"(BINARY, \"C\", POSIX, UCS_BASIC) and SQLite's NOCASE and RTRIM; "
        f"use one of those, or run the statement on one shard with set_shard_id"
    )


def _value_key(value: Any, fold: Callable[[str], str]) -> tuple[int, Any]:
    if isinstance(value, str):
        return (2, fold(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return (3, bytes(value))
    return (1, value)


def _collation(expr: Any, where: str) -> Callable[[str], str]:
    """How text values of ``expr`` compare (see :func:`_collation_name`)."""
    return _collation_fold(_collation_name(expr, where), where)


def _collation_name(expr: Any, where: str) -> str | None:
    """The collation of ``expr``: its top-level COLLATE (or that of the one collated argument of
    a function), else its type's collation, else None (the default: code-point order).

    A COLLATE deeper inside any other expression (``x COLLATE NOCASE || 'a'``,
    two collated arguments) follows rules that differ between databases: refused.
    """
    expr = _unlabel(expr)
    if isinstance(expr, BinaryExpression) and expr.operator is operators.collate:
        _no_nested_collate(expr.left, where)
        return str(expr.right.collation)
    if isinstance(expr, FunctionElement) and hasattr(expr.clauses, "clauses"):
        # lower(x COLLATE "C"), max(x COLLATE NOCASE): both databases give the result the
        # argument's explicit collation. Exactly one collated argument, at its top: that one.
        arguments = [_unlabel(a) for a in expr.clauses.clauses]
        collated = [a for a in arguments if isinstance(a, BinaryExpression) and a.operator is operators.collate]
        if len(collated) == 1:
            for argument in arguments:
                if argument is not collated[0]:
                    _no_nested_collate(argument, where)
            return _collation_name(collated[0], where)
    _no_nested_collate(expr, where)
    return getattr(getattr(expr, "type", None), "collation", None)


def _no_nested_collate(expr: Any, where: str) -> None:
    for element in _walk(expr):
        if isinstance(element, BinaryExpression) and element.operator is operators.collate:
            raise _refuse(
                f"gather cannot merge {_sql(expr)} in {where}: COLLATE inside an expression; "
                f"put COLLATE on the outermost expression (expression.collate(...))"
            )


# ===================================================================== walking expressions

_NESTED_SELECTS = (ScalarSelect, Exists, Select, CompoundSelect, Subquery, CTE, Alias, Lateral)


def _is_table_like(element: Any) -> bool:
    """A FROM element (table, alias, join), where an expression walk stops. SQL functions are
    FromClauses too in SQLAlchemy (``SELECT * FROM generate_series(...)``), but their arguments
    are part of the expression."""
    return isinstance(element, FromClause) and not isinstance(element, FunctionElement)


def _walk(expr: Any) -> Iterator[Any]:
    """Every element of ``expr`` that this statement evaluates, not descending into subqueries
    (which are yielded, not entered)."""
    stack = [expr]
    while stack:
        element = stack.pop()
        yield element
        if isinstance(element, _NESTED_SELECTS) or _is_table_like(element):
            continue
        stack.extend(element.get_children())


def _unlabel(expr: Any) -> Any:
    while isinstance(expr, (Label, Grouping)):
        expr = expr.element
    return expr


def _function_kind(function: FunctionElement[Any]) -> str:
    """'aggregate' (merged), 'per-row', or a GatherRefused for anything else."""
    name = function.name.lower()
    arguments = len(function.clauses.clauses) if hasattr(function.clauses, "clauses") else 1
    if name in ("min", "max") and arguments >= 2:
        return "per-row"  # SQLite's min(a, b): the smaller of two values in one row
    if name in AGGREGATES:
        return "aggregate"
    if name in PER_ROW_FUNCTIONS:
        return "per-row"
    if name in UNMERGEABLE_AGGREGATES:
        raise _refuse(
            f"gather cannot merge the aggregate {name}() ({_sql(function)}): its per-shard results cannot be "
            f"combined exactly; gather the rows it reads and compute {name} in Python, or run it on one "
            f"shard with set_shard_id"
        )
    raise _refuse(
        f"gather does not know whether {name}() ({_sql(function)}) is a per-row function or an aggregate, "
        f"and refuses rather than guess. Mergeable aggregates: {', '.join(AGGREGATES)}; per-row functions: "
        f"see shardlib.gather.PER_ROW_FUNCTIONS. Gather the rows and compute {name} in Python, or run the "
        f"statement on one shard with set_shard_id"
    )


def _check_expression(expr: Any, where: str) -> bool:
    """Refuse what cannot be merged inside ``expr``; True if it contains a (mergeable) aggregate."""
    for element in _walk(expr):
        if isinstance(element, Over):
            raise _refuse(f"gather cannot merge window functions ({element}) in {where}")
        if isinstance(element, (FunctionFilter, WithinGroup)):
            raise _refuse(f"gather cannot merge {type(element).__name__} aggregates in {where}")
    aggregate = False
    for element in _walk(expr):
        if isinstance(element, FunctionElement) and _function_kind(element) == "aggregate":
            aggregate = True
    return aggregate


def _aggregate_name(expr: Any) -> str | None:
    expr = _unlabel(expr)
    if isinstance(expr, FunctionElement) and _function_kind(expr) == "aggregate":
        return expr.name.lower()
    return None


def _same(a: Any, b: Any) -> bool:
    a, b = _unlabel(a), _unlabel(b)
    return a is b or a.compare(b)


def _conjuncts(clause: Any) -> list[Any]:
    if clause is None:
        return []
    clause = _unlabel(clause)
    if isinstance(clause, BooleanClauseList) and clause.operator is operators.and_:
        return [c for part in clause.clauses for c in _conjuncts(part)]
    return [clause]


# ===================================================================== co-location
#
# A statement runs on each shard over that shard's rows only. That is exact
# when every combination of rows it can form lives on one shard: tables
# joined on the shard key, subqueries tied to the outer row by the shard key.
# A weather location lives on the shard of its continent; its id names that
# shard; a report lives with its location.

_SHARD_KEYS = {("weather_locations", "continent"): "continent", ("weather_locations", "id"): "location",
               ("weather_reports", "location_id"): "location"}


def _node(element: Any) -> Any:
    return element._deannotate() if hasattr(element, "_deannotate") else element


def _base_table(element: Any) -> Any:
    element = _node(element)
    while isinstance(element, Alias) and not isinstance(element, (Subquery, CTE, Lateral)):
        element = _node(element.element)
    return element


def _shard_key(column: Any) -> tuple[str, Any] | None:
    """(kind, FROM node) when ``column`` is a shard-key column of a FROM element."""
    column = _unlabel(column)
    if not isinstance(column, ColumnClause) or column.table is None:
        return None
    node = _node(column.table)
    base = _base_table(node)
    if isinstance(base, TableClause):
        kind = _SHARD_KEYS.get((base.name, column.name))
        return (kind, node) if kind else None
    if isinstance(base, (Subquery, CTE)):  # a subquery column that passes a key column through
        for proxy in getattr(column, "_proxies", ()):
            inner = _shard_key(proxy)
            if inner is not None:
                return (inner[0], node)
    return None


class _Components:
    """Union-find over row sources, joined by shard-key equalities."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def add(self, key: Any) -> None:
        self.parent.setdefault(key, key)

    def find(self, key: Any) -> Any:
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Any, b: Any) -> None:
        self.parent[self.find(a)] = self.find(b)

    def together(self, a: Any, b: Any) -> bool:
        return self.find(a) == self.find(b)


def _has_table(element: Any) -> bool:
    from sqlalchemy.sql import visitors

    for e in visitors.iterate(element):
        if isinstance(e, TableClause) and not isinstance(e, Values):
            return True
        table = getattr(e, "table", None) if isinstance(e, ColumnClause) else None
        if table is not None and table is not element and _has_table(table):  # a column names its table
            return True
    return False


@dataclass
class _Froms:
    nodes: list[Any] = field(default_factory=list)  # FROM elements holding sharded rows
    conditions: list[Any] = field(default_factory=list)  # JOIN ... ON conjuncts


def _from_name(node: Any) -> str:
    base = _base_table(node)
    if isinstance(node, (Subquery, CTE)):
        return f"{'a CTE' if isinstance(node, CTE) else 'a subquery'} ({_sql(node.element)})"
    if isinstance(base, TableClause) and base is not node:
        return f"{base.name} (aliased)"
    return getattr(base, "name", None) or _sql(node)


def _flatten(element: Any, froms: _Froms, correlated: set[int]) -> None:
    """FROM nodes and ON conditions of one FROM element; subqueries in FROM checked on the way."""
    element = _node(element)
    if isinstance(element, Join):
        _flatten(element.left, froms, correlated)
        _flatten(element.right, froms, correlated)
        froms.conditions.extend(_conjuncts(element.onclause))
        return
    if id(element) in correlated:
        return
    if not _has_table(element):
        return  # VALUES, a subquery of literals: the same rows on every shard
    if reads_only_reference(element):
        return  # a reference table: the same rows on every shard too (shardlib.reference)
    if isinstance(element, Lateral):
        raise _refuse(f"gather cannot merge a LATERAL subquery ({_sql(element)}); join the table instead")
    if isinstance(element, (Subquery, CTE)) or (isinstance(element, Alias) and isinstance(element.element, Select)):
        if isinstance(element, CTE) and element.recursive:
            raise _refuse(f"gather cannot merge a recursive CTE ({element.name}); run it on one shard with set_shard_id")
        _check_from_subquery(element)
    elif not isinstance(_base_table(element), TableClause):
        raise _refuse(
            f"gather cannot merge FROM {_sql(element)} ({type(element).__name__}); select from the tables"
        )
    froms.nodes.append(element)


def _check_from_subquery(element: Any) -> None:
    """A subquery or CTE in FROM is exact per shard if it only filters and computes per-row values."""
    inner = element.element
    label = "a CTE" if isinstance(element, CTE) else "a subquery in FROM"
    if isinstance(inner, CompoundSelect):
        raise _refuse(
            f"gather cannot merge {label} using {_set_operation(inner)}: a set operation runs on each shard's "
            f"rows only; gather each part and combine them in Python"
        )
    if not isinstance(inner, Select):
        raise _refuse(f"gather cannot analyse {label} ({type(inner).__name__}); select from the tables")
    reasons = _not_row_wise(inner)
    if reasons:
        raise _refuse(
            f"gather cannot merge {label} ({_sql(inner)}): it {' and '.join(reasons)}, which would run on each "
            f"shard's rows separately; gather the subquery on its own, or rewrite it as a join"
        )
    _check_select(inner, outer=[], context="a subquery in FROM")


def _not_row_wise(select: Select[Any]) -> list[str]:
    reasons = []
    if select._group_by_clauses:
        reasons.append("groups (GROUP BY)")
    if select._having_criteria:
        reasons.append("filters groups (HAVING)")
    if select._distinct or select._distinct_on:
        reasons.append("de-duplicates (DISTINCT)")
    if select._limit_clause is not None or select._offset_clause is not None or select._fetch_clause is not None:
        reasons.append("slices (LIMIT/OFFSET)")
    for column in select.selected_columns:
        for element in _walk(column):
            if isinstance(element, Over):
                reasons.append("uses a window function")
            elif isinstance(element, FunctionElement) and _function_kind(element) == "aggregate":
                reasons.append(f"aggregates ({element.name})")
    return list(dict.fromkeys(reasons))


def _correlated_nodes(select: Select[Any], all_froms: list[Any], outer: list[Any]) -> set[int]:
    """FROM elements SQLAlchemy will correlate to the enclosing statement (as its compiler does)."""
    outer_ids = {id(_node(o)) for o in outer}
    candidates = {id(_node(f)) for f in all_froms if id(_node(f)) in outer_ids}
    if select._correlate_except is not None:
        excepted = {id(_node(f)) for f in select._correlate_except}
        return {c for c in candidates if c not in excepted}
    if select._correlate:
        chosen = {id(_node(f)) for f in select._correlate}
        return {c for c in candidates if c in chosen}
    if select._auto_correlate and len(all_froms) > 1:
        return candidates
    return set()


def _check_select(select: Select[Any], outer: list[Any], context: str,
                  final_froms: list[Any] | None = None) -> list[Any]:
    """Check the joins and nested subqueries of one SELECT; return its (sharded) FROM nodes.

    ``outer`` are the FROM nodes of the enclosing statements (already known to
    live together); when it is non-empty, this SELECT is a subquery that must
    be tied to them on the shard key.
    """
    if select._independent_ctes:
        raise _refuse("gather cannot merge CTEs added with add_cte(); select from them instead")
    all_froms = list(select.get_final_froms()) if final_froms is None else final_froms
    correlated = _correlated_nodes(select, all_froms, outer)
    froms = _Froms()
    for element in all_froms:
        _flatten(element, froms, correlated)

    # A table read both here and by the enclosing statement is two row sources: a column binds to
    # this SELECT's own FROM first (as SQL resolves names), so the two get different keys.
    local = {id(n) for n in froms.nodes}
    outer_ids = {id(_node(o)) for o in outer}

    def source(node: Any) -> tuple[str, int] | None:
        if id(node) in local:
            return ("here", id(node))
        return ("outer", id(node)) if id(node) in outer_ids else None

    components = _Components()
    for node in froms.nodes:
        components.add(source(node))
    outer_keys = [("outer", id(_node(o))) for o in outer]
    for key in outer_keys:
        components.add(key)
        components.union(outer_keys[0], key)  # the enclosing rows already live together
    for condition in [*froms.conditions, *_conjuncts(select.whereclause)]:
        if isinstance(condition, BinaryExpression) and condition.operator is operators.eq:
            left, right = _shard_key(condition.left), _shard_key(condition.right)
            if left and right and left[0] == right[0]:
                a, b = source(left[1]), source(right[1])
                if a is not None and b is not None:
                    components.union(a, b)
    anchors = outer_keys[:1] if outer else [source(n) for n in froms.nodes[:1]]
    apart = [n for n in froms.nodes if not any(components.together(source(n), a) for a in anchors)]
    if apart:
        if outer:
            raise _refuse(
                f"gather cannot run {context} ({_sql(select)}) on each shard: it reads "
                f"{', '.join(_from_name(n) for n in apart)} without tying those rows to the outer row's shard, so "
                f"it would see only the rows of the shard it runs on. Correlate it on the shard key (e.g. "
                f"Report.location_id == WeatherLocation.id, or continent == continent), or gather it first and "
                f"pass its values in with bindparam(..., expanding=True)"
            )
        raise _refuse(
            f"gather cannot merge a join of {', '.join(_from_name(n) for n in froms.nodes)} that is not on the shard "
            f"key: matching rows may live on different shards. Join on continent, on location id "
            f"(Report.location_id == WeatherLocation.id), or gather each side and join in Python"
        )

    scope = [*outer, *froms.nodes]
    expressions = [
        *select.selected_columns, *froms.conditions, *_conjuncts(select.whereclause),
        *select._order_by_clauses, *select._group_by_clauses, *select._having_criteria,
    ]
    for expression in expressions:
        _check_nested(expression, scope)
    return froms.nodes


def _check_nested(expression: Any, scope: list[Any]) -> None:
    """Subqueries inside a WHERE / SELECT-list / ON / ORDER BY expression."""
    stack = [expression]
    while stack:
        element = stack.pop()
        if isinstance(element, BinaryExpression) and element.operator is operators.in_op:
            if isinstance(element.right, ScalarSelect) and _is_key_membership(element.left, element.right.element, scope):
                continue
        if not isinstance(element, _NESTED_SELECTS):
            if not _is_table_like(element):
                stack.extend(element.get_children())
            continue
        if isinstance(element, Exists):
            element = element.element
        if isinstance(element, ScalarSelect):
            element = element.element
        if isinstance(element, CompoundSelect):
            raise _refuse(
                f"gather cannot merge a subquery using {_set_operation(element)} ({_sql(element)}): it would "
                f"run on each shard's rows only; gather each part and combine them in Python"
            )
        if isinstance(element, Select):
            _check_select(element, scope, "the subquery")


def check_locality(statement: Any) -> None:
    """Raise :class:`GatherRefused` unless every shard can answer ``statement`` for its own rows.

    The co-location rule above, for a SELECT or each part of a set operation;
    the sharded session applies it too (:func:`shardlib.analysis.locality_problem`).
    """
    parts = statement.selects if isinstance(statement, CompoundSelect) else [statement]
    for part in parts:
        if isinstance(part, CompoundSelect):
            check_locality(part)
        elif isinstance(part, Select):
            _check_select(part, outer=[], context="the statement")


def _is_key_membership(left: Any, inner: Any, scope: list[Any]) -> bool:
    """``outer.key IN (SELECT key FROM ... WHERE ...)``: each outer row can only match rows of its own shard."""
    outer_key = _shard_key(left)
    if outer_key is None or id(outer_key[1]) not in {id(_node(s)) for s in scope} or not isinstance(inner, Select):
        return False
    columns = list(inner.selected_columns)
    if len(columns) != 1 or _not_row_wise(inner):
        return False
    inner_key = _shard_key(columns[0])
    if inner_key is None or inner_key[0] != outer_key[0]:
        return False
    try:
        nodes = _check_select(inner, [], "the IN subquery")  # its own joins must be on the shard key
    except GatherRefused:
        return False
    return any(n is inner_key[1] for n in nodes)


def _set_operation(compound: CompoundSelect) -> str:
    """``UNION``, ``UNION ALL``, ``EXCEPT``, ... for a compound select."""
    return str(compound.keyword.name).replace("_", " ")


# ===================================================================== ORDER BY / GROUP BY references

_ORDER_MODIFIERS = (operators.desc_op, operators.asc_op, operators.nulls_first_op, operators.nulls_last_op)


def _order_items(statement: Select[Any]) -> list[tuple[Any, bool, bool | None]]:
    """(expression, descending, explicit nulls_first or None) per ORDER BY item.

    ``order_by(label)`` and ``order_by(label.desc())`` arrive wrapped in a
    label reference, which may sit outside the DESC / NULLS modifiers.
    """
    items = []
    for clause in statement._order_by_clauses:
        descending, nulls_first = False, None
        while True:
            if isinstance(clause, _label_reference):
                clause = clause.element
            elif isinstance(clause, UnaryExpression) and clause.modifier in _ORDER_MODIFIERS:
                if clause.modifier is operators.desc_op:
                    descending = True
                elif clause.modifier is operators.nulls_first_op:
                    nulls_first = True
                elif clause.modifier is operators.nulls_last_op:
                    nulls_first = False
                clause = clause.element
            else:
                break
        items.append((clause, descending, nulls_first))
    return items


def _nulls_first(dialect_name: str, descending: bool, explicit: bool | None) -> bool:
    if explicit is not None:
        return explicit
    null_is_smallest = dialect_name in ("sqlite", "mysql", "mariadb", "mssql")
    return null_is_smallest != descending


def _textual(expr: Any) -> str | None:
    """The SQL text of ``text("...")``, ``literal_column("...")`` or ``order_by("name")``."""
    if isinstance(expr, _textual_label_reference):
        return str(expr.element)
    if isinstance(expr, TextClause):
        return expr.text.strip()
    if isinstance(expr, ColumnClause) and expr.is_literal:
        return expr.name.strip()
    return None


def _column_name(column: Any, key: str) -> set[str]:
    names = {key}
    if isinstance(column, Label):
        names.add(column.name)
    elif isinstance(column, ColumnClause):
        names.add(column.name)
    return names


def _resolve_reference(expr: Any, columns: Sequence[Any], keys: Sequence[str], where: str,
                       by_name: bool = True) -> int | None:
    """The selected column that a positional or textual reference names; None for other expressions."""
    text = _textual(expr)
    if text is None:
        return None
    shown = ", ".join(f"{i + 1}={k}" for i, k in enumerate(keys))
    if text.isdigit():
        position = int(text)
        if not 1 <= position <= len(columns):
            raise _refuse(
                f"gather cannot resolve {where} position {position}: the SELECT list has {len(columns)} "
                f"column(s) ({shown})"
            )
        return position - 1
    if by_name:
        matches = [i for i, (c, k) in enumerate(zip(columns, keys)) if text in _column_name(c, k)]
        if where == "GROUP BY":  # PostgreSQL reads a GROUP BY name as a table column first, SQLite as a label
            matches = [i for i in matches if isinstance(columns[i], ColumnClause) and columns[i].name == text]
            if any(isinstance(c, Label) and c.name == text for c in columns):
                matches = []
        if len(matches) == 1:
            return matches[0]
    raise _refuse(
        f"gather cannot merge {where} {text!r}: it is not a position or the name of exactly one selected "
        f"column ({shown}); use the column object (e.g. order_by(WeatherLocation.city)) or a selected label"
    )


def _uncollated(expr: Any) -> Any:
    expr = _unlabel(expr)
    if isinstance(expr, BinaryExpression) and expr.operator is operators.collate:
        return expr.left
    return expr


def _find(expr: Any, columns: Sequence[Any]) -> int | None:
    """Position of ``expr`` among ``columns``: the same expression, or that expression with a COLLATE."""
    position = next((i for i, c in enumerate(columns) if _same(expr, c)), None)
    if position is None:
        bare = _uncollated(expr)
        position = next((i for i, c in enumerate(columns) if _same(bare, _uncollated(c))), None)
    return position


def _int_clause(statement: Select[Any], attribute: str) -> int | None:
    try:
        return getattr(statement, attribute)
    except Exception as error:  # a limit given as an expression, not a number
        raise _refuse(f"gather needs a literal integer {attribute[1:].upper()}, got an expression") from error


@functools.lru_cache(maxsize=16)
def _dialect(name: str) -> Dialect:
    from sqlalchemy.dialects import registry

    return registry.load(name)()  # type: ignore[no-any-return]


def _compile(statement: Any, dialect: Dialect) -> tuple[list[str], list[Any]]:
    """Result column names and FROM elements, from one compilation (building the ORM compile
    state is the expensive part of both ``compile()`` and ``get_final_froms()``)."""
    compiled = statement.compile(dialect=dialect)
    keys = [c[0] for c in compiled._result_columns]
    state = getattr(compiled, "compile_state", None)
    if hasattr(state, "_get_display_froms"):
        froms = state._get_display_froms()
    else:  # a compound select has no FROM list of its own
        froms = statement.get_final_froms() if isinstance(statement, Select) else []
    return keys, list(froms)


# ===================================================================== merging


@dataclass(frozen=True)
class OrderKey:
    """One ORDER BY item, resolved to a position in the fetched row, with its collation."""

    position: int
    descending: bool
    nulls_first: bool
    fold: Callable[[str], str] = _identity


def _compare(keys: Sequence[OrderKey], a: Sequence[Any], b: Sequence[Any]) -> int:
    for key in keys:
        x, y = a[key.position], b[key.position]
        if x is None or y is None:
            if x is None and y is None:
                continue
            return (-1 if x is None else 1) * (1 if key.nulls_first else -1)
        kx, ky = _value_key(x, key.fold), _value_key(y, key.fold)
        if kx == ky:
            continue
        result = -1 if kx < ky else 1
        return -result if key.descending else result
    return 0


def _dedupe(rows: Iterable[tuple[Any, ...]], folds: Sequence[Callable[[str], str]]) -> list[tuple[Any, ...]]:
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for row in rows:
        visible = tuple(None if v is None else _value_key(v, f) for v, f in zip(row, folds))
        if visible not in seen:
            seen.add(visible)
            kept.append(row)
    return kept


@dataclass(frozen=True)
class Aggregate:
    """An output column computed from partial aggregates at ``positions``."""

    name: str
    positions: tuple[int, ...]
    fold: Callable[[str], str] = _identity


def _combine(aggregate: Aggregate, partials: list[tuple[Any, ...]], dialect_name: str) -> Any:
    name = aggregate.name
    if name == "count":
        return sum(p[0] for p in partials)
    if name == "total":
        return float(sum(p[0] for p in partials))
    if name == "avg":
        sums = [p[0] for p in partials if p[0] is not None]
        count = sum(p[1] for p in partials)
        if count == 0:
            return None
        total = sum(sums)
        if isinstance(total, int) and dialect_name == "postgresql":
            return Decimal(total) / Decimal(count)  # PostgreSQL: avg(integer) is numeric
        return total / count
    values = [p[0] for p in partials if p[0] is not None]
    if not values:
        return None
    if name == "sum":
        return sum(values[1:], values[0])
    if name in ("min", "max"):
        pick = min if name == "min" else max
        return pick(values, key=lambda v: _value_key(v, aggregate.fold))
    if name in ("bool_and", "every"):
        return all(values)
    return any(values)  # bool_or


def _rows(keys: Sequence[str], rows: list[tuple[Any, ...]]) -> list[Row[Any]]:
    return IteratorResult(SimpleResultMetaData(list(keys)), iter(rows)).all()  # type: ignore[arg-type]


@dataclass
class GatherPlan:
    """What each shard runs and how their answers combine into the unsharded answer.

    ``kind`` is ``"rows"``, ``"aggregate"``, ``"one_shard"`` (no table: run
    on any one shard) or ``"exists"`` (one row per shard, combined column by
    column with OR / AND). ``merge`` is pure Python: give it each shard's
    rows (tuples, in the shard's own order) and it returns the merged rows.
    """

    kind: str
    shard_statement: Any
    keys: tuple[str, ...]
    dialect_name: str
    width: int
    order: tuple[OrderKey, ...] = ()
    limit: int | None = None
    offset: int | None = None
    distinct_folds: tuple[Callable[[str], str], ...] | None = None
    group_folds: tuple[Callable[[str], str], ...] = ()
    outputs: tuple[Aggregate | int, ...] = ()
    exists_modes: tuple[str, ...] = ()  # per column: "any", "or", "and"
    routing_statements: tuple[Any, ...] = ()

    @property
    def one_shard(self) -> bool:
        """True when every shard gives the same answer: run the statement on one of them."""
        return self.kind == "one_shard"

    def shards(self, params: Mapping[str, Any] | None = None) -> list[str]:
        """The shards that must run ``shard_statement`` (never empty: an empty answer still needs one)."""
        if self.kind == "one_shard":
            return [SERVING_SHARD_IDS[0]]
        needed: set[str] = set()
        for statement in self.routing_statements:
            needed.update(routecache.shards(statement, params))  # shards_for, remembered
        return [s for s in SERVING_SHARD_IDS if s in needed] or [SERVING_SHARD_IDS[0]]

    def merge(self, per_shard_rows: Sequence[Sequence[Sequence[Any]]]) -> list[tuple[Any, ...]]:
        """Combine the rows each shard returned for ``shard_statement`` (one list per shard)."""
        per_shard = [[tuple(r) for r in rows] for rows in per_shard_rows]
        if self.kind == "one_shard":
            if not per_shard:
                raise ValueError("merge needs the answer of one shard")
            return per_shard[0]
        if self.kind == "exists":
            return self._merge_exists(per_shard)
        if self.kind == "aggregate":
            rows = self._merge_groups(per_shard)
            if self.order:
                rows = sorted(rows, key=functools.cmp_to_key(functools.partial(_compare, self.order)))
        elif self.order:  # each shard's stream is already sorted: merge, don't re-sort
            rows = list(heapq.merge(*per_shard, key=functools.cmp_to_key(functools.partial(_compare, self.order))))
        else:
            rows = [row for rows in per_shard for row in rows]
        if self.distinct_folds is not None:
            rows = _dedupe(rows, self.distinct_folds)
        start = self.offset or 0
        rows = rows[start:] if self.limit is None else rows[start : start + self.limit]
        return [row[: self.width] for row in rows]

    def _merge_exists(self, per_shard: list[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        answers = [rows[0] for rows in per_shard if rows]
        if not answers:
            raise ValueError("merge needs the answer of at least one shard")
        merged = []
        for i, mode in enumerate(self.exists_modes):
            values = [a[i] for a in answers]
            if mode == "or":
                merged.append(next((v for v in values if v), values[0]))
            elif mode == "and":
                merged.append(next((v for v in values if not v), values[0]))
            else:
                merged.append(values[0])
        return [tuple(merged)]

    def _merge_groups(self, per_shard: list[list[tuple[Any, ...]]]) -> list[tuple[Any, ...]]:
        width = len(self.group_folds)
        groups: dict[tuple[Any, ...], tuple[tuple[Any, ...], list[tuple[Any, ...]]]] = {}
        for rows in per_shard:
            for row in rows:
                raw = row[:width]
                folded = tuple(None if v is None else _value_key(v, f) for v, f in zip(raw, self.group_folds))
                groups.setdefault(folded, (raw, []))[1].append(row)
        if not width and not groups:
            groups[()] = ((), [])
        merged = []
        for raw, partial_rows in groups.values():
            values = []
            for output in self.outputs:
                if isinstance(output, int):
                    values.append(raw[output])
                else:
                    values.append(_combine(output, [tuple(r[p] for p in output.positions) for r in partial_rows],
                                           self.dialect_name))
            merged.append(tuple(values) + raw)
        return merged


# ===================================================================== planning


def plan(statement: Any, dialect_name: str | Dialect) -> GatherPlan:
    """Analyse ``statement`` for a scatter-gather on ``dialect_name`` shards.

    Returns a :class:`GatherPlan`, or raises :class:`GatherRefused` naming the
    construct that cannot be merged exactly and what to do instead. No engine,
    no event loop: the plan is pure data plus a pure-Python ``merge``.

    >>> from sqlalchemy import select, func
    >>> from shardlib import WeatherLocation
    >>> p = plan(select(func.count()).select_from(WeatherLocation), "sqlite")
    >>> p.merge([[(3,)], [(4,)], [(0,)], [(1,)]])
    [(8,)]
    """
    dialect = dialect_name if isinstance(dialect_name, Dialect) else _dialect(dialect_name)
    name = dialect.name
    if isinstance(statement, CompoundSelect):
        return _plan_compound(statement, dialect)
    if not isinstance(statement, Select):
        raise TypeError(f"gather takes a select(), got {type(statement).__name__}")
    if statement._having_criteria:
        raise _refuse("gather cannot merge HAVING; filter the merged rows in Python")
    if statement._distinct_on:
        raise _refuse("gather cannot merge DISTINCT ON; gather DISTINCT rows ordered by the key and keep the first per key")
    if statement._fetch_clause is not None:
        raise _refuse("gather cannot merge FETCH FIRST; use limit()")

    columns = list(statement.selected_columns)
    order_items = _order_items(statement)
    aggregated = bool(statement._group_by_clauses)
    for column in columns:
        aggregated = _check_expression(column, "the SELECT list") or aggregated
    for item, _, _ in order_items:
        aggregated = _check_expression(item, "ORDER BY") or aggregated
    for key in _group_keys(statement):
        if _check_expression(key, "GROUP BY"):
            raise _refuse(f"gather cannot merge GROUP BY on an aggregate ({_sql(key)})")
    names, final_froms = _compile(statement, dialect)
    keys = tuple(names)

    if not final_froms:
        return _plan_without_from(statement, columns, keys, name, aggregated)
    if all(reads_only_reference(f) for f in final_froms):  # every copy is the same: ask one shard
        return GatherPlan("one_shard", statement, keys, name, len(columns), routing_statements=())

    _check_select(statement, outer=[], context="the statement", final_froms=final_froms)
    limit, offset = _int_clause(statement, "_limit"), _int_clause(statement, "_offset")
    if aggregated:
        return _plan_aggregate(statement, columns, order_items, keys, name, limit, offset)
    return _plan_rows(statement, columns, order_items, keys, name, limit, offset)


def _part_collation(expr: Any, where: str) -> str | None:
    bare = _unlabel(expr)
    if isinstance(bare, ColumnClause) and not bare.is_literal and bare.table is not None:
        return getattr(bare.type, "collation", None) or "BINARY"
    return _collation_name(expr, where)


def _plan_compound(statement: CompoundSelect, dialect: Dialect) -> GatherPlan:
    """``UNION ALL``: every shard's rows; ``UNION``: the same, de-duplicated. Each part must be a
    plain row-wise SELECT over sharded tables, so that a shard's part holds exactly its own rows."""
    operation = _set_operation(statement)
    if operation not in ("UNION", "UNION ALL"):
        raise _refuse(
            f"gather cannot merge {operation}: a row of one part and the matching row of the other may live "
            f"on different shards; gather each part and combine them in Python"
        )
    for part in statement.selects:
        if not isinstance(part, Select):
            raise _refuse(f"gather cannot merge a nested {operation} ({_sql(part)}); gather each part")
        reasons = _not_row_wise(part)
        for column in part.selected_columns:
            _check_expression(column, f"a part of the {operation}")
        if reasons:
            raise _refuse(
                f"gather cannot merge the {operation} part {_sql(part)}: it {' and '.join(reasons)} on each "
                f"shard's rows separately; gather that part on its own"
            )
        if not _has_table(part):
            raise _refuse(
                f"gather cannot merge the {operation} part {_sql(part)}: it reads no table, so every shard "
                f"would return it; add its rows in Python"
            )
        _check_select(part, outer=[], context=f"a part of the {operation}")
    names, _ = _compile(statement, dialect)
    keys, columns = tuple(names), list(statement.selected_columns)
    # A compound's column compares by the collation of the left-most part that has one (SQLite's
    # rule; PostgreSQL refuses conflicting explicit collations). A table column always has one
    # (BINARY unless declared); an expression only through an explicit COLLATE.
    folds = []
    for i in range(len(columns)):
        named = [_part_collation(list(p.selected_columns)[i], operation) for p in statement.selects]
        folds.append(_collation_fold(next((n for n in named if n is not None), None), operation))
    order = []
    for expr, descending, nulls in _order_items(statement):  # type: ignore[arg-type]
        position = _resolve_reference(expr, columns, keys, "ORDER BY")
        if position is None:
            position = _find(expr, columns)
        if position is None:
            raise _refuse(f"gather cannot merge a {operation} ordered by {_sql(expr)}; order by a selected column")
        explicit = _unlabel(expr) is not _uncollated(expr)
        fold = _collation(expr, "ORDER BY") if explicit else folds[position]
        order.append(OrderKey(position, descending, _nulls_first(dialect.name, descending, nulls), fold))
    limit, offset = _int_clause(statement, "_limit"), _int_clause(statement, "_offset")  # type: ignore[arg-type]
    per_shard = statement.limit(limit + (offset or 0)) if limit is not None else statement
    per_shard = per_shard.offset(None)
    distinct = tuple(folds) if operation == "UNION" else None
    return GatherPlan("rows", per_shard, keys, dialect.name, len(columns), tuple(order), limit, offset, distinct,
                      routing_statements=(statement,))


def _plan_without_from(statement: Select[Any], columns: list[Any], keys: tuple[str, ...], name: str,
                       aggregated: bool) -> GatherPlan:
    if not _has_table(statement):  # select(literal(1)), select(func.now()): the same on every shard
        return GatherPlan("one_shard", statement, keys, name, len(columns), routing_statements=())
    clauses = [statement.whereclause, *statement._group_by_clauses, *statement._order_by_clauses]
    if aggregated or any(c is not None for c in clauses) or statement._distinct or \
            statement._limit_clause is not None or statement._offset_clause is not None:
        raise _refuse(
            f"gather cannot merge {_sql(statement)}: a statement with no FROM over subqueries is merged only as "
            f"a list of EXISTS tests; select from the table instead"
        )
    modes, routing = [], []
    for column in columns:
        element, mode = _unlabel(column), "or"
        if isinstance(element, UnaryExpression) and element.operator is operators.inv:
            element, mode = _unlabel(element.element), "and"
        if isinstance(element, Exists):
            inner = element.element.element
            if not isinstance(inner, Select):
                raise _refuse(f"gather cannot merge EXISTS over {type(inner).__name__} ({_sql(element)}); test each part")
            reasons = [r for r in _not_row_wise(inner) if not r.startswith("slices") or inner._offset_clause is not None]
            if reasons:
                raise _refuse(
                    f"gather cannot merge {_sql(column)}: its subquery {' and '.join(reasons)} on each shard's rows "
                    f"only; test the rows, not the groups"
                )
            _check_select(inner, outer=[], context="the EXISTS subquery")
            modes.append(mode)
            routing.append(inner)
        elif not _has_table(column):
            modes.append("any")
        else:
            raise _refuse(
                f"gather cannot merge {_sql(column)} in a statement with no FROM: only EXISTS / NOT EXISTS tests "
                f"and values without tables are merged; select from the table instead (e.g. "
                f"select(func.count()).select_from(WeatherLocation))"
            )
    return GatherPlan("exists", statement, keys, name, len(columns), exists_modes=tuple(modes),
                      routing_statements=tuple(routing))


def _plan_rows(statement: Select[Any], columns: list[Any], order_items: list[tuple[Any, bool, bool | None]],
               keys: tuple[str, ...], name: str, limit: int | None, offset: int | None) -> GatherPlan:
    """Plain rows: each shard sorts and returns LIMIT + OFFSET rows; k-way merge."""
    per_shard = statement
    hidden: list[Any] = []
    order: list[OrderKey] = []
    for i, (expr, descending, nulls) in enumerate(order_items):
        position = _resolve_reference(expr, columns, keys, "ORDER BY")
        if position is not None:
            fold = _collation(columns[position], "ORDER BY")
        else:
            position, fold = _find(expr, columns), _collation(expr, "ORDER BY")
        if position is None:
            if statement._distinct:
                raise _refuse(
                    f"gather cannot merge DISTINCT ordered by {_sql(expr)}, which is not selected; select it too"
                )
            position = len(columns) + len(hidden)
            hidden.append(expr.label(f"_shardlib_order_{i}"))
        order.append(OrderKey(position, descending, _nulls_first(name, descending, nulls), fold))
    if hidden:
        per_shard = per_shard.add_columns(*hidden)
    if limit is not None:
        per_shard = per_shard.limit(limit + (offset or 0))
    per_shard = per_shard.offset(None)
    distinct = tuple(_collation(c, "DISTINCT") for c in columns) if statement._distinct else None
    return GatherPlan("rows", per_shard, keys, name, len(columns), tuple(order), limit, offset, distinct,
                      routing_statements=(statement,))


def _group_keys(statement: Select[Any]) -> list[Any]:
    """The GROUP BY expressions, one per key. SQLAlchemy stores ``group_by(func.lower(c))`` as a
    one-element list holding a label of the function; unwrap both."""
    keys: list[Any] = []
    for clause in statement._group_by_clauses:
        parts = [clause]
        while parts:
            part = parts.pop(0)
            if isinstance(part, ClauseList) and not isinstance(part, BooleanClauseList):
                parts[:0] = list(part.clauses)
            elif isinstance(part, Label):
                keys.append(_unlabel(part))
            else:
                keys.append(part)
    return keys


def _plan_aggregate(statement: Select[Any], columns: list[Any], order_items: list[tuple[Any, bool, bool | None]],
                    keys: tuple[str, ...], name: str, limit: int | None, offset: int | None) -> GatherPlan:
    """Aggregates: per-shard partial aggregates per group, combined in ``merge``.

    Each shard returns its group keys, then the partial aggregates; the merge
    builds one row per group (output columns, then the group keys) and sorts."""
    group_by = []
    for key in _group_keys(statement):
        position = _resolve_reference(key, columns, keys, "GROUP BY")
        group_by.append(_unlabel(columns[position]) if position is not None else key)
    for key in group_by:
        if _aggregate_name(key) is not None:
            raise _refuse(f"gather cannot merge GROUP BY on an aggregate ({_sql(key)})")
    group_folds = tuple(_collation(key, "GROUP BY") for key in group_by)
    fetched: list[Any] = [key.label(f"_shardlib_group_{i}") for i, key in enumerate(group_by)]
    outputs: list[Aggregate | int] = []  # an Aggregate, or the index of a group key
    for column in columns:
        aggregate = _aggregate_name(column)
        if aggregate is None:
            if _check_expression(column, "the SELECT list"):
                raise _refuse(
                    f"gather cannot merge an aggregate inside an expression ({_sql(column)}); "
                    f"select the aggregates and compute the expression from the merged rows"
                )
            key = next((i for i, g in enumerate(group_by) if _same(column, g)), None)
            if key is None:
                raise _refuse(
                    f"gather cannot merge {_sql(column)}: it is neither in GROUP BY nor an aggregate; "
                    f"group by it or aggregate it"
                )
            outputs.append(key)
            continue
        function = _unlabel(column)
        arguments = list(function.clauses)
        if any(isinstance(a, UnaryExpression) and a.operator is operators.distinct_op for a in arguments):
            raise _refuse(f"gather cannot merge {aggregate}(DISTINCT ...) exactly")
        for argument in arguments:
            if _check_expression(argument, f"the argument of {aggregate}()"):
                raise _refuse(f"gather cannot merge an aggregate of an aggregate ({_sql(column)})")
        fold = _collation(arguments[0], f"{aggregate}()") if aggregate in ("min", "max") and arguments else _identity
        start = len(fetched)
        if aggregate == "avg":
            fetched += [func.sum(*arguments), func.count(*arguments)]
        else:
            fetched.append(function)
        outputs.append(Aggregate(aggregate, tuple(range(start, len(fetched))), fold))

    order = []
    for expr, descending, nulls in order_items:
        position = _resolve_reference(expr, columns, keys, "ORDER BY")
        if position is not None:
            fold = _collation(columns[position], "ORDER BY")
        else:
            position = _find(expr, columns)
            fold = _collation(expr, "ORDER BY")
            if position is None:
                key = next((i for i, g in enumerate(group_by) if _same(expr, g) or _same(_uncollated(expr), _uncollated(g))), None)
                if key is None:
                    raise _refuse(
                        f"gather cannot order merged groups by {_sql(expr)}; order by a selected column or a "
                        f"GROUP BY key"
                    )
                position = len(columns) + key
        order.append(OrderKey(position, descending, _nulls_first(name, descending, nulls), fold))

    per_shard = statement.with_only_columns(*fetched, maintain_column_froms=True)
    per_shard = per_shard.group_by(None).group_by(*group_by).order_by(None).limit(None).offset(None)
    distinct = tuple(_collation(c, "DISTINCT") for c in columns) if statement._distinct else None
    return GatherPlan("aggregate", per_shard, keys, name, len(columns), tuple(order), limit, offset, distinct,
                      group_folds, tuple(outputs), routing_statements=(statement,))


# ===================================================================== running it


async def _fetch(engine: AsyncEngine, statement: Any, params: Any) -> list[tuple[Any, ...]]:
    conn = await engine.connect()
    try:
        result = await conn.execute(statement, params)
        return [tuple(row) for row in result]
    finally:
        await _close(conn)


async def _close(conn: Any) -> None:
    """Close ``conn`` and wait until it is back in its pool, even if this task is cancelled meanwhile."""
    closing = asyncio.ensure_future(conn.close())
    cancelled = False
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError:
            cancelled = True
    closing.result()
    if cancelled:
        raise asyncio.CancelledError


async def _run_all(engines: Mapping[str, AsyncEngine], shards: list[str], statement: Any, params: Any,
                   timeout: float | None) -> list[list[tuple[Any, ...]]]:
    tasks = {shard: asyncio.ensure_future(_fetch(engines[shard], statement, params)) for shard in shards}
    try:
        done, pending = await asyncio.wait(tasks.values(), timeout=timeout, return_when=asyncio.FIRST_EXCEPTION)
    except BaseException:  # gather itself was cancelled: cancel the shards, wait for their connections
        await _cancel(tasks.values())
        raise
    failed = [s for s, t in tasks.items() if t in done and not t.cancelled() and t.exception() is not None]
    if failed:
        still_running = [s for s, t in tasks.items() if t in pending]
        await _cancel(pending)
        error = tasks[failed[0]].exception()
        assert error is not None
        raise ShardFailed(failed[0], error, still_running) from error
    if pending:
        waiting = [s for s, t in tasks.items() if t in pending]
        await _cancel(pending)
        answered = [s for s in shards if s not in waiting]
        raise TimeoutError(
            f"gather timed out after {timeout} s: no answer from {', '.join(map(repr, waiting))} "
            f"(cancelled; answered: {', '.join(map(repr, answered)) or 'none'})"
        )
    return [tasks[s].result() for s in shards]


async def _cancel(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended (its connection back in its pool), even if the
    caller is cancelled again meanwhile; then pass that cancellation on."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    interrupted = False
    while not all(task.done() for task in tasks):
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            interrupted = True
    for task in tasks:  # a shard cancelled mid-statement may end with its own error (ShardUnavailable):
        if not task.cancelled():  # expected here, so mark it seen ("Task exception was never retrieved")
            task.exception()
    if interrupted:
        raise asyncio.CancelledError


async def gather(
    engines: Mapping[str, AsyncEngine], statement: Select[Any], params: Mapping[str, Any] | None = None,
    *, timeout: float | None = None,
) -> list[Row[Any]]:
    """Run ``statement`` on every shard it needs, concurrently, and merge the answers into
    exactly what one unsharded database would return, or raise :class:`GatherRefused`.

    ``statement`` is a column-oriented ``select()`` (columns, expressions and
    the aggregates of :data:`AGGREGATES`; ORM attributes welcome). Returns a
    list of ``Row`` objects named as a Core connection names them (an
    unlabeled ``count(*)`` is ``count_1``; label aggregates to choose).

    ``timeout`` (seconds) bounds the whole call: on expiry every shard still
    running is cancelled and ``TimeoutError`` names them. If a shard fails,
    the others are cancelled and :class:`ShardFailed` names it. Either way,
    every connection is back in its pool when the exception arrives.
    """
    some_engine = next(iter(engines.values()))
    the_plan = routecache.plan(statement, some_engine.dialect, plan)  # remembered per statement + values
    shards = the_plan.shards(params)
    answers = await _run_all(engines, shards, the_plan.shard_statement, params, timeout)
    return _rows(the_plan.keys, the_plan.merge(answers))
