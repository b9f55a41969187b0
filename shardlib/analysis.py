"""Statement analysis: which shards could hold rows a WHERE clause matches.

This module only *reads* SQL expressions; the choosers that ``ShardedSession``
calls live in :mod:`shardlib.routing`, the write guards in
:mod:`shardlib.guards`. What it reads comes from the shard map
(:mod:`shardlib.shards`: where each continent lives, how an id names its
shard) and from :data:`shardlib.models.SHARD_KEY_COLUMNS` (which column is the
shard key, which columns hold a location id).

The boolean tree
----------------
A WHERE clause becomes a small tree of ``And``, ``Or``, ``Not`` and leaves:

* **continent atoms**: ``continent = 'Asia'``, ``continent IN (...)`` on any
  FROM element reading ``weather_locations`` (the table or an alias of it);
* **id atoms**: ``weather_locations.id = 49``, ``weather_reports.location_id
  IN (...)``: an id names its shard (see :mod:`shardlib.shards`);
* **lookup atoms**: ``city = 'Quito'``, ``station IN (...)`` on a column that
  has a lookup table (:data:`shardlib.models.LOOKUPS`), once the lookup has
  been asked (:func:`lookup_values` says what to ask; the caller, which owns
  the I/O, passes the answers in): like an id atom, they can be true only on
  the shards the lookup names;
* **free atoms**: anything else (``temperature > 30``, a function, a
  subquery, a bound value nobody can see yet, a lookup column nobody asked about).

A free atom is named by *what it reads*: the FROM element (``a`` and ``b``,
two aliases of one table, are different rows), the column, the operator and
the **typed** values (``city = 1`` and ``city = 1.0`` are different tests:
SQLite compares the text ``'1'`` with ``'1.0'``). Two atoms with the same name
are the same test on the same row, so they are true or false together; any
two others are independent. Treating two tests as independent can only add
shards, never remove one.

Deciding, shard by shard
------------------------
For each shard the continent and id atoms are replaced by what they must be for
a row stored there (every FROM element of a per-shard statement reads that
shard's rows only), and the shard is visited iff **some** truth assignment of
the free atoms makes the clause TRUE. That is satisfiability; it is decided
without enumerating assignments:

1. constant folding (``x AND FALSE`` is FALSE, ``NOT TRUE`` is FALSE, ...);
2. an ``OR`` can be TRUE iff one of its parts can (each is decided alone);
3. *pure atoms*: an atom that appears only un-negated (or only negated) is set
   to whichever value helps; Kleene's ``AND``/``OR`` are monotone and ``NOT``
   reverses, so this never loses a satisfying assignment. In a WHERE clause
   where no test appears twice, this alone decides, in one pass;
4. what remains (a test repeated both plain and negated) is split on one atom
   at a time, refolding after each choice, within a budget of
   :data:`MAX_SPLITS`. Past the budget the shard is kept: never fewer shards.

So routing stays linear for real clauses (100 conditions: well under a
millisecond, see ``benchmarks/routing_cost.py``) and exact (minimal) for all
of them. Free atoms range over TRUE and FALSE only: Kleene logic is monotone in
the information order, so a clause TRUE with some atom NULL is also TRUE with
that atom TRUE or FALSE.

Bound parameters are read as the compiler will send them: execute-time values
by the bind's key *or* by its compiled name (``{"continent_1": "Europe"}``
overrides the literal ``'Asia'`` in ``continent == 'Asia'``, exactly as
SQLAlchemy does), expanding ``IN`` lists, and callables.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    AsBoolean,
    BinaryExpression,
    BindParameter,
    BooleanClauseList,
    ClauseList,
    ColumnClause,
    False_,
    Grouping,
    Null,
    True_,
    UnaryExpression,
)
from sqlalchemy.sql.selectable import Alias, CompoundSelect, TableClause

from .models import LOOKUPS, SHARD_KEY_COLUMNS
from .shards import SERVING_SHARD_IDS, continents_on, shard_for_id

MAX_SPLITS = 2000
"""Branching budget per shard (step 4 above); past it the shard is kept."""

# --------------------------------------------------------------------------
# the boolean tree
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Const:
    value: bool | None  # None is SQL NULL ("unknown")


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Not:
    child: Node


@dataclass(frozen=True, slots=True)
class ContinentIn:
    """True exactly when the continent of the row read from ``source`` is one of ``continents``."""

    continents: frozenset[str]
    source: Any


@dataclass(frozen=True, slots=True)
class IdIn:
    """Can be true only on ``shards``; there it is free (which row? we can't tell)."""

    shards: frozenset[str]
    key: Any


@dataclass(frozen=True, slots=True)
class Free:
    """Anything else: may be true or false on any shard."""

    key: Any


Node = Union[Const, And, Or, Not, ContinentIn, IdIn, Free]

TRUE, FALSE, NULL = Const(True), Const(False), Const(None)
_UNKNOWN = object()


# --------------------------------------------------------------------------
# bound parameters, read as the compiler reads them
# --------------------------------------------------------------------------


class Params:
    """Execute-time parameters, looked up by bind key, then by compiled name.

    ``compiled_names`` (bind key -> name in the compiled SQL) is only needed
    when a parameter's key is not the key of any bind; it is computed lazily,
    once, by compiling the statement (see :func:`compiled_bind_names`).
    """

    __slots__ = ("values", "_statement", "_dialect", "_names", "lookups")

    def __init__(self, values: Mapping[str, Any] | None, statement: Any = None, dialect: Any = None,
                 lookups: LookupAnswers | None = None) -> None:
        self.values = values or {}
        self._statement = statement
        self._dialect = dialect
        self._names: dict[str, str] | None = None
        self.lookups = lookups  # what the lookup tables said (see lookup_values)

    def lookup(self, bind: BindParameter[Any]) -> Any:
        values = self.values
        if not values:
            return _UNKNOWN
        if bind.key in values:
            return values[bind.key]
        if self._names is None:
            self._names = compiled_bind_names(self._statement, self._dialect) if self._statement is not None else {}
        name = self._names.get(bind.key)
        if name is not None and name in values:
            return values[name]
        return _UNKNOWN


def compiled_bind_names(statement: Any, dialect: Any = None) -> dict[str, str]:
    """Bind key -> the parameter name the compiled statement uses (``continent_1``)."""
    if dialect is None:
        from sqlalchemy.dialects import sqlite

        dialect = sqlite.dialect()
    try:
        compiled = statement.compile(dialect=dialect)
    except Exception:  # not compilable on its own: nothing to resolve by name
        return {}
    return {bind.key: name for bind, name in compiled.bind_names.items()}


def _bind_value(bind: BindParameter[Any], params: Params | None) -> Any:
    """The value a bound parameter will have when the statement runs."""
    if params is not None:
        value = params.lookup(bind)
        if value is not _UNKNOWN:
            return value
    if bind.callable is not None:
        return bind.effective_value
    if bind.value is None:
        return _UNKNOWN  # bindparam("x") whose value arrives later, or never
    return bind.value


def _values(expr: Any, params: Params | None, many: bool) -> Any:
    """Literal values on the value side of a comparison, as a tuple, or _UNKNOWN."""
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BindParameter):
        value = _bind_value(expr, params)
        if value is _UNKNOWN:
            return _UNKNOWN
        if many:  # IN: the bind holds the whole list
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                return _UNKNOWN
            return tuple(value)
        return (value,)
    if many and isinstance(expr, ClauseList):  # IN (literal, literal, ...)
        found: list[Any] = []
        for element in expr.clauses:
            part = _values(element, params, many=False)
            if part is _UNKNOWN:
                return _UNKNOWN
            found.extend(part)
        return tuple(found)
    return _UNKNOWN


