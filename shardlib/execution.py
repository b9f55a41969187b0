"""Execution: run a statement on its shards and answer exactly, or refuse.

``ShardedSession`` runs a statement on each shard its ``execute_chooser``
names and *concatenates* the results. For a plain fetch of rows that is
exactly what one database would return; for anything that sorts, slices,
summarises or de-duplicates it is a plausible wrong answer::

    select(WeatherLocation).order_by(WeatherLocation.city)     # sorted per shard only
    select(func.count()).select_from(WeatherLocation)          # four counts
    select(exists().where(WeatherLocation.continent == "Asia"))  # north_america answers first: False

:func:`execute` replaces ShardedSession's ``do_orm_execute`` hook. It keeps its
routing (pinned shard, else ``execute_chooser``, whose answers
:mod:`shardlib.routecache` remembers), runs a statement that reaches one shard
**once, in place** (the hook names the shard and ``Session.execute`` carries
on; ``ShardedSession`` would run it again through the session), and adds
three things:

1. **Write guards on every path**, pinned or not (:mod:`shardlib.guards`):
   a Core/ORM ``insert()`` is split row by row onto the shards the rows belong
   to, with ids from the global counter; a bulk ``UPDATE`` may not move a row
   to another shard.
2. **Locality**: a statement whose rows meet across shards (a self-join on
   ``city``, an uncorrelated subquery over a sharded table) is refused, even
   when it is routed to one shard, because no shard holds all it needs
   (:func:`shardlib.analysis.locality_problem`).
3. **Exact combination** of several shards' answers:

   ==============================================  ====================================
   statement                                        combined as
   ==============================================  ====================================
   plain rows (entities or columns)                 concatenated (exact)
   ``ORDER BY`` (+ ``LIMIT``/``OFFSET``)            each shard sorts and returns
                                                    ``LIMIT + OFFSET`` rows; merged in
                                                    order (NULLs where the database puts
                                                    them), then sliced
   ``LIMIT`` without ``ORDER BY``                   any ``LIMIT`` rows (as SQL promises)
   ``DISTINCT``                                     de-duplicated after merging
   ``UNION ALL`` / ``UNION``                        concatenated / de-duplicated
   ``select(exists().where(...))``                  OR of the shards' answers
   no sharded table at all (``select(literal(1))``)  run on one shard
   ==============================================  ====================================

   Everything else that reaches more than one shard (aggregates, ``GROUP
   BY``, ``HAVING``, window functions, ``INTERSECT``/``EXCEPT``, functions
   shardlib cannot classify, ``ORDER BY`` on something not selected, a
   ``COLLATE``, raw ``text()``) raises :class:`CrossShardRefused` naming the
   construct and the alternatives: :func:`shardlib.gather` (exact merging of
   aggregates for column queries), pinning one shard, or the explicit
   ``execution_options(shardlib_concatenate=True)``, which restores
   ShardedSession's concatenation for those who want per-shard answers
   (notebook 11 uses it to show why it is wrong).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.engine import Result
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import (
    ClauseList,
    ColumnClause,
    CollationClause,
    Label,
    Over,
    UnaryExpression,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import CompoundSelect, Exists, Select, ScalarSelect

from . import guards, joins, lookups, reference, routecache, routing
from .catalog import ENGINES_KEY as _ENGINES
from .catalog import refresh_map
from .analysis import canonical, shards_for
from .gather import UNMERGEABLE_AGGREGATES, GatherRefused, _function_kind, _nulls_first, _order_items
from .shards import SERVING_SHARD_IDS, SHARD_IDS

CONCATENATE = "shardlib_concatenate"
"""Execution option: ``True`` restores ShardedSession's plain concatenation."""

class CrossShardRefused(NotImplementedError):
    """A statement shardlib cannot answer exactly across the shards it reaches."""


def _alternatives(shards: Sequence[str]) -> str:
    where = f" (it reaches {', '.join(map(repr, shards))})" if shards else ""
    return (
        f"{where}. Alternatives: shardlib.gather(engines, statement) merges column queries "
        f"exactly (aggregates, GROUP BY, DISTINCT, ORDER BY/LIMIT); .options(set_shard_id(shard)) "
        f"or bind_arguments={{'shard_id': shard}} asks one shard; "
        f"execution_options(shardlib_concatenate=True) returns each shard's answer concatenated"
    )


