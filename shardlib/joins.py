"""Cross-shard joins: an application-side hash join over a fan-out of each side.

A join whose matching rows may live on different shards cannot run shard by
shard: London (Europe) and London (North America) are on two shards, and no
shard sees the pair. The session refuses it (:mod:`shardlib.execution`) unless
asked to join in the application::

    a, b = aliased(WeatherLocation), aliased(WeatherLocation)
    pairs = (select(a.city, a.continent, b.continent)
             .join(b, and_(a.city == b.city, a.continent < b.continent))
             .execution_options(shardlib_cross_shard_join=True))

What runs is what Citus calls a repartition join, with the application as the
one place the rows meet:

1. each side's own conditions are pushed into its own SELECT (``a.city =
   'London'`` goes to ``a``'s SELECT, routed to the shards it needs, lookups
   included), and each side is read from its shards inside the session;
2. the smaller side is put into a hash table on the equality keys of the join
   (``a.city = b.city``); a NULL key matches nothing, as in SQL;
3. the other side probes it; conditions on both sides that are not
   equalities (``a.continent < b.continent``) are checked on each pair, with
   SQL's three-valued logic (a comparison with NULL is not true);
4. the selected columns are projected, then ``DISTINCT``, ``ORDER BY`` (NULLs
   where the database puts them, text by code point as SQLite and PostgreSQL's
   ``"C"`` collation sort it) and ``LIMIT``/``OFFSET`` are applied.

So the answer is the one a single database holding every row would give.
The cost is that both sides' matching rows travel to the application: filter
each side as much as you can. It is opt-in for that reason (Citus too
requires ``citus.enable_repartition_joins``).

What it joins: an inner join of two sharded tables (or aliases), with at
least one equality between them, selecting plain columns. Anything else
(outer joins, three or more tables, ORM entities, expressions, aggregates,
``GROUP BY``, conditions mixing both sides that are not simple comparisons)
raises :class:`shardlib.CrossShardRefused` naming the join and what to do
instead, before any SQL runs.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData
from sqlalchemy.sql import operators, visitors
from sqlalchemy.sql.elements import BinaryExpression, ColumnClause, Grouping, Label
from sqlalchemy.sql.selectable import Alias, Join, Select, TableClause

from .analysis import _conjuncts, canonical

CROSS_SHARD_JOIN = "shardlib_cross_shard_join"
"""Execution option: ``True`` runs a join the shards cannot answer alone as a hash join here."""

_COMPARE: dict[Any, Callable[[Any, Any], bool]] = {
    operators.eq: operator.eq, operators.ne: operator.ne, operators.lt: operator.lt,
    operators.le: operator.le, operators.gt: operator.gt, operators.ge: operator.ge,
}
_SWAPPED = {operators.lt: operators.gt, operators.gt: operators.lt, operators.le: operators.ge,
            operators.ge: operators.le, operators.eq: operators.eq, operators.ne: operators.ne}


class JoinRefused(NotImplementedError):
    """This join cannot be run as an application-side hash join (the message says why)."""


def _sql(element: Any) -> str:
    try:
        return " ".join(str(element.compile(compile_kwargs={"literal_binds": True})).split())
    except Exception:
        return " ".join(str(element).split())


def _base(element: Any) -> Any:
    element = canonical(element)
    while isinstance(element, Alias):
        element = canonical(element.element)
    return element


def _unlabel(expr: Any) -> Any:
    while isinstance(expr, (Label, Grouping)):
        expr = expr.element
    return expr


class _Side:
    """One side of the join: a FROM element and the conditions pushed into its SELECT."""

    def __init__(self, from_: Any) -> None:
        self.from_ = canonical(from_)
        self.columns = list(self.from_.columns)
        self.conditions: list[Any] = []

    def position(self, column: ColumnClause[Any]) -> int:
        for i, mine in enumerate(self.columns):
            if mine.key == column.key:
                return i
        raise JoinRefused(f"column {column} is not a column of {self.from_}")


class JoinPlan:
    """What :func:`plan` read from a statement: two sides, keys, checks, projection, order."""

    def __init__(self, statement: Select[Any], what: str) -> None:
        self.statement, self.what = statement, what
        froms = statement.get_final_froms()
        if len(froms) != 1 or not isinstance(froms[0], Join):
            raise JoinRefused(f"{what}: only a join of two tables is joined in the application, not FROM "
                              f"{', '.join(_sql(f) for f in froms)}")
        join = froms[0]
        if join.isouter or join.full:
            raise JoinRefused(f"{what}: an outer join is not joined in the application; use an inner join, "
                              f"and add the rows without a match yourself")
        if isinstance(join.left, Join) or isinstance(join.right, Join):
            raise JoinRefused(f"{what}: a join of three or more tables is not joined in the application; join "
                              f"two at a time")
        for side in (join.left, join.right):
            if not isinstance(_base(side), TableClause):
                raise JoinRefused(f"{what}: {_sql(side)} is not a table; join tables (or aliases of them)")
        self.sides = (_Side(join.left), _Side(join.right))
        self.keys: list[tuple[int, int]] = []
        self.checks: list[Callable[[tuple[Any, ...], tuple[Any, ...]], bool]] = []
        for condition in [*_conjuncts(join.onclause), *_conjuncts(statement.whereclause)]:
            self._place(condition)
        if not self.keys:
            raise JoinRefused(f"{what}: no equality between the two tables (a.x = b.y): that is a cross product "
                              f"of both sides; add the equality the rows meet on")
        self.projection = [self._getter(c, "the SELECT list") for c in statement.selected_columns]
        self.names = [getattr(c, "key", None) or getattr(c, "name", None) or f"column_{i}"
                      for i, c in enumerate(statement.selected_columns)]

    # -------------------------------------------------------------- reading the statement

    def _side_of(self, column: Any) -> int | None:
        table = canonical(getattr(column, "table", None))
        for i, side in enumerate(self.sides):
            if table is side.from_:
                return i
        return None

    def _sides_in(self, expression: Any) -> set[int]:
        found: set[int] = set()
        for element in visitors.iterate(expression):
            if isinstance(element, ColumnClause) and getattr(element, "table", None) is not None:
                side = self._side_of(element)
                if side is None:
                    raise JoinRefused(f"{self.what}: {_sql(expression)} reads {element.table}, which is not "
                                      f"one of the two joined tables")
                found.add(side)
            elif isinstance(element, (Select,)):
                raise JoinRefused(f"{self.what}: a subquery in {_sql(expression)} is not joined in the application")
        return found

    def _place(self, condition: Any) -> None:
        sides = self._sides_in(condition)
        if len(sides) <= 1:  # one side's own condition: that side's SELECT runs it
            self.sides[sides.pop() if sides else 0].conditions.append(condition)
            return
        condition = _unlabel(condition)
        if not (isinstance(condition, BinaryExpression) and condition.operator in _COMPARE):
            raise JoinRefused(f"{self.what}: the condition {_sql(condition)} mixes both tables and is not a "
                              f"comparison of two columns; keep such conditions to =, !=, <, <=, >, >=")
        left, right = _unlabel(condition.left), _unlabel(condition.right)
        if not (isinstance(left, ColumnClause) and isinstance(right, ColumnClause)):
            raise JoinRefused(f"{self.what}: {_sql(condition)} compares expressions; compare columns")
        op = condition.operator
        if self._side_of(left) == 1:
            left, right, op = right, left, _SWAPPED[op]
        a, b = self.sides[0].position(left), self.sides[1].position(right)
        if op is operators.eq:
            self.keys.append((a, b))
        else:
            compare = _COMPARE[op]
            self.checks.append(lambda x, y, a=a, b=b, compare=compare: (
                x[a] is not None and y[b] is not None and compare(x[a], y[b])))

    def _getter(self, expression: Any, where: str) -> Callable[[tuple[Any, ...], tuple[Any, ...]], Any]:
        column = _unlabel(expression)
        if not isinstance(column, ColumnClause) or self._side_of(column) is None:
            raise JoinRefused(f"{self.what}: {_sql(expression)} in {where} is not a column of one of the two "
                              f"tables; select plain columns and compute the rest in Python")
        side, position = self._side_of(column), self.sides[self._side_of(column)].position(column)
        return (lambda x, y, p=position: x[p]) if side == 0 else (lambda x, y, p=position: y[p])

    def side_statement(self, i: int) -> Select[Any]:
        side = self.sides[i]
        return select(*side.columns).where(*side.conditions)

    # -------------------------------------------------------------- joining

    def join(self, left: list[tuple[Any, ...]], right: list[tuple[Any, ...]], dialect_name: str) -> list[tuple[Any, ...]]:
        """Hash join two sides' rows; project, de-duplicate, order and slice as SQL would."""
        from .gather import _nulls_first, _order_items

        statement = self.statement
        build_left = len(left) <= len(right)
        build, probe = (left, right) if build_left else (right, left)
        build_key = [a if build_left else b for a, b in self.keys]
        probe_key = [b if build_left else a for a, b in self.keys]
        table: dict[tuple[Any, ...], list[tuple[Any, ...]]] = {}
        for row in build:
            key = tuple(row[i] for i in build_key)
            if None not in key:
                table.setdefault(key, []).append(row)
        pairs = []
        for row in probe:
            key = tuple(row[i] for i in probe_key)
            if None in key:
                continue
            for match in table.get(key, ()):
                x, y = (match, row) if build_left else (row, match)
                if all(check(x, y) for check in self.checks):
                    pairs.append((x, y))
        order = []
        for item, descending, nulls in _order_items(statement):
            order.append((self._getter(item, "ORDER BY"), descending, _nulls_first(dialect_name, descending, nulls)))
        if order:
            pairs.sort(key=functools.cmp_to_key(functools.partial(_compare_pairs, order)))
        rows = [tuple(get(x, y) for get in self.projection) for x, y in pairs]
        if statement._distinct:
            seen: set[tuple[Any, ...]] = set()
            rows = [r for r in rows if not (r in seen or seen.add(r))]  # type: ignore[func-returns-value]
        offset, limit = _int(statement._offset_clause), _int(statement._limit_clause)
        start = offset or 0
        return rows[start:] if limit is None else rows[start:start + limit]


