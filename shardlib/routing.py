"""Routing: which shard stores an object, and which shards a statement must visit.

``ShardedSession`` asks three questions, one per *chooser*:

``shard_chooser(mapper, instance)``
    Where does this new object go? (the continent's shard; a report follows
    its location)
``identity_chooser(mapper, primary_key)``
    Which identity-map tokens could hold this primary key? (a location id
    names its shard, so exactly one)
``execute_chooser(orm_context)``
    Which shards must run this SELECT / UPDATE / DELETE? (worked out from the
    WHERE clause by :func:`shards_for`)

How :func:`shards_for` decides
------------------------------
The WHERE clause is translated into a small boolean tree whose leaves are

* *continent atoms* (``continent = 'Asia'``, ``continent IN (...)``),
* *id atoms* (``weather_locations.id = 49``, ``weather_reports.location_id IN (...)``:
  an id names its shard, see :mod:`shardlib.shards`), and
* *free atoms*: anything else (``city = 'Quito'``, ``temperature > 30``, a
  function call, a bound value we cannot see). A free atom may be true or false.

``AND``, ``OR`` and ``NOT`` (including ``!=`` and ``NOT IN``, which are ``NOT``
of ``=`` and ``IN``) are kept as they are. For each shard, the continent and
id atoms are replaced by what they must be for a row stored there; the shard
is visited only if *some* truth assignment of the free atoms can still make
the whole clause true. So::

    continent = 'Asia' AND city = 'Tokyo'         -> asia
    continent = 'Asia' OR  city = 'Tokyo'         -> every shard
    NOT (continent = 'Asia')                      -> every shard but asia
    continent IN ('Asia', 'Atlantis')             -> asia
    continent = 'Atlantis'                        -> no shard at all

This is sound under SQL's three-valued logic (a NULL is never *more* true than
a definite value), so a shard is skipped only if no row on it can match:
**query more shards, never fewer**. Anything the analysis does not understand
becomes a free atom, which can only add shards.

Rows of ``weather_reports`` live with their location, so a filter on the
location reached through a join narrows a query for reports as well.

The upstream example's chooser never narrowed at all (its visitor saw each
comparison before the columns and binds inside it); :mod:`shardlib.upstream`
keeps it so the notebooks can show the difference.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, ORMExecuteState
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

from .models import Report, WeatherLocation
from .shards import (
    SHARD_IDS,
    continents_on,
    shard_for_continent,
    shard_for_id,
)

MAX_FREE_ATOMS = 12
"""Above this many distinct free atoms we stop enumerating and keep the shard."""

# --------------------------------------------------------------------------
# the boolean tree
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Const:
    value: bool | None  # None is SQL NULL ("unknown")


@dataclass(frozen=True)
class And:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    children: tuple[Node, ...]


@dataclass(frozen=True)
class Not:
    child: Node


@dataclass(frozen=True)
class ContinentIn:
    """True exactly when the row's continent is one of ``continents``."""

    continents: frozenset[str]


@dataclass(frozen=True)
class IdIn:
    """Can be true only on ``shards``; there it is free (which row? we can't tell)."""

    shards: frozenset[str]
    key: Any


@dataclass(frozen=True)
class Free:
    """Anything else: may be true or false on any shard."""

    key: Any


Node = Union[Const, And, Or, Not, ContinentIn, IdIn, Free]

_UNKNOWN = object()


# --------------------------------------------------------------------------
# SQL expression -> tree
# --------------------------------------------------------------------------


def _base_table(column: ColumnClause[Any]) -> TableClause | None:
    table = column.table
    while isinstance(table, Alias):  # aliased(WeatherLocation), table.alias()
        table = table.element
    return table if isinstance(table, TableClause) else None


def _column_role(expr: Any) -> str | None:
    """'continent' or 'location_id' if ``expr`` is such a column of a stored table.

    Aliases count (every alias of ``weather_locations`` reads rows of the same
    shard); columns of subqueries and expressions do not.
    """
    if not isinstance(expr, ColumnClause):
        return None
    table = _base_table(expr)
    if table is None:
        return None
    for role, target in _ROLE_COLUMNS:
        if (
            expr.name == target.name
            and table.name == target.table.name
            and expr.shares_lineage(target)
        ):
            return role
    return None


_ROLE_COLUMNS = (
    ("continent", WeatherLocation.__table__.c.continent),
    ("location_id", WeatherLocation.__table__.c.id),
    ("location_id", Report.__table__.c.location_id),
)