def _refuse(what: str, shards: Sequence[str]) -> CrossShardRefused:
    return CrossShardRefused(f"cannot answer {what} exactly across shards{_alternatives(shards)}")


# ------------------------------------------------------------------ running


def pinned_shard(orm_context: ORMExecuteState) -> str | None:
    """The shard a statement names itself (``set_shard_id``, ``bind_arguments``, identity token)."""
    for option in orm_context._non_compile_orm_options:
        if isinstance(option, set_shard_id):
            return option.shard_id
    if orm_context.is_select:
        active = orm_context.load_options
    elif orm_context.is_update or orm_context.is_delete:
        active = orm_context.update_delete_options
    else:
        active = None
    if active is not None and active._identity_token is not None:
        return active._identity_token
    if "_sa_shard_id" in orm_context.execution_options:
        return orm_context.execution_options["_sa_shard_id"]
    return orm_context.bind_arguments.get("shard_id")


def _on(orm_context: ORMExecuteState, shard: str, statement: Any = None, params: Any = None) -> Result[Any]:
    bind_arguments = dict(orm_context.bind_arguments)
    bind_arguments["shard_id"] = shard
    orm_context.update_execution_options(identity_token=shard)
    if params is not None:
        session = orm_context.session
        bind_arguments["_sa_skip_events"] = True
        return session._execute_internal(  # invoke_statement merges params; these replace them
            statement if statement is not None else orm_context.statement,
            params,
            execution_options=orm_context.local_execution_options,
            bind_arguments=bind_arguments,
            _parent_execute_state=orm_context,
        )
    return orm_context.invoke_statement(statement=statement, bind_arguments=bind_arguments)


def _in_place(orm_context: ORMExecuteState, shard: str) -> None:
    """Run the statement once, on ``shard``, as the session's own execution.

    ``ShardedSession`` answers even a one-shard statement by executing it
    again through the session (``invoke_statement``): a second pass through
    ``Session.execute``'s option handling, for nothing. Here the hook only
    names the shard and returns ``None``, so ``Session.execute`` carries on
    and runs the statement itself, once, on that shard's connection (the
    ``identity_token`` keeps loaded objects in that shard's identity map,
    exactly as ``invoke_statement`` would). Hooks registered after this one
    still run, once.
    """
    orm_context.bind_arguments["shard_id"] = shard
    orm_context.update_execution_options(identity_token=shard)


def _concatenate(results: list[Result[Any]]) -> Result[Any]:
    return results[0].merge(*results[1:])