# --------------------------------------------------------------------------
# SQL expression -> tree
# --------------------------------------------------------------------------


def base_table(column: ColumnClause[Any]) -> TableClause | None:
    """The table a column reads, through any aliases; ``None`` for subqueries."""
    table = column.table
    while isinstance(table, Alias):  # aliased(WeatherLocation), table.alias()
        table = table.element
    return table if isinstance(table, TableClause) else None


_ROLE_BY_NAME = {(c.table.name, c.name): (role, c) for role, c in SHARD_KEY_COLUMNS}


def column_role(expr: Any) -> str | None:
    """``'continent'`` or ``'location_id'`` if ``expr`` is such a column of a stored table.

    Aliases count (every alias of ``weather_locations`` reads rows of the same
    shard); columns of subqueries and expressions do not.
    """
    found = _known_column(expr, _ROLE_BY_NAME, lambda role_and_column: role_and_column[1])
    return None if found is None else found[0]


def _known_column(expr: Any, by_name: Mapping[tuple[str, str], Any], column_of: Any) -> Any:
    """The entry of ``by_name`` (keyed by table name and column name) for the stored column
    ``expr`` reads, directly or through an alias of its table; ``None`` for anything else
    (a column of a subquery, an expression, a same-named column of another lineage)."""
    if not isinstance(expr, ColumnClause):
        return None
    table = base_table(expr)
    if table is None:
        return None
    found = by_name.get((table.name, expr.name))
    if found is None or not expr.shares_lineage(column_of(found)):
        return None
    return found