def _bind_value(bind: BindParameter[Any], params: Mapping[str, Any] | None) -> Any:
    """The value a bound parameter will have when the statement runs."""
    if params is not None and bind.key in params:
        return params[bind.key]
    if bind.callable is not None:
        return bind.effective_value
    if bind.value is None:
        return _UNKNOWN  # bindparam("x") whose value arrives later, or never
    return bind.value


def _values(expr: Any, params: Mapping[str, Any] | None, many: bool) -> Any:
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


def _hashable(values: tuple[Any, ...]) -> frozenset[Any] | None:
    try:
        return frozenset(values)
    except TypeError:
        return None


_EQ_LIKE = {operators.eq: False, operators.in_op: False, operators.ne: True, operators.not_in_op: True}


def _comparison(expr: BinaryExpression[Any], params: Mapping[str, Any] | None) -> Node:
    op = expr.operator
    if op not in _EQ_LIKE:
        return Free(("expr", id(expr)))
    negated = _EQ_LIKE[op]
    many = op in (operators.in_op, operators.not_in_op)
    column, other = expr.left, expr.right
    if not isinstance(column, ColumnClause) and isinstance(other, ColumnClause) and not many:
        column, other = other, column  # 'Asia' == continent
    values = _values(other, params, many)
    if not isinstance(column, ColumnClause) or values is _UNKNOWN:
        return Free(("expr", id(expr)))
    values = tuple(v for v in values if v is not None)  # x IN (a, NULL) is never true via NULL
    found = _hashable(values)
    if found is None:
        return Free(("expr", id(expr)))

    role = _column_role(column)
    node: Node
    if role == "continent" and all(isinstance(v, str) for v in found):
        node = ContinentIn(frozenset(found))
    elif role == "location_id" and all(isinstance(v, int) for v in found):
        shards = frozenset(s for s in map(shard_for_id, found) if s is not None)
        node = IdIn(shards, ("id", frozenset(found)))
    else:
        table = _base_table(column)
        where = table.name if table is not None else id(column)
        node = Free(("in", where, column.name, found))
    return Not(node) if negated else node


def to_tree(expr: Any, params: Mapping[str, Any] | None = None) -> Node:
    """Translate a WHERE clause (or ``None``) into the boolean tree above."""
    if expr is None:
        return Const(True)
    while isinstance(expr, Grouping):
        expr = expr.element
    if isinstance(expr, True_):
        return Const(True)
    if isinstance(expr, False_):
        return Const(False)
    if isinstance(expr, Null):
        return Const(None)
    if isinstance(expr, BooleanClauseList) or (
        isinstance(expr, ClauseList) and expr.operator in (operators.and_, operators.or_)
    ):
        children = tuple(to_tree(c, params) for c in expr.clauses)
        if expr.operator is operators.and_:
            return And(children)
        if expr.operator is operators.or_:
            return Or(children)
        return Free(("expr", id(expr)))
    if isinstance(expr, AsBoolean) and isinstance(expr.element, (True_, False_)):
        inner = to_tree(expr.element, params)  # where(false()) arrives wrapped
        return inner if expr.operator is operators.is_true else Not(inner)
    if isinstance(expr, UnaryExpression) and expr.operator is operators.inv:
        return Not(to_tree(expr.element, params))
    if isinstance(expr, BinaryExpression):
        return _comparison(expr, params)
    return Free(("expr", id(expr)))


# --------------------------------------------------------------------------
# deciding, shard by shard
# --------------------------------------------------------------------------


def on_shard(node: Node, shard_id: str) -> Node:
    """Replace continent and id atoms by what they must be for rows on ``shard_id``."""
    if isinstance(node, ContinentIn):
        here = frozenset(continents_on(shard_id))
        if not here & node.continents:
            return Const(False)
        if here <= node.continents:
            return Const(True)
        return Free(("continent", node.continents))
    if isinstance(node, IdIn):
        return node if shard_id in node.shards else Const(False)
    if isinstance(node, (And, Or)):
        return type(node)(tuple(on_shard(c, shard_id) for c in node.children))
    if isinstance(node, Not):
        return Not(on_shard(node.child, shard_id))
    return node