def execute(orm_context: ORMExecuteState) -> Result[Any] | None:
    """``do_orm_execute`` for shardlib sessions (see the module docstring)."""
    session = orm_context.session
    if _ENGINES in session.info:
        refresh_map(session)  # route by the catalog's current map (shardlib.catalog)
    statement = orm_context.statement
    params = orm_context.parameters
    pinned = pinned_shard(orm_context)
    if orm_context.is_insert:
        return _insert(orm_context, statement, params, pinned)
    if reference.is_reference_write(orm_context) and pinned is None:
        return _concatenate([_on(orm_context, s) for s in SHARD_IDS])  # every copy (shardlib.reference)
    if pinned is not None:
        if orm_context.is_update:
            guards.check_update(statement, params, [pinned])
        finish = lookups.before_update_or_delete(orm_context, [pinned]) if (
            orm_context.is_update or orm_context.is_delete) else None  # shardlib.lookups
        if finish is None:
            return _in_place(orm_context, pinned)
        result = _on(orm_context, pinned)  # run now: the lookup entries are finished after it
        finish()
        return result

    concatenate = bool(orm_context.execution_options.get(CONCATENATE))
    loader = statement.is_select and (orm_context.is_relationship_load or orm_context.is_column_load)
    if not concatenate and not loader and isinstance(statement, (Select, CompoundSelect)):
        if isinstance(statement, Select) and session.execute_chooser is routing.execute_chooser:
            shard = routecache.one_shard(statement, params)  # the common case: what the steps below
            if shard is not None:  # would decide, remembered whole, one lookup
                return _in_place(orm_context, shard)
        problem, reads_sharded, exists_only = routecache.facts(statement)  # locality(), remembered
        if problem and (orm_context.execution_options.get(joins.CROSS_SHARD_JOIN)
                        or orm_context.local_execution_options.get(joins.CROSS_SHARD_JOIN)):
            return _cross_shard_join(orm_context, statement, params)  # shardlib.joins
        if problem:
            raise CrossShardRefused(f"cannot run this statement shard by shard: {problem}{_alternatives([])}; "
                                    f"a join: .execution_options({joins.CROSS_SHARD_JOIN}=True) joins it in the "
                                    f"application (shardlib.joins)")
        if not reads_sharded:
            return _in_place(orm_context, SERVING_SHARD_IDS[0])  # select(literal(1)): one answer, not four
        if exists_only:
            return _exists(orm_context, statement, params)

    # ---- lookup tables (shardlib.lookups): ask them first; the chooser reads their answers
    answers = None if loader else lookups.ask(orm_context)
    if answers is not None and orm_context.is_select and isinstance(statement, Select) and not shards_for(
            statement, params if isinstance(params, Mapping) else None, lookups=answers):
        return _empty(statement)  # the lookup says no shard holds such a row: ask none
    # ----
    shards = list(session.execute_chooser(orm_context))
    if orm_context.is_update:
        guards.check_update(statement, params, shards)
    if not shards:
        shards = [SERVING_SHARD_IDS[0]]
    if orm_context.is_update or orm_context.is_delete:  # lookup entries of the rows it changes
        finish = lookups.before_update_or_delete(orm_context, shards)  # (shardlib.lookups)
        if finish is not None:
            result = _on(orm_context, shards[0]) if len(shards) == 1 else _concatenate(
                [_on(orm_context, s) for s in shards])
            finish()
            return result
    if len(shards) == 1:
        return _in_place(orm_context, shards[0])
    if concatenate or loader or not orm_context.is_select:
        if not (concatenate or loader) and not (orm_context.is_update or orm_context.is_delete):
            raise _refuse(f"{type(statement).__name__} (shardlib cannot see what it reads)", shards)
        return _concatenate([_on(orm_context, s) for s in shards])
    if isinstance(statement, CompoundSelect):
        return _compound(orm_context, statement, shards)
    return _select(orm_context, statement, shards)


# ------------------------------------------------------------------ INSERT


def _insert(orm_context: ORMExecuteState, statement: Any, params: Any, pinned: str | None) -> Result[Any]:
    table = guards.target_table_name(statement)
    if table in reference.REFERENCE_TABLE_NAMES and pinned is None:  # every copy (shardlib.reference)
        rows, expressions = guards.insert_rows(statement, params)
        return _concatenate([_on(orm_context, s, _core_insert(statement, expressions), rows) for s in SHARD_IDS])
    if table not in (guards.LOCATIONS, guards.REPORTS):
        if pinned is None:
            raise ValueError(
                f"INSERT into {table!r} through a sharded session names no shard; pass "
                f"bind_arguments={{'shard_id': ...}} with one of {', '.join(map(repr, SERVING_SHARD_IDS))}"
            )
        return _on(orm_context, pinned)
    from .session import allocate_ids, reserve_ids

    session = orm_context.session
    rows, expressions = guards.insert_rows(statement, params)
    per_shard = guards.route_insert_rows(
        table, rows, pinned,
        allocate=lambda n: allocate_ids(session, n),
        reserve=lambda numbers: reserve_ids(session, numbers),
    )
    if table == guards.LOCATIONS:
        lookups.after_insert_routing(session, per_shard)  # entries before the rows (shardlib.lookups)
    shard_statement = _core_insert(statement, expressions)
    results = [_on(orm_context, shard, shard_statement, shard_rows) for shard, shard_rows in per_shard.items()]
    return _concatenate(results)


def _core_insert(statement: Any, expressions: Mapping[str, Any]) -> Any:
    """A Core INSERT per shard: the ORM's bulk path refuses per-shard connections."""
    from sqlalchemy import insert

    shard_statement = insert(canonical(statement.table))
    if expressions:
        shard_statement = shard_statement.values(**expressions)
    if statement._returning:
        shard_statement = shard_statement.returning(*statement._returning)
    return shard_statement