def _typed(values: Iterable[Any]) -> frozenset[Any] | None:
    try:
        return frozenset((type(v), v) for v in values)
    except TypeError:
        return None


LookupAnswers = Mapping[str, Mapping[str, frozenset[str]]]
"""Lookup name -> value -> the shards holding rows with that value (absent: none)."""

LOOKUP_ANSWERS = "shardlib_lookup_answers"
"""Execution option under which :mod:`shardlib.execution` hands the lookup tables'
answers to the ``execute_chooser`` (which does no I/O itself)."""

_LOOKUP_BY_NAME = {(lk.column.table.name, lk.column.name): lk for lk in LOOKUPS}


def lookup_of(expr: Any) -> Any:
    """The :class:`~shardlib.models.Lookup` of a column (or an alias's column) that has one."""
    return _known_column(expr, _LOOKUP_BY_NAME, lambda lookup: lookup.column)


def lookup_values(statement: Any, params: Mapping[str, Any] | None = None) -> dict[str, set[str]]:
    """Lookup name -> the values a statement's WHERE compares that column with (``=``, ``IN``,
    their negations), as text: what to ask the lookup tables before routing.

    >>> from sqlalchemy import select
    >>> from shardlib import WeatherLocation as WL
    >>> found = lookup_values(select(WL).where(WL.city.in_(["Quito", "Lima"]) | (WL.station == "EGLL")))
    >>> sorted((name, sorted(values)) for name, values in found.items())
    [('city', ['Lima', 'Quito']), ('station', ['EGLL'])]
    """
    clauses = where_clauses(statement)
    found: dict[str, set[str]] = {}
    if not clauses:
        return found
    bound = Params(params, statement) if params else None
    stack = [c for c in clauses if c is not None]
    while stack:
        expr = stack.pop()
        while isinstance(expr, Grouping):
            expr = expr.element
        if isinstance(expr, (BooleanClauseList, ClauseList)) and expr.operator in (operators.and_, operators.or_):
            stack.extend(expr.clauses)
        elif isinstance(expr, UnaryExpression) and expr.operator is operators.inv:
            stack.append(expr.element)
        elif isinstance(expr, BinaryExpression) and expr.operator in _EQ_LIKE:
            many = expr.operator in (operators.in_op, operators.not_in_op)
            column, other = expr.left, expr.right
            if not isinstance(column, ColumnClause) and isinstance(other, ColumnClause) and not many:
                column, other = other, column
            lookup = lookup_of(column)
            if lookup is None:
                continue
            values = _values(other, bound, many)
            if values is not _UNKNOWN and all(isinstance(v, str) for v in values if v is not None):
                found.setdefault(lookup.name, set()).update(v for v in values if v is not None)
    return found


_EQ_LIKE = {operators.eq: False, operators.in_op: False, operators.ne: True, operators.not_in_op: True}


def _comparison(expr: BinaryExpression[Any], params: Params | None) -> Node:
    negated = _EQ_LIKE.get(expr.operator)
    if negated is None:
        return Free(("expr", id(expr)))
    many = expr.operator in (operators.in_op, operators.not_in_op)
    column, other = expr.left, expr.right
    if not isinstance(column, ColumnClause) and isinstance(other, ColumnClause) and not many:
        column, other = other, column  # 'Asia' == continent
    if not isinstance(column, ColumnClause):
        return Free(("expr", id(expr)))
    values = _values(other, params, many)
    if values is _UNKNOWN:
        return Free(("expr", id(expr)))
    values = tuple(v for v in values if v is not None)  # x IN (a, NULL) is never true via NULL
    typed = _typed(values)
    if typed is None:
        return Free(("expr", id(expr)))

    source = column.table  # which FROM element: the table itself or one alias of it
    role = column_role(column)
    node: Node
    if role == "continent" and all(isinstance(v, str) for v in values):
        node = ContinentIn(frozenset(values), source)
    elif role == "location_id" and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        shards = frozenset(s for s in map(shard_for_id, values) if s is not None)
        node = IdIn(shards, ("id", source, column.name, typed))
    elif (params is not None and params.lookups is not None and all(isinstance(v, str) for v in values)
          and (lookup := lookup_of(column)) is not None and lookup.name in params.lookups):
        answers = params.lookups[lookup.name]  # a value the lookup does not list is stored nowhere
        shards = frozenset(s for v in values for s in answers.get(v, ()))
        node = IdIn(shards, ("lookup", source, column.name, typed))
    else:
        node = Free(("in", source, column.name, typed))
    return Not(node) if negated else node