def _evaluate(node: Node, truth: Mapping[Any, bool]) -> bool | None:
    """Kleene three-valued evaluation; free atoms look their value up in ``truth``."""
    if isinstance(node, Const):
        return node.value
    if isinstance(node, (Free, IdIn)):
        return truth[node.key]
    if isinstance(node, Not):
        value = _evaluate(node.child, truth)
        return None if value is None else not value
    if isinstance(node, And):
        result: bool | None = True
        for child in node.children:
            value = _evaluate(child, truth)
            if value is False:
                return False
            if value is None:
                result = None
        return result
    if isinstance(node, Or):
        result = False
        for child in node.children:
            value = _evaluate(child, truth)
            if value is True:
                return True
            if value is None:
                result = None
        return result
    raise TypeError(f"not a routing tree node: {node!r}")


def _free_keys(node: Node, into: dict[Any, None]) -> dict[Any, None]:
    if isinstance(node, (Free, IdIn)):
        into.setdefault(node.key)
    elif isinstance(node, (And, Or)):
        for child in node.children:
            _free_keys(child, into)
    elif isinstance(node, Not):
        _free_keys(node.child, into)
    return into


def can_be_true(node: Node) -> bool:
    """Is there an assignment of the free atoms that makes ``node`` TRUE?

    Free atoms only need to range over TRUE and FALSE: Kleene logic is
    monotone, so a clause that is TRUE with some atom NULL stays TRUE when
    that atom is made TRUE or FALSE.
    """
    keys = list(_free_keys(node, {}))
    if len(keys) > MAX_FREE_ATOMS:
        return True  # too big to enumerate: keep the shard (never fewer)
    for values in itertools.product((True, False), repeat=len(keys)):
        if _evaluate(node, dict(zip(keys, values))) is True:
            return True
    return False


def _condition(column: str, values: Any) -> str:
    shown = sorted(values, key=repr)
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
    if isinstance(node, IdIn):
        return _condition("location id", node.key[1])
    if isinstance(node, Free) and node.key[0] == "in":
        return _condition(node.key[2], node.key[3])
    if isinstance(node, Free) and node.key[0] == "continent":
        return _condition("continent", node.key[1])
    return "<free>"


def explain(statement: Any, params: Mapping[str, Any] | None = None) -> list[dict[str, str]]:
    """Per shard: the WHERE clause once that shard's continent and id atoms are
    substituted, and whether :func:`shards_for` visits the shard.

    >>> from sqlalchemy import select
    >>> explain(select(WeatherLocation).where(WeatherLocation.continent == "Asia"))[1]
    {'shard': 'asia', 'clause on this shard': 'TRUE', 'visit': 'yes'}
    """
    clauses = _where_clauses(statement)
    if clauses is None:
        return [{"shard": s, "clause on this shard": "(no WHERE clause we can read)", "visit": "yes"}
                for s in SHARD_IDS]
    trees = [to_tree(clause, params) for clause in clauses]
    rows = []
    for shard in SHARD_IDS:
        here = [on_shard(tree, shard) for tree in trees]
        rows.append({
            "shard": shard,
            "clause on this shard": " | ".join(describe(node) for node in here),
            "visit": "yes" if any(can_be_true(node) for node in here) else "no",
        })
    return rows


def shards_for_tree(tree: Node) -> list[str]:
    return [s for s in SHARD_IDS if can_be_true(on_shard(tree, s))]


def _where_clauses(statement: Any) -> list[Any] | None:
    """The WHERE clause(s) of a statement, or None if it has no usable one."""
    if isinstance(statement, CompoundSelect):  # UNION etc.: any part's rows
        parts: list[Any] = []
        for select in statement.selects:
            inner = _where_clauses(select)
            if inner is None:
                return None
            parts.extend(inner)
        return parts
    if not hasattr(statement, "whereclause"):
        return None  # text(), INSERT, DDL...: every shard
    return [statement.whereclause]


def shards_for(
    statement: Any, params: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None
) -> list[str]:
    """The shards that could hold rows matching ``statement``, in ``SHARD_IDS`` order.

    ``params`` are the values passed at execution time
    (``session.execute(stmt, params)``); a list of dicts (executemany) routes
    to every shard any of them needs. An empty list means no shard can match
    (``continent = 'Atlantis'``).

    >>> from sqlalchemy import select
    >>> shards_for(select(WeatherLocation).where(WeatherLocation.continent.in_(["Europe", "Asia"])))
    ['asia', 'europe']
    """
    clauses = _where_clauses(statement)
    if clauses is None:
        return list(SHARD_IDS)
    param_sets: Sequence[Mapping[str, Any] | None]
    if params is None or isinstance(params, Mapping):
        param_sets = [params]
    else:
        param_sets = list(params) or [None]
    needed: set[str] = set()
    for param_set in param_sets:
        for clause in clauses:
            needed.update(shards_for_tree(to_tree(clause, param_set)))
    return [s for s in SHARD_IDS if s in needed]