def _empty(statement: Select[Any]) -> Result[Any]:
    """The result of a SELECT that no shard needs to run: its columns, no rows."""
    from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData

    keys = [d.get("name") or f"column_{i}" for i, d in enumerate(statement.column_descriptions)]
    return IteratorResult(SimpleResultMetaData(keys), iter([]))


def _cross_shard_join(orm_context: ORMExecuteState, statement: Any, params: Any) -> Result[Any]:
    """A join the shards cannot answer alone, as a hash join here (:mod:`shardlib.joins`):
    each side read from the shards it needs (lookups included), inside this session."""
    session = orm_context.session
    bound = params if isinstance(params, Mapping) else None

    def read_side(side: Any) -> list[tuple[Any, ...]]:
        answers = lookups.answers_for(session, side, bound)
        shards = shards_for(side, bound, lookups=answers)
        return [tuple(row) for shard in shards for row in _on(orm_context, shard, side).all()]

    dialect = session.get_bind(shard_id=SHARD_IDS[0]).dialect.name
    try:
        return joins.run(orm_context, statement, read_side, dialect)
    except joins.JoinRefused as refused:
        raise CrossShardRefused(f"cannot join in the application: {refused}{_alternatives([])}") from None


# ------------------------------------------------------------------ EXISTS


def _exists(orm_context: ORMExecuteState, statement: Select[Any], params: Any) -> Result[Any]:
    """``select(exists()...)``: TRUE if any shard says TRUE (routed by the inner WHERE)."""
    inner = [c for c in _visit_exists(statement)]
    needed: set[str] = set()
    for element in inner:
        needed.update(shards_for(element, params if isinstance(params, Mapping) else None))
    shards = [s for s in SERVING_SHARD_IDS if s in needed] or [SERVING_SHARD_IDS[0]]
    frozen = [_on(orm_context, s).freeze() for s in shards]
    rows = _rows(frozen)
    merged = tuple(any(bool(row[i]) for row in rows) for i in range(len(rows[0]))) if rows else ()
    return frozen[0].with_new_rows([merged] if rows else [])()


def _visit_exists(statement: Select[Any]) -> list[Any]:
    found = []
    for column in statement.selected_columns:
        while isinstance(column, Label):
            column = column.element
        if isinstance(column, Exists):
            inner = column.element
            while not isinstance(inner, Select):  # EXISTS wraps its SELECT in a grouping / scalar select
                inner = inner.element
            found.append(inner)
    return found


# ------------------------------------------------------------------ SELECT


def _function_problem(expr: Any) -> str | None:
    """An aggregate, window function or unclassifiable function in ``expr`` (not in subqueries)."""
    stack = [expr]
    while stack:
        element = stack.pop()
        if isinstance(element, (Select, ScalarSelect, Exists)):
            continue  # a nested SELECT is checked by locality_problem: it runs per outer row
        if isinstance(element, Over):
            return f"the window function {element}"
        if isinstance(element, FunctionElement):  # classified exactly as gather classifies it
            name = (getattr(element, "name", "") or "").lower()
            try:
                kind = _function_kind(element)
            except GatherRefused:
                if name in UNMERGEABLE_AGGREGATES:
                    return f"the aggregate {name}()"
                return f"the function {name}() (shardlib cannot tell whether it is an aggregate)"
            if kind == "aggregate":
                return f"the aggregate {name}()"
        stack.extend(element.get_children())
    return None


def _row_wise_problem(select: Select[Any]) -> str | None:
    if select._group_by_clauses:
        return "GROUP BY"
    if select._having_criteria:
        return "HAVING"
    if select._distinct_on:
        return "DISTINCT ON"
    for column in select.selected_columns:
        problem = _function_problem(column)
        if problem:
            return problem
    for clause in select._order_by_clauses:
        problem = _function_problem(clause)
        if problem:
            return f"{problem} in ORDER BY"
    return None


def _int(clause: Any) -> int | None | object:
    if clause is None:
        return None
    value = getattr(clause, "value", None)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return _UNREADABLE