def to_tree(expr: Any, params: Mapping[str, Any] | Params | None = None) -> Node:
    """Translate a WHERE clause (or ``None``) into the boolean tree above."""
    if params is not None and not isinstance(params, Params):
        params = Params(params)
    return _tree(expr, params)


def _tree(expr: Any, params: Params | None) -> Node:
    if expr is None:
        return TRUE
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, BinaryExpression):
        return _comparison(expr, params)
    if isinstance(expr, (BooleanClauseList, ClauseList)):
        op = expr.operator
        if op is operators.and_:
            return And(tuple(_tree(c, params) for c in expr.clauses))
        if op is operators.or_:
            return Or(tuple(_tree(c, params) for c in expr.clauses))
        return Free(("expr", id(expr)))
    if isinstance(expr, True_):
        return TRUE
    if isinstance(expr, False_):
        return FALSE
    if isinstance(expr, Null):
        return NULL
    if isinstance(expr, AsBoolean) and isinstance(expr.element, (True_, False_)):
        inner = _tree(expr.element, params)  # where(false()) arrives wrapped
        return inner if expr.operator is operators.is_true else Not(inner)
    if isinstance(expr, UnaryExpression) and expr.operator is operators.inv:
        return Not(_tree(expr.element, params))
    return Free(("expr", id(expr)))


# --------------------------------------------------------------------------
# deciding, shard by shard
# --------------------------------------------------------------------------


def _fold(children: Iterable[Node], absorbing: bool, kind: type) -> Node:
    """Fold constants out of an AND (``absorbing=False``) or OR (``absorbing=True``).

    ``children`` is a generator: substitution stops at the first absorbing
    constant (FALSE for AND, TRUE for OR). A NULL child is kept once: it makes
    an AND at best NULL and an OR at worst NULL.
    """
    kept: list[Node] = []
    null = False
    for child in children:
        if type(child) is Const:
            if child.value is absorbing:
                return TRUE if absorbing else FALSE
            if child.value is None:
                null = True
            continue
        kept.append(child)
    if null:
        kept.append(NULL)
    if not kept:
        return FALSE if absorbing else TRUE
    return kept[0] if len(kept) == 1 else kind(tuple(kept))


def _substitute(node: Node, shard: str | None, truth: Mapping[Any, bool]) -> Node:
    """Replace continent/id atoms for ``shard`` (if given) and atoms in ``truth``; fold constants."""
    kind = type(node)
    if kind is And:
        return _fold((_substitute(c, shard, truth) for c in node.children), False, And)
    if kind is Or:
        return _fold((_substitute(c, shard, truth) for c in node.children), True, Or)
    if kind is Not:
        child = _substitute(node.child, shard, truth)
        if type(child) is Const:
            return child if child.value is None else Const(not child.value)
        if type(child) is Not:
            return child.child
        return Not(child)
    if kind is ContinentIn:
        if shard is None:
            return node
        here = continents_on(shard)
        inside = [c for c in here if c in node.continents]
        if not inside:
            return FALSE
        if len(inside) == len(here):
            return TRUE
        return Free(("continent", node.source, frozenset(inside)))
    if kind is IdIn:
        if shard is not None and shard not in node.shards:
            return FALSE
        value = truth.get(node.key)
        return node if value is None else Const(value)
    if kind is Free:
        value = truth.get(node.key)
        return node if value is None else Const(value)
    return node


def on_shard(node: Node, shard_id: str) -> Node:
    """The clause as it reads for rows stored on ``shard_id`` (continent and id atoms replaced)."""
    return _substitute(node, shard_id, {})


