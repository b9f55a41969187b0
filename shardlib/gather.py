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
=====================================  ==========================================

:func:`gather` does what Citus and Vitess do on their coordinator:

* **fan out in parallel**: one connection per shard, ``asyncio.gather``, so
  the wall time is the slowest shard, not the sum of all of them;
* **push down** as much as can be merged exactly: each shard sorts, and is
  asked for ``LIMIT + OFFSET`` rows (the global slice can start anywhere);
  aggregates become *partial* aggregates (``avg(x)`` becomes ``sum(x)`` and
  ``count(x)``: never an average of averages);
* **merge** on the coordinator: a k-way merge of the sorted streams (NULLs
  placed as the database places them), the global ``OFFSET``/``LIMIT``,
  partial aggregates combined per group, ``DISTINCT`` applied last.

Text is compared in Python (code-point order) when merging, which matches
SQLite's default ``BINARY`` collation and PostgreSQL's ``"C"`` collation
(``scripts/pg.sh`` creates its cluster with ``--locale=C``). Under a
language-aware collation (``en_US.UTF-8``) order text by a binary collation,
``column.collate("C")``, or the merged order may differ from the database's.

What cannot be merged exactly (window functions, ``HAVING``,
``count(DISTINCT x)``, ``DISTINCT ON``, an aggregate inside an expression, a
column that is neither grouped nor aggregated, ``UNION``) raises
``NotImplementedError`` naming the construct: never a silently wrong answer.