_UNREADABLE = object()
def _same(a: Any, b: Any) -> bool:
    while isinstance(a, Label):
        a = a.element
    while isinstance(b, Label):
        b = b.element
    return a is b or canonical(a) is canonical(b) or a.compare(b)


def _key_getter(statement: Select[Any], item: Any) -> Any:
    """A function row -> sort value for one ORDER BY item, or ``None`` if it cannot be read."""
    if isinstance(item, CollationClause) or any(isinstance(e, CollationClause) for e in _walk(item)):
        return None
    columns = list(statement.selected_columns)
    descriptions = statement.column_descriptions
    entity_rows = any(d.get("entity") is not None and d.get("expr") is d.get("entity") for d in descriptions)
    if isinstance(item, _textual_label_reference):
        name = item.element
        matches = [i for i, c in enumerate(columns) if getattr(c, "key", None) == name or getattr(c, "name", None) == name]
        if len(matches) == 1 and not entity_rows:
            return lambda row, i=matches[0]: row[i]
        return None
    if not entity_rows:
        position = next((i for i, c in enumerate(columns) if _same(item, c)), None)
        return None if position is None else (lambda row, i=position: row[i])
    # ORM rows: each description is one position of the row (an entity or a column)
    for position, description in enumerate(descriptions):
        expr, entity = description.get("expr"), description.get("entity")
        if entity is not None and expr is entity and isinstance(item, ColumnClause):
            info = inspect(entity)
            if canonical(item.table) is canonical(info.selectable) and item.key in info.mapper.attrs:
                return lambda row, i=position, key=item.key: _loaded(row[i], key)
        elif expr is not None and not (entity is not None and expr is entity):
            clause = expr.__clause_element__() if hasattr(expr, "__clause_element__") else expr
            if _same(item, clause):
                return lambda row, i=position: row[i]
    return None


def _loaded(obj: Any, key: str) -> Any:
    if obj is None:
        return None
    state = inspect(obj)
    if key not in state.dict:
        raise CrossShardRefused(f"ORDER BY {key}: the attribute is not loaded on {obj!r}; load it (undefer) to merge across shards")
    return state.dict[key]


def _walk(element: Any) -> list[Any]:
    found, stack = [], [element]
    while stack:
        e = stack.pop()
        found.append(e)
        stack.extend(e.get_children())
    return found


def _compare(keys: Sequence[tuple[Any, bool, bool]], a: Any, b: Any) -> int:
    for getter, descending, nulls_first in keys:
        x, y = getter(a), getter(b)
        if x == y or (x is None and y is None):
            continue
        if x is None or y is None:
            first = (x is None) == nulls_first
            return -1 if first else 1
        smaller = x < y
        if descending:
            smaller = not smaller
        return -1 if smaller else 1
    return 0


def _select(orm_context: ORMExecuteState, statement: Select[Any], shards: list[str]) -> Result[Any]:
    problem = _row_wise_problem(statement)
    if problem:
        if _has_entities(statement):
            raise _refuse(f"{problem} over ORM entities", shards)
        return _gathered(orm_context, statement, shards, problem)
    limit, offset = _int(statement._limit_clause), _int(statement._offset_clause)
    if limit is _UNREADABLE or offset is _UNREADABLE:
        raise _refuse("a LIMIT/OFFSET given as an expression", shards)
    dialect = orm_context.session.get_bind(shard_id=shards[0]).dialect.name
    width = len(statement.column_descriptions)
    shard_statement = statement
    keys, extra = [], []
    for item, descending, nulls_first in _order_items(statement):
        getter = _key_getter(statement, item)
        if getter is None:
            if (isinstance(item, (CollationClause, _textual_label_reference))
                    or any(isinstance(e, CollationClause) for e in _walk(item)) or statement._distinct):
                raise _refuse(f"ORDER BY {item} (with COLLATE, by name, or under DISTINCT: not a "
                              f"selected column)", shards)
            # fetch the sort value beside each row, merge on it, drop it afterwards
            position = width + len(extra)
            extra.append(item.label(f"shardlib_order_{len(extra)}"))
            getter = lambda row, i=position: row[i]  # noqa: E731
        keys.append((getter, descending, _nulls_first(dialect, descending, nulls_first)))
    if extra:
        shard_statement = shard_statement.add_columns(*extra)
    if limit is not None or offset:
        shard_statement = shard_statement.offset(None).limit(None if limit is None else limit + (offset or 0))
    needs_merge = bool(keys) or statement._distinct or limit is not None or offset
    if not needs_merge:
        return _concatenate([_on(orm_context, s) for s in shards])
    frozen = [_on(orm_context, s, shard_statement).freeze() for s in shards]
    rows = _rows(frozen)
    if keys:
        rows.sort(key=functools.cmp_to_key(functools.partial(_compare, keys)))
    if statement._distinct:
        rows = _distinct(rows)
    start = offset or 0
    rows = rows[start:] if limit is None else rows[start:start + limit]
    result = frozen[0].with_new_rows(rows)()
    return result.columns(*range(width)) if extra else result