def _shown_on_shard(node: Node, shard_id: str) -> Node:
    """Like :func:`on_shard`, without folding constants: for showing the substitution."""
    if isinstance(node, (ContinentIn, IdIn)):
        return on_shard(node, shard_id)
    if isinstance(node, (And, Or)):
        return type(node)(tuple(_shown_on_shard(c, shard_id) for c in node.children))
    if isinstance(node, Not):
        return Not(_shown_on_shard(node.child, shard_id))
    return node


def _polarities(node: Node, positive: bool, into: dict[Any, int]) -> None:
    kind = type(node)
    if kind is And or kind is Or:
        for child in node.children:
            _polarities(child, positive, into)
    elif kind is Not:
        _polarities(node.child, not positive, into)
    elif kind is Free or kind is IdIn:
        into[node.key] = into.get(node.key, 0) | (1 if positive else 2)


def can_be_true(node: Node, budget: list[int] | None = None) -> bool:
    """Is there an assignment of the free atoms that makes ``node`` TRUE? (exact)"""
    if budget is None:
        budget = [MAX_SPLITS]
    while True:
        if type(node) is Const:
            return node.value is True
        if type(node) is Or:  # TRUE if any one disjunct can be made TRUE on its own
            return any(can_be_true(child, budget) for child in node.children)
        polarity: dict[Any, int] = {}
        _polarities(node, True, polarity)
        pure = {key: mask == 1 for key, mask in polarity.items() if mask != 3}
        if not pure:
            break
        node = _substitute(node, None, pure)
    budget[0] -= 1
    if budget[0] < 0:
        return True  # too tangled to finish: keep the shard (never fewer)
    key = next(iter(polarity))  # an atom that appears both plain and negated
    return can_be_true(_substitute(node, None, {key: True}), budget) or can_be_true(
        _substitute(node, None, {key: False}), budget
    )


def presolve(tree: Node) -> Node:
    """Settle the pure free atoms once, before the per-shard decisions.

    A free atom's polarity does not depend on the shard (only continent and id
    atoms are replaced per shard), so setting it to the value that helps is
    valid for every shard at once; what is left for each shard is small.
    """
    polarity: dict[Any, int] = {}
    _polarities(tree, True, polarity)
    pure = {key: mask == 1 for key, mask in polarity.items() if mask != 3 and key[0] not in ("id", "lookup")}
    return _shard_atoms_first(_substitute(tree, None, pure) if pure else tree)


def _shard_atoms_first(node: Node) -> Node:
    """Put continent and id tests first in every AND/OR, so a shard they rule out
    short-circuits before the rest is looked at."""
    if isinstance(node, (And, Or)):
        children = [_shard_atoms_first(c) for c in node.children]
        children.sort(key=lambda c: not isinstance(c, (ContinentIn, IdIn)))
        return type(node)(tuple(children))
    if isinstance(node, Not):
        return Not(_shard_atoms_first(node.child))
    return node


def shards_for_tree(tree: Node) -> list[str]:
    tree = presolve(tree)
    return [s for s in SERVING_SHARD_IDS if can_be_true(on_shard(tree, s))]


def _condition(column: str, values: Any) -> str:
    shown = sorted((v[1] if isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], type) else v
                    for v in values), key=repr)
    if len(shown) == 1:
        return f"{column} = {shown[0]!r}"
    return f"{column} IN ({', '.join(map(repr, shown))})"


def describe(node: Node) -> str:
    """The tree as readable SQL-ish text; anything opaque shows as ``<free>``."""
    if isinstance(node, Const):
        return {True: "TRUE", False: "FALSE", None: "NULL"}[node.value]
    if isinstance(node, (And, Or)):
        joiner = " AND " if isinstance(node, And) else " OR "
        return "(" + joiner.join(describe(child) for child in node.children) + ")"
    if isinstance(node, Not):
        return "NOT " + describe(node.child)
    if isinstance(node, ContinentIn):
        return _condition("continent", node.continents)
    if isinstance(node, IdIn) and node.key[0] == "lookup":
        return _condition(node.key[2], node.key[3])
    if isinstance(node, IdIn):
        return _condition("location id", node.key[3])
    if isinstance(node, Free) and node.key[0] == "in":
        return _condition(node.key[2], node.key[3])
    if isinstance(node, Free) and node.key[0] == "continent":
        return _condition("continent", node.key[2])
    return "<free>"