What it gives up: each shard runs in its own transaction, so there is no
snapshot across shards: a row moved between shards during the query can be
seen twice or not at all.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Row, func
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import (
    FunctionFilter,
    Label,
    Over,
    UnaryExpression,
    WithinGroup,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Select

from .routing import shards_for
from .shards import SHARD_IDS

AGGREGATES = ("count", "sum", "min", "max", "avg")


@dataclass(frozen=True)
class OrderKey:
    """One ORDER BY item, resolved to a position in the fetched row."""

    position: int
    descending: bool
    nulls_first: bool


@dataclass(frozen=True)
class Aggregate:
    """An output column computed from partial aggregates at ``positions``."""

    name: str
    positions: tuple[int, ...]


# ----------------------------------------------------------------- analysis


def _unlabel(expr: Any) -> Any:
    while isinstance(expr, Label):
        expr = expr.element
    return expr


def _aggregate_name(expr: Any) -> str | None:
    expr = _unlabel(expr)
    if isinstance(expr, FunctionElement) and expr.name.lower() in AGGREGATES:
        return expr.name.lower()
    return None


def _refuse_unmergeable(expr: Any, where: str) -> None:
    """NotImplementedError for constructs inside ``expr`` that cannot be merged."""
    for element in visitors.iterate(expr):
        if isinstance(element, Over):
            raise NotImplementedError(f"gather cannot merge window functions ({element}) in {where}")
        if isinstance(element, (FunctionFilter, WithinGroup)):
            raise NotImplementedError(f"gather cannot merge {type(element).__name__} aggregates in {where}")


def _contains_aggregate(expr: Any) -> bool:
    return any(_aggregate_name(e) for e in visitors.iterate(expr))


def _same(a: Any, b: Any) -> bool:
    a, b = _unlabel(a), _unlabel(b)
    return a is b or a.compare(b)


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


def _find(expr: Any, columns: Sequence[Any]) -> int | None:
    """Position of ``expr`` among ``columns``: the same expression, or the label
    that ``order_by("name")`` names."""
    if isinstance(expr, _textual_label_reference):
        return next((i for i, c in enumerate(columns) if isinstance(c, Label) and c.name == expr.element), None)
    return next((i for i, c in enumerate(columns) if _same(expr, c)), None)


def _group_index(expr: Any, group_by: Sequence[Any]) -> int | None:
    """Position of ``expr`` among the GROUP BY expressions."""
    return next((i for i, g in enumerate(group_by) if _same(expr, g)), None)


def _int_clause(statement: Select[Any], attribute: str) -> int | None:
    try:
        return getattr(statement, attribute)
    except Exception as error:  # a limit given as an expression, not a number
        raise NotImplementedError(f"gather needs a literal integer {attribute[1:].upper()}") from error


# ----------------------------------------------------------------- merging


def _compare(keys: Sequence[OrderKey], a: Sequence[Any], b: Sequence[Any]) -> int:
    for key in keys:
        x, y = a[key.position], b[key.position]
        if x is None or y is None:
            if x is None and y is None:
                continue
            return (-1 if x is None else 1) * (1 if key.nulls_first else -1)
        if x == y:
            continue
        result = -1 if x < y else 1
        return -result if key.descending else result
    return 0


def _distinct(rows: list[tuple[Any, ...]], width: int) -> list[tuple[Any, ...]]:
    seen: set[tuple[Any, ...]] = set()
    kept = []
    for row in rows:
        visible = row[:width]
        if visible not in seen:
            seen.add(visible)
            kept.append(row)
    return kept


def _combine(name: str, partials: list[tuple[Any, ...]]) -> Any:
    if name == "count":
        return sum(p[0] for p in partials)
    if name == "avg":
        total = [p[0] for p in partials if p[0] is not None]
        count = sum(p[1] for p in partials)
        return None if count == 0 else sum(total) / count
    values = [p[0] for p in partials if p[0] is not None]
    if not values:
        return None
    return {"sum": sum, "min": min, "max": max}[name](values)


async def _fetch(engine: AsyncEngine, statement: Any, params: Any) -> list[tuple[Any, ...]]:
    async with engine.connect() as conn:
        result = await conn.execute(statement, params)
        return [tuple(row) for row in result]


def _rows(keys: Sequence[str], rows: list[tuple[Any, ...]]) -> list[Row[Any]]:
    return IteratorResult(SimpleResultMetaData(list(keys)), iter(rows)).all()  # type: ignore[arg-type]


# ----------------------------------------------------------------- the entry point


async def gather(
    engines: Mapping[str, AsyncEngine], statement: Select[Any], params: Mapping[str, Any] | None = None
) -> list[Row[Any]]:
    """Run ``statement`` on every shard :func:`~shardlib.shards_for` picks, concurrently,
    and merge the answers into exactly what one unsharded database would return.

    ``statement`` is a column-oriented ``select()`` (columns, expressions and
    the aggregates count, sum, min, max, avg; ORM attributes welcome). Returns
    a list of ``Row`` objects named as a Core connection names them (an
    unlabeled ``count(*)`` is ``count_1``; label aggregates to choose).
    """
    if isinstance(statement, CompoundSelect):
        raise NotImplementedError("gather cannot merge UNION / INTERSECT / EXCEPT; gather each part")
    if not isinstance(statement, Select):
        raise TypeError(f"gather takes a select(), got {type(statement).__name__}")
    if statement._having_criteria:
        raise NotImplementedError("gather cannot merge HAVING; filter the merged rows in Python")
    if statement._distinct_on:
        raise NotImplementedError("gather cannot merge DISTINCT ON")

    columns = list(statement.selected_columns)
    for column in columns:
        _refuse_unmergeable(column, "the SELECT list")
    for item, _, _ in _order_items(statement):
        _refuse_unmergeable(item, "ORDER BY")
    shards = shards_for(statement, params) or [SHARD_IDS[0]]
    dialect = engines[shards[0]].dialect.name
    limit, offset = _int_clause(statement, "_limit"), _int_clause(statement, "_offset")
    group_by = list(statement._group_by_clauses)
    aggregated = bool(group_by) or any(_contains_aggregate(c) for c in columns)

    if aggregated:
        rows, order = await _gather_aggregates(engines, shards, statement, columns, group_by, params, dialect)
    else:
        rows, order = await _gather_rows(engines, shards, statement, columns, limit, offset, params, dialect)

    width = len(columns)
    if order:
        rows = sorted(rows, key=functools.cmp_to_key(functools.partial(_compare, order)))
    if statement._distinct:
        rows = _distinct(rows, width)
    start = offset or 0
    rows = rows[start:] if limit is None else rows[start : start + limit]
    names = [c[0] for c in statement.compile(dialect=engines[shards[0]].dialect)._result_columns]
    return _rows(names[:width], [row[:width] for row in rows])


async def _gather_rows(
    engines: Mapping[str, AsyncEngine], shards: list[str], statement: Select[Any],
    columns: list[Any], limit: int | None, offset: int | None, params: Any, dialect: str,
) -> tuple[list[tuple[Any, ...]], list[OrderKey]]:
    """Plain rows: each shard sorts and returns LIMIT + OFFSET rows; k-way merge.

    Returns the merged rows and no sort keys: they are already in order."""
    per_shard = statement
    hidden: list[Any] = []
    order: list[OrderKey] = []
    for i, (expr, descending, nulls) in enumerate(_order_items(statement)):
        position = _find(expr, columns)
        if position is None:
            if statement._distinct:
                raise NotImplementedError(
                    f"gather cannot merge DISTINCT ordered by {expr}, which is not selected"
                )
            position = len(columns) + len(hidden)
            hidden.append(expr.label(f"_shardlib_order_{i}"))
        order.append(OrderKey(position, descending, _nulls_first(dialect, descending, nulls)))
    if hidden:
        per_shard = per_shard.add_columns(*hidden)
    if limit is not None:
        per_shard = per_shard.limit(limit + (offset or 0))
    per_shard = per_shard.offset(None)

    results = await asyncio.gather(*(_fetch(engines[s], per_shard, params) for s in shards))
    if order:  # each shard's stream is already sorted: merge, don't re-sort
        return list(heapq.merge(*results, key=functools.cmp_to_key(functools.partial(_compare, order)))), []
    return [row for result in results for row in result], []


async def _gather_aggregates(
    engines: Mapping[str, AsyncEngine], shards: list[str], statement: Select[Any],
    columns: list[Any], group_by: list[Any], params: Any, dialect: str,
) -> tuple[list[tuple[Any, ...]], list[OrderKey]]:
    """Aggregates: per-shard partial aggregates per group, combined here.

    Returns one row per group (output columns, then the group keys) and the
    sort keys the caller must apply."""
    fetched: list[Any] = [key.label(f"_shardlib_group_{i}") for i, key in enumerate(group_by)]
    outputs: list[Aggregate | int] = []  # an Aggregate, or the index of a group key
    for column in columns:
        name = _aggregate_name(column)
        if name is None:
            if _contains_aggregate(column):
                raise NotImplementedError(
                    f"gather cannot merge an aggregate inside an expression ({column}); "
                    f"select the aggregates and compute the expression from the merged rows"
                )
            key = _group_index(column, group_by)
            if key is None:
                raise NotImplementedError(
                    f"gather cannot merge {column}: it is neither in GROUP BY nor an aggregate"
                )
            outputs.append(key)
            continue
        function = _unlabel(column)
        arguments = list(function.clauses)
        if any(isinstance(a, UnaryExpression) and a.operator is operators.distinct_op for a in arguments):
            raise NotImplementedError(f"gather cannot merge {name}(DISTINCT ...) exactly")
        start = len(fetched)
        if name == "avg":
            fetched += [func.sum(*arguments), func.count(*arguments)]
        else:
            fetched.append(function)
        outputs.append(Aggregate(name, tuple(range(start, len(fetched)))))

    per_shard = statement.with_only_columns(*fetched, maintain_column_froms=True)
    per_shard = per_shard.order_by(None).limit(None).offset(None)
    results = await asyncio.gather(*(_fetch(engines[s], per_shard, params) for s in shards))

    groups: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
    for result in results:
        for row in result:
            groups.setdefault(row[: len(group_by)], []).append(row)
    if not group_by and not groups:
        groups[()] = []
    rows = []
    for group_key, partial_rows in groups.items():
        values = []
        for output in outputs:
            if isinstance(output, int):
                values.append(group_key[output])
            else:
                values.append(_combine(output.name, [tuple(r[p] for p in output.positions) for r in partial_rows]))
        rows.append(tuple(values) + group_key)

    order = []
    for expr, descending, nulls in _order_items(statement):
        position = _find(expr, columns)
        if position is None:
            key = _group_index(expr, group_by)
            if key is None:
                raise NotImplementedError(f"gather cannot order merged groups by {expr}; order by a selected column")
            position = len(columns) + key
        order.append(OrderKey(position, descending, _nulls_first(dialect, descending, nulls)))
    return rows, order