def _int(clause: Any) -> int | None:
    if clause is None:
        return None
    value = getattr(clause, "value", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise JoinRefused(f"LIMIT/OFFSET given as an expression ({_sql(clause)}); give an integer")


def _compare_pairs(order: Sequence[tuple[Any, bool, bool]], p: Any, q: Any) -> int:
    for getter, descending, nulls_first in order:
        x, y = getter(*p), getter(*q)
        if x == y or (x is None and y is None):
            continue
        if x is None or y is None:
            return -1 if (x is None) == nulls_first else 1
        smaller = x < y
        if descending:
            smaller = not smaller
        return -1 if smaller else 1
    return 0


def plan(statement: Any, what: str = "this join") -> JoinPlan:
    """Read a join for :func:`run`; raises :class:`JoinRefused` naming what cannot be joined here."""
    if not isinstance(statement, Select):
        raise JoinRefused(f"{what}: only a SELECT is joined in the application")
    if any(d.get("entity") is not None and d.get("expr") is d.get("entity") for d in statement.column_descriptions):
        raise JoinRefused(f"{what}: ORM entities are not joined in the application; select columns "
                          f"(select(a.id, a.city, b.id, ...))")
    from .execution import _row_wise_problem

    problem = _row_wise_problem(statement)
    if problem:
        raise JoinRefused(f"{what}: {problem} over a cross-shard join; join the rows here, then summarise them "
                          f"in Python (pandas)")
    if statement._distinct_on or statement._fetch_clause is not None:
        raise JoinRefused(f"{what}: DISTINCT ON / FETCH are not applied after an application-side join")
    return JoinPlan(statement, what)


def run(orm_context: Any, statement: Select[Any], read_side: Callable[[Select[Any]], list[tuple[Any, ...]]],
        dialect_name: str) -> Any:
    """Run ``statement`` as a hash join; ``read_side(select)`` returns one side's rows from every shard it needs."""
    the_plan = plan(statement)
    left = read_side(the_plan.side_statement(0))
    right = read_side(the_plan.side_statement(1))
    rows = the_plan.join(left, right, dialect_name)
    return IteratorResult(SimpleResultMetaData(the_plan.names), iter(rows))


__all__ = ["CROSS_SHARD_JOIN", "JoinPlan", "JoinRefused", "plan", "run"]