def where_clauses(statement: Any) -> list[Any] | None:
    """The WHERE clause(s) of a statement, or None if it has no usable one."""
    if isinstance(statement, CompoundSelect):  # UNION etc.: any part's rows
        parts: list[Any] = []
        for select in statement.selects:
            inner = where_clauses(select)
            if inner is None:
                return None
            parts.extend(inner)
        return parts
    if not hasattr(statement, "whereclause"):
        return None  # text(), INSERT, DDL...: every shard
    return [statement.whereclause]


def explain(statement: Any, params: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """Per shard: the WHERE clause once that shard's continent and id atoms are
    substituted, and whether :func:`shards_for` visits the shard.

    >>> from sqlalchemy import select
    >>> from shardlib import WeatherLocation
    >>> explain(select(WeatherLocation).where(WeatherLocation.continent == "Asia"))[1]
    {'shard': 'asia', 'clause on this shard': 'TRUE', 'visit': 'yes'}
    """
    clauses = where_clauses(statement)
    if clauses is None:
        return [{"shard": s, "clause on this shard": "(no WHERE clause we can read)", "visit": "yes"}
                for s in SERVING_SHARD_IDS]
    bound = Params(params, statement)
    trees = [to_tree(clause, bound) for clause in clauses]
    rows = []
    for shard in SERVING_SHARD_IDS:
        rows.append({
            "shard": shard,
            "clause on this shard": " | ".join(describe(_shown_on_shard(t, shard)) for t in trees),
            "visit": "yes" if any(can_be_true(on_shard(t, shard)) for t in trees) else "no",
        })
    return rows


def shards_for(
    statement: Any,
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    *,
    dialect: Any = None,
    lookups: LookupAnswers | None = None,
) -> list[str]:
    """The shards that could hold rows matching ``statement``, in ``SHARD_IDS`` order.

    ``params`` are the values passed at execution time
    (``session.execute(stmt, params)``), by bind key or by compiled name; a
    list of dicts (executemany) routes to every shard any of them needs. An
    empty list means no shard can match (``continent = 'Atlantis'``).
    ``dialect`` is the one the statement will be compiled for (it decides
    compiled parameter names only when they are too long for the database).
    ``lookups`` are the lookup tables' answers for :func:`lookup_values`
    (``{"city": {"Quito": frozenset({"south_america"})}}``): a value they do
    not list is stored on no shard.

    >>> from sqlalchemy import select
    >>> from shardlib import WeatherLocation
    >>> shards_for(select(WeatherLocation).where(WeatherLocation.continent.in_(["Europe", "Asia"])))
    ['asia', 'europe']
    """
    clauses = where_clauses(statement)
    if clauses is None:
        return list(SERVING_SHARD_IDS)
    param_sets: Sequence[Mapping[str, Any] | None]
    if params is None or isinstance(params, Mapping):
        param_sets = [params]
    else:
        param_sets = list(params) or [None]
    needed: set[str] = set()
    for param_set in param_sets:
        bound = Params(param_set, statement, dialect, lookups) if param_set or lookups is not None else None
        for clause in clauses:
            tree = presolve(_tree(clause, bound))
            for shard in SERVING_SHARD_IDS:
                if shard not in needed and can_be_true(on_shard(tree, shard)):
                    needed.add(shard)
    return [s for s in SERVING_SHARD_IDS if s in needed]


# --------------------------------------------------------------------------
# locality: can every shard answer its part on its own?
# --------------------------------------------------------------------------
#
# ShardedSession runs a statement on each shard separately. That is only right
# if every combination of rows the statement can produce lives on ONE shard:
# a join of locations with their reports does (reports live with their
# location), a join of two aliases on ``continent`` does (same continent, same
# shard), a self-join on ``city`` does not (London, Europe and London, North
# America are on two shards: no shard sees the pair). The same holds for
# subqueries: one correlated by a location id sees the outer row's shard-mates
# and nothing else is needed; an uncorrelated one sees only its own shard's
# rows, and on four shards gives four different answers.

from sqlalchemy.sql import visitors as _visitors  # noqa: E402
from sqlalchemy.sql.selectable import (  # noqa: E402
    CTE,
    FromClause,
    Join,
    ScalarSelect,
    Select,
    Subquery,
)
from sqlalchemy.sql.selectable import Exists  # noqa: E402

_SHARDED_TABLES = frozenset(c.table.name for _, c in SHARD_KEY_COLUMNS)


def canonical(element: Any) -> Any:
    """The element without ORM annotations (annotated copies compare by identity to it)."""
    deannotate = getattr(element, "_deannotate", None)
    return deannotate() if deannotate is not None else element


def _is_sharded_from(element: Any) -> bool:
    table = element
    while isinstance(table, Alias):
        table = table.element
    return isinstance(table, TableClause) and table.name in _SHARDED_TABLES


def _conjuncts(expr: Any) -> list[Any]:
    if expr is None:
        return []
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, (BooleanClauseList, ClauseList)) and expr.operator is operators.and_:
        found: list[Any] = []
        for clause in expr.clauses:
            found.extend(_conjuncts(clause))
        return found
    return [expr]