# --------------------------------------------------------------------------
# the three choosers
# --------------------------------------------------------------------------


def shard_of(instance: object, state: Any = None) -> str:
    """The shard an object is (or will be) stored on; ``ValueError`` if it has none."""
    if state is None:
        state = inspect(instance)
    if state.key is not None:
        return state.key[2]
    if isinstance(instance, WeatherLocation):
        return shard_for_continent(instance.continent)
    if isinstance(instance, Report):
        if instance.location is not None:
            return shard_of(instance.location)
        shard = shard_for_id(instance.location_id)
        if shard is None:
            raise ValueError(
                f"{instance!r} has no location: a report is stored on the shard "
                f"of its location, so set report.location (or append it to "
                f"location.reports) before adding it"
            )
        return shard
    raise ValueError(
        f"cannot shard {type(instance).__name__} objects; shardlib stores "
        f"WeatherLocation and Report"
    )


def shard_chooser(mapper: Mapper[Any] | None, instance: object | None, clause: Any = None, **kw: Any) -> str:
    """Where a new object goes: its continent's shard; a report follows its location."""
    if instance is None:
        raise ValueError(
            f"cannot choose one shard for {clause if clause is not None else mapper!s} "
            f"without an object; pass bind_arguments={{'shard_id': ...}} with one of "
            f"{', '.join(map(repr, SHARD_IDS))}"
        )
    return shard_of(instance)


def identity_chooser(
    mapper: Mapper[Any], primary_key: Sequence[Any], *, lazy_loaded_from: Any = None, **kw: Any
) -> list[str]:
    """Which identity-map tokens ``session.get()`` looks in.

    Only the identity map: on a miss, the SELECT that ``get()`` emits is routed
    by :func:`execute_chooser`, which reads the same id from its WHERE clause.
    """
    if lazy_loaded_from is not None and lazy_loaded_from.identity_token is not None:
        return [lazy_loaded_from.identity_token]  # related rows live with their parent
    if mapper.class_ is WeatherLocation:
        shard = shard_for_id(primary_key[0])
        return [shard] if shard is not None else []
    return list(SHARD_IDS)  # Report ids are shard-local: any shard may have one


def execute_chooser(orm_context: ORMExecuteState) -> list[str]:
    """Which shards run a statement that names no shard itself.

    A lazy load (``await location.awaitable_attrs.reports``) runs on the
    parent's shard. Everything else is routed by :func:`shards_for`; if no shard
    can match, the statement still runs on one shard (``ShardedSession`` needs
    one to build the empty result), where it matches nothing.
    """
    parent = orm_context.lazy_loaded_from if orm_context.is_select else None
    if parent is not None and parent.identity_token is not None:
        return [parent.identity_token]
    statement = orm_context.statement
    shards = shards_for(statement, orm_context.parameters)
    if orm_context.is_update:
        check_update_keeps_shard(statement, orm_context.parameters, shards)
    return shards or [SHARD_IDS[0]]


def check_update_keeps_shard(statement: Any, params: Any, shards: Iterable[str]) -> None:
    """Refuse a bulk UPDATE that would leave rows on the wrong shard.

    ``UPDATE weather_locations SET continent = 'Europe'`` run on the asia
    shard would store a European city in Asia's database, where no query for
    Europe would ever look. Moving a location means deleting it on one shard
    and inserting it on another (see :func:`shardlib.move_location`).
    """
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    for key, value in list(values.items()) + list(ordered):
        column = key.__clause_element__() if hasattr(key, "__clause_element__") else key
        name = column if isinstance(column, str) else getattr(column, "key", None)
        if name != "continent" and _column_role(column) != "continent":
            continue
        found = _values(value, params if isinstance(params, Mapping) else None, many=False)
        if found is _UNKNOWN:
            raise ValueError(
                "cannot check a bulk UPDATE of continent whose new value is not a "
                "literal; update continent through the ORM instead"
            )
        target = shard_for_continent(found[0])
        wrong = [s for s in shards if s != target]
        if wrong:
            raise ValueError(
                f"bulk UPDATE would set continent={found[0]!r} on rows stored on "
                f"{', '.join(map(repr, wrong))}, but {found[0]!r} belongs on {target!r}; "
                f"narrow the WHERE clause to {target!r} or move rows with "
                f"shardlib.move_location()"
            )
