"""Write guards: a row is written on the shard its key names, or not at all.

Every path that writes goes through one of these checks, *pinned or not*
(``set_shard_id(...)`` and ``bind_arguments={"shard_id": ...}`` never reach
``execute_chooser``, so a guard that lived there would be skipped):

* :func:`route_insert_rows`: a Core or ORM ``insert()`` executed through the
  session is split by row: each row goes to the shard of its continent (a
  report: of its ``location_id``), new locations take ids from the global
  counter, explicit ids must name the right shard and are reserved in the
  counter, and a bad value raises before any SQL runs anywhere.
* :func:`check_update`: a bulk ``UPDATE`` may not set a continent (or a
  report's ``location_id``) that belongs on another shard than the one the
  row is stored on, nor change a location's id (ids name their shard), whether
  the new value comes from ``.values()`` or from execute-time parameters.
* ORM flushes are checked in :mod:`shardlib.session` (``before_flush``) with
  the same rules.

Errors name the bad value, the shards involved and what would have been valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.sql.elements import BindParameter, ClauseElement, Grouping
from sqlalchemy.sql.selectable import Alias

from .analysis import _UNKNOWN, Params, _bind_value
from .shards import SHARD_IDS, check_shard_id, shard_for_continent, shard_for_id

LOCATIONS, REPORTS = "weather_locations", "weather_reports"


def target_table_name(statement: Any) -> str | None:
    table = getattr(statement, "table", None)
    while isinstance(table, Alias):
        table = table.element
    return getattr(table, "name", None)


def _column_key(key: Any) -> str | None:
    if isinstance(key, str):
        return key
    if hasattr(key, "__clause_element__"):
        key = key.__clause_element__()
    return getattr(key, "key", None) or getattr(key, "name", None)


def _literal(value: Any, params: Params | None) -> Any:
    while isinstance(value, Grouping):
        value = value.element
    if isinstance(value, BindParameter):
        return _bind_value(value, params)
    if isinstance(value, ClauseElement):
        return _UNKNOWN
    return value


def _bind_keys(statement: Any) -> set[str]:
    from sqlalchemy.sql import visitors

    return {e.key for e in visitors.iterate(statement) if isinstance(e, BindParameter)}


def set_clause(statement: Any, params: Mapping[str, Any] | None) -> dict[str, Any]:
    """Column name -> new value (or ``_UNKNOWN`` for an SQL expression) of an UPDATE.

    Includes execute-time parameters whose key names a column of the table and
    no bind of the statement: SQLAlchemy turns those into ``SET column = ?``.
    """
    bound = Params(params, statement) if params else None
    found: dict[str, Any] = {}
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    for key, value in list(values.items()) + list(ordered):
        name = _column_key(key)
        if name is not None:
            found[name] = _literal(value, bound)
    if params:
        columns = {c.key for c in statement.table.columns}
        bind_keys = _bind_keys(statement)
        for key, value in params.items():
            if key in columns and key not in bind_keys and key not in found:
                found[key] = value
    return found


def _quoted(values: Sequence[Any]) -> str:
    return ", ".join(map(repr, values))


def check_update(statement: Any, params: Any, shards: Sequence[str]) -> None:
    """Refuse a bulk UPDATE that would leave a row where no query will find it.

    ``shards`` are the shards the UPDATE runs on (routed or pinned).
    """
    table = target_table_name(statement)
    if table not in (LOCATIONS, REPORTS):
        return
    param_sets = params if isinstance(params, Sequence) and not isinstance(params, Mapping) else [params]
    for param_set in param_sets:
        changes = set_clause(statement, param_set)
        if table == LOCATIONS and "continent" in changes:
            _check_new_home(changes["continent"], shard_for_continent, "continent", shards)
            _check_same_logical_shard(changes["continent"], shards)
        if table == LOCATIONS and "id" in changes:
            raise ValueError(
                f"bulk UPDATE would change weather_locations.id to {changes['id']!r} on "
                f"{_quoted(shards)}: a location's id names its shard and its reports point "
                f"at it, so it cannot change; use shardlib.move_location() to re-home a location"
            )
        if table == REPORTS and "location_id" in changes:
            _check_new_home(changes["location_id"], _shard_of_location_id, "location_id", shards)


def _shard_of_location_id(value: Any) -> str:
    shard = shard_for_id(value)
    if shard is None:
        raise ValueError(f"location_id {value!r} names no shard; valid ids end in a shard index 0-{len(SHARD_IDS) - 1}")
    return shard


def _check_new_home(value: Any, home_of: Any, column: str, shards: Sequence[str]) -> None:
    if value is _UNKNOWN:
        raise ValueError(
            f"cannot check a bulk UPDATE of {column} whose new value is an SQL expression "
            f"(it could send rows to another shard); set {column} to a literal, or change "
            f"objects through the ORM"
        )
    target = home_of(value)
    wrong = [s for s in shards if s != target]
    if wrong:
        raise ValueError(
            f"bulk UPDATE would set {column}={value!r} on rows stored on {_quoted(wrong)}, "
            f"but {value!r} belongs on {target!r}; narrow the WHERE clause to {target!r} "
            f"or move rows with shardlib.move_location()"
        )


def _check_same_logical_shard(continent: Any, shards: Sequence[str]) -> None:
    """Ids name a continent's logical shard: on a database that also stores other
    continents, SET continent could give rows a continent their ids do not name."""
    from .shards import continents_on

    others = sorted({c for s in shards for c in continents_on(s)} - {continent})
    if others:
        raise ValueError(
            f"bulk UPDATE would set continent={continent!r} on {_quoted(shards)}, which also "
            f"stores {_quoted(others)}: those rows' ids name another logical shard, so their "
            f"continent cannot change in place; use shardlib.move_location() per location"
        )


# ------------------------------------------------------------------ INSERT


def insert_rows(statement: Any, params: Any) -> tuple[list[dict[str, Any]], dict[Any, Any]]:
    """The rows an INSERT will write, as dicts, and the SQL-expression values it sets.

    Rows come from ``.values(...)`` (one row or a list of rows) merged with the
    execute-time parameters (one dict, or a list for executemany). Values that
    are SQL expressions (``func.now()``) stay in the statement; they are returned
    separately keyed by column name.
    """
    if getattr(statement, "select", None) is not None:
        raise ValueError(
            "INSERT ... FROM SELECT through a sharded session cannot be routed row by row "
            "(the rows do not exist yet when the shard is chosen); select the rows, then "
            "insert them, or pin one shard with bind_arguments={'shard_id': ...}"
        )
    base: dict[str, Any] = {}
    expressions: dict[str, Any] = {}
    for key, value in (getattr(statement, "_values", None) or {}).items():
        name = _column_key(key)
        literal = _literal(value, None)
        if literal is _UNKNOWN:
            expressions[name] = value
        else:
            base[name] = literal
    rows: list[dict[str, Any]] = []
    multi = getattr(statement, "_multi_values", None) or ()
    for group in multi:
        for row in group:
            if isinstance(row, Mapping):
                rows.append({**base, **{_column_key(k): _literal(v, None) for k, v in row.items()}})
            else:
                columns = [c.key for c in statement.table.columns]
                rows.append({**base, **{k: _literal(v, None) for k, v in zip(columns, row)}})
    if not rows:
        rows = [dict(base)]
    if params:
        param_sets = [params] if isinstance(params, Mapping) else list(params)
        if len(rows) == 1:
            rows = [{**rows[0], **p} for p in param_sets]
        else:
            raise ValueError("cannot combine a multi-row VALUES clause with execute-time parameters")
    for row in rows:
        for name, value in row.items():
            if value is _UNKNOWN:
                raise ValueError(f"INSERT value for {name!r} is an SQL expression shardlib cannot route; pass a literal")
    return rows, expressions


def check_explicit_id(what: str, location_id: Any, continent: str, shard: str) -> None:
    """An explicit location id must name its continent's logical shard (which
    ``shard``, a database, holds today)."""
    from .shards import current, slot_for_continent, slot_of_id

    named = shard_for_id(location_id)
    if named is None or slot_of_id(location_id) != slot_for_continent(continent):
        owner = current().continent_for_slot(slot_of_id(location_id)) if isinstance(location_id, int) and not isinstance(location_id, bool) else None
        raise ValueError(
            f"{what}: id {location_id!r} names shard {named!r}"
            + (f" (logical shard of {owner!r})" if owner is not None and owner != continent else "")
            + f", but continent {continent!r} is stored on {shard!r}; leave the id unset and "
            f"shardlib will allocate one"
        )


def route_insert_rows(
    table: str, rows: list[dict[str, Any]], pinned: str | None, allocate: Any, reserve: Any
) -> dict[str, list[dict[str, Any]]]:
    """Validate every row, give new locations ids, and group rows by shard.

    ``allocate(n)`` returns ``n`` fresh sequence numbers; ``reserve(ids)``
    records explicit ids in the counter. Nothing is allocated or reserved, and
    no SQL runs, unless every row is valid.
    """
    from .shards import SHARD_BITS, make_id

    shards: list[str] = []
    continents: list[Any] = []
    needs_id: list[int] = []
    explicit: list[int] = []
    for position, row in enumerate(rows):
        if table == LOCATIONS:
            if "continent" not in row:
                raise ValueError(f"INSERT into weather_locations without a continent: {row!r}; the continent chooses the shard")
            shard = shard_for_continent(row["continent"])
            continents.append(row["continent"])
            location_id = row.get("id")
            if location_id is None:
                needs_id.append(position)
            else:
                check_explicit_id(f"INSERT of {row!r}", location_id, row["continent"], shard)
                explicit.append(location_id)
        else:
            continents.append(None)
            shard = shard_for_id(row.get("location_id"))
            if shard is None:
                raise ValueError(
                    f"INSERT into weather_reports with location_id={row.get('location_id')!r}: a report "
                    f"is stored with its location, and that id names no shard"
                )
        if pinned is not None and shard != pinned:
            raise ValueError(
                f"INSERT pinned to shard {pinned!r} has a row that belongs on {shard!r}: {row!r}; "
                f"drop the pin and shardlib routes each row to its shard"
            )
        shards.append(shard)
    if explicit:
        reserve([i >> SHARD_BITS for i in explicit])
    if needs_id:
        for position, number in zip(needs_id, allocate(len(needs_id))):
            rows[position] = {**rows[position], "id": make_id(number, continents[position])}
    grouped: dict[str, list[dict[str, Any]]] = {}
    for shard, row in zip(shards, rows):
        grouped.setdefault(shard, []).append(row)
    return {s: grouped[s] for s in SHARD_IDS if s in grouped}


__all__ = ["check_update", "insert_rows", "route_insert_rows", "set_clause", "check_shard_id"]