def _has_entities(statement: Select[Any]) -> bool:
    return any(d.get("entity") is not None and d.get("expr") is d.get("entity")
               for d in statement.column_descriptions)


def _gathered(orm_context: ORMExecuteState, statement: Any, shards: list[str], problem: str) -> Result[Any]:
    """Aggregates, GROUP BY, ... over columns: merged exactly as :func:`shardlib.gather` merges,
    each shard read inside this session's own transaction (it sees the session's writes)."""
    from sqlalchemy.engine.result import IteratorResult, SimpleResultMetaData

    from .gather import GatherRefused, plan

    dialect = orm_context.session.get_bind(shard_id=shards[0]).dialect
    try:
        the_plan = plan(statement, dialect)
    except GatherRefused as refused:
        raise CrossShardRefused(f"cannot answer {problem} exactly across shards: {refused}"
                                f"{_alternatives(shards)}") from None
    if the_plan.one_shard:
        shards = shards[:1]
    answers = [_rows([_on(orm_context, s, the_plan.shard_statement).freeze()]) for s in shards]
    return IteratorResult(SimpleResultMetaData(list(the_plan.keys)), iter(the_plan.merge(answers)))


def _distinct(rows: list[Any]) -> list[Any]:
    seen: set[Any] = set()
    kept = []
    for row in rows:
        key = tuple(row)
        try:
            if key in seen:
                continue
            seen.add(key)
        except TypeError:
            raise CrossShardRefused("DISTINCT over values that cannot be compared in Python (unhashable)") from None
        kept.append(row)
    return kept


def _compound(orm_context: ORMExecuteState, statement: CompoundSelect, shards: list[str]) -> Result[Any]:
    keyword = statement.keyword.name if hasattr(statement.keyword, "name") else str(statement.keyword)
    if not any(_has_entities(part) for part in statement.selects if isinstance(part, Select)):
        # columns: gather's plan merges UNION / UNION ALL exactly (collations, ORDER BY, LIMIT)
        return _gathered(orm_context, statement, shards, keyword.replace("_", " "))
    if keyword not in ("UNION", "UNION_ALL"):
        raise _refuse(keyword.replace("_", " "), shards)
    if statement._order_by_clauses or statement._limit_clause is not None or statement._offset_clause is not None:
        raise _refuse(f"ORDER BY/LIMIT/OFFSET on a {keyword.replace('_', ' ')}", shards)
    for part in statement.selects:
        if not isinstance(part, Select):
            raise _refuse(f"a nested set operation inside {keyword.replace('_', ' ')}", shards)
        problem = _row_wise_problem(part)
        if problem or part._limit_clause is not None or part._offset_clause is not None:
            raise _refuse(f"{problem or 'LIMIT/OFFSET'} inside a {keyword.replace('_', ' ')}", shards)
    if keyword == "UNION_ALL":
        return _concatenate([_on(orm_context, s) for s in shards])
    frozen = [_on(orm_context, s).freeze() for s in shards]
    return frozen[0].with_new_rows(_distinct(_rows(frozen)))()


def _rows(frozen: list[Any]) -> list[tuple[Any, ...]]:
    """Every shard's rows as tuples (a one-entity ORM result stores bare objects)."""
    if frozen[0]._source_supports_scalars:
        return [(row,) for f in frozen for row in f.data]
    return [tuple(row) for f in frozen for row in f.data]
