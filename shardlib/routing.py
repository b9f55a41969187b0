"""Routing: the three questions ``ShardedSession`` asks, answered from the shard map.

``shard_chooser(mapper, instance)``
    Where does this new object go? (the continent's shard; a report follows
    its location)
``identity_chooser(mapper, primary_key)``
    Which identity-map tokens could hold this primary key? (a location id
    names its shard, so exactly one)
``execute_chooser(orm_context)``
    Which shards must run this SELECT / UPDATE / DELETE? (worked out from the
    WHERE clause by :func:`shardlib.analysis.shards_for`: exact, three-valued,
    alias-aware; see that module for how)

For example::

    continent = 'Asia' AND city = 'Tokyo'         -> asia
    continent = 'Asia' OR  city = 'Tokyo'         -> every shard
    NOT (continent = 'Asia')                      -> every shard but asia
    continent IN ('Asia', 'Atlantis')             -> asia
    continent = 'Atlantis'                        -> no shard at all

**Query more shards, never fewer.** Anything the analysis does not understand
becomes a free atom, which can only add shards. Rows of ``weather_reports``
live with their location, so a filter on the location reached through a join
narrows a query for reports as well.

The choosers only choose. What a statement may do once routed (write guards)
is :mod:`shardlib.guards`; how results from several shards are combined is
:mod:`shardlib.execution`. The upstream example's chooser never narrowed at
all; :mod:`shardlib.upstream` keeps it so the notebooks can show the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Mapper, ORMExecuteState

from .analysis import (  # re-exported: the analysis used to live here
    LOOKUP_ANSWERS,
    And,
    Const,
    ContinentIn,
    Free,
    IdIn,
    Node,
    Not,
    Or,
    can_be_true,
    describe,
    explain,
    on_shard,
    shards_for,
    shards_for_tree,
    to_tree,
)
from . import routecache
from .models import REFERENCE_TABLES, Report, WeatherLocation
from .shards import SERVING_SHARD_IDS, SHARD_IDS, shard_for_continent, shard_for_id

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
    table = getattr(type(instance), "__table__", None)
    if table is not None and table in REFERENCE_TABLES:
        name = type(instance).__name__
        raise ValueError(
            f"{name} is a reference table, copied to every shard: an object is flushed to one "
            f"shard only. Write its rows on every shard with "
            f"await session.execute(insert({name}), rows) (shardlib.reference)"
        )
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
    return list(SERVING_SHARD_IDS)  # Report ids are shard-local: any serving shard may have one


def shard_named_by_id(ident: Any) -> str | None:
    """The one shard ``session.get(WeatherLocation, ident)`` can find ``ident`` on, or ``None``
    (not a plain id: let the choosers decide). The same answer :func:`identity_chooser`
    gives, and :func:`execute_chooser` gives for ``WHERE id = ident``."""
    if isinstance(ident, (tuple, list)) and len(ident) == 1:
        ident = ident[0]
    if isinstance(ident, bool) or not isinstance(ident, int):
        return None
    return shard_for_id(ident)


def execute_chooser(orm_context: ORMExecuteState) -> list[str]:
    """Which shards run a statement that names no shard itself.

    A lazy load (``await location.awaitable_attrs.reports``) runs on the
    parent's shard. Everything else is routed by :func:`shards_for` (its answer
    remembered per statement and values: :mod:`shardlib.routecache`); if no shard
    can match, the statement still runs on one shard (``ShardedSession`` needs
    one to build the empty result), where it matches nothing.
    """
    parent = orm_context.lazy_loaded_from if orm_context.is_select else None
    if parent is not None and parent.identity_token is not None:
        return [parent.identity_token]
    answers = orm_context.local_execution_options.get(LOOKUP_ANSWERS)  # asked by shardlib.execution
    # shards_for, remembered by statement structure + bound values (shardlib.routecache); with
    # answers from lookup tables (data, not structure) routed afresh
    return routecache.shards(orm_context.statement, orm_context.parameters, lookups=answers) or [SHARD_IDS[0]]