def _froms(select: Select[Any]) -> list[FromClause]:
    try:
        return list(select.get_final_froms())
    except Exception:
        return list(select.froms)


def _nested_selects(element: Any) -> list[Select[Any]]:
    """SELECTs nested directly in ``element`` (scalar subqueries, EXISTS, IN), not deeper."""
    if type(element) is ColumnClause or isinstance(element, TableClause):
        return []
    found: list[Select[Any]] = []
    stack = list(element.get_children())
    while stack:
        child = stack.pop()
        if isinstance(child, Select):
            found.append(child)
        elif isinstance(child, (Subquery, CTE, TableClause)):
            continue  # FROM elements are scopes of their own
        else:
            stack.extend(child.get_children())
    return found


def locality_problem(statement: Any) -> str | None:
    """Why this statement cannot be answered shard by shard, or ``None`` if it can.

    Every FROM element reading a sharded table, at any depth, must be tied to
    the others by equalities on the shard key (``a.continent = b.continent``,
    ``location.id = report.location_id``, ``x.location_id IN (SELECT
    location_id ...)``, a subquery correlated that way); a subquery in FROM
    must work row by row (no GROUP BY, DISTINCT, aggregate or LIMIT). The
    check itself is the one :func:`shardlib.gather.plan` applies
    (``gather.check_locality``): one rule for the session and for gather.
    A plain single-table statement needs none of it (the fast path below).
    """
    if _single_source(statement) is not None:
        return None  # one FROM element, no subquery: nothing to keep together
    from .gather import GatherRefused, check_locality

    try:
        check_locality(statement)
    except GatherRefused as refused:
        return str(refused).replace("gather cannot", "cannot", 1)
    return None


def _reads_sharded(element: Any) -> bool:
    return any(_is_sharded_from(canonical(e)) for e in _visitors.iterate(element) if isinstance(e, FromClause))


def is_exists_only(statement: Any) -> bool:
    """``select(exists().where(...))``: every selected column is an EXISTS, nothing in FROM.

    Read from the statement as written (no compile: compiling an ORM statement
    here would also change what SQLAlchemy caches for its loaders)."""
    if not isinstance(statement, Select) or statement._from_obj or statement._setup_joins:
        return False
    if statement.whereclause is not None:
        return False
    columns = statement._raw_columns
    return bool(columns) and all(isinstance(_unlabel(c), Exists) for c in columns)


def _unlabel(expr: Any) -> Any:
    from sqlalchemy.sql.elements import Label

    while isinstance(expr, Label):
        expr = expr.element
    return expr


def _single_source(statement: Any) -> Any:
    """The one FROM element of a plain SELECT without joins or subqueries, else ``None``.

    The fast path: compiling FROM lists (``get_final_froms``) costs more than
    routing; most statements read one table and need none of it.
    """
    if not isinstance(statement, Select) or statement._setup_joins or statement._from_obj:
        return None
    froms = {canonical(f) for f in statement.columns_clause_froms}
    where = statement.whereclause
    if where is not None:
        froms.update(canonical(f) for f in where._from_objects)
    if len(froms) != 1:
        return None
    parts = list(statement.selected_columns) + ([where] if where is not None else [])
    if statement._having_criteria or any(_nested_selects(p) or isinstance(p, Select) for p in parts):
        return None
    (only,) = froms
    return only if isinstance(only, (TableClause, Alias)) else None


def locality(statement: Any) -> tuple[str | None, bool]:
    """(:func:`locality_problem`, does it read a sharded table at all?), with one look at the statement."""
    simple = _single_source(statement)
    if simple is not None:
        return None, _is_sharded_from(simple)
    return locality_problem(statement), _reads_sharded(statement)


