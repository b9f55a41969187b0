"""Routing decisions, remembered: the same statement with the same values routes the same way.

Routing a statement (:func:`shardlib.analysis.shards_for`) and checking that
its shards can answer it alone (:func:`shardlib.analysis.locality`) read the
statement's structure and its bound values; for a small SELECT that is a
tenth of a millisecond, about as long as SQLite takes to answer it. Programs
run the same few statements again and again, so shardlib remembers the
answers, keyed the way SQLAlchemy keys its own compiled-SQL cache::

    statement._generate_cache_key()       # structure: same key, same SQL text
        .key                              # (SQLAlchemy computes it anyway, once per
        .bindparams                       #  statement object, to find the compiled SQL)

The caches, each answer a pure function of what is in its key:

=========================  =================================================
question                   key
=========================  =================================================
*where may it run?*        the cache key's structure only: whether every
(locality, EXISTS)         shard can answer alone depends on FROM elements,
                           joins and functions, never on values
*which shards?*            the structure **plus every bound value** in the
(``shards_for``)           statement, **plus the execute-time parameters**:
                           ``continent == 'Asia'`` and ``continent ==
                           'Europe'`` share a cache key and differ in their
                           values
*the one shard of a plain*  the same key (:func:`one_shard`): locality,
*SELECT*                   lookups and routes in one lookup, for the
                           statement most programs run most often
*gather's plan*            the same, plus the dialect (:func:`plan`: a plan
(:func:`shardlib.gather`)  carries the statement's own values)
=========================  =================================================

Values go into the key *with their type* (``1``, ``1.0`` and ``True`` are
equal, and hash alike, in Python, but are three different SQL comparisons:
``shard_for_id(True)`` is no shard). A statement is not cached, and is
routed afresh every time, when

* SQLAlchemy cannot key it (``_generate_cache_key()`` is ``None``);
* a bound value is computed when it runs (``bindparam(callable_=...)``);
* a value is not plain data (``str``, ``int``, ``float``, ``bool``, ``None``,
  ``bytes``, ``Decimal``, dates and times, ``UUID``, or lists and tuples of
  them: a custom object could change between two runs without changing its
  hash), or is a list longer than :data:`MAX_LIST`.

And every cache starts empty again when the shard map changes
(``shards.current()`` is a new map).

A cache hit therefore routes exactly as a miss would;
``tests/test_routing_cache.py`` checks it with the generative oracle (every
statement run cold and warm: same shards, same rows as one unsharded
database). ``stats()`` counts hits and misses; ``clear()`` forgets
everything; ``ENABLED = False`` switches caching off.
"""

from __future__ import annotations

import datetime
import decimal
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from . import shards as _shards
from .analysis import is_exists_only, locality, shards_for
from .analysis import lookup_values as _lookup_values

ENABLED = True
"""``False``: every statement is analysed afresh (what a cache miss does)."""

CAPACITY = 2000
"""Entries per cache; a full cache is emptied and fills again."""

MAX_LIST = 256
"""Longer IN lists (and executemany parameter lists) are routed afresh, not remembered:
a key as big as the statement's data would cost more to build and keep than it saves."""

_PLAIN = (str, int, float, bool, type(None), bytes, decimal.Decimal, datetime.date, datetime.datetime,
          datetime.time, datetime.timedelta, uuid.UUID)


class _Unkeyable(Exception):
    """A value whose routing cannot be remembered safely."""


def _freeze(value: Any) -> Any:
    """``value`` as a hashable key part that keeps its type (``1`` is not ``1.0`` is not ``True``)."""
    kind = type(value)
    if kind in _PLAIN:
        return (kind, value)
    if kind in (list, tuple) and len(value) <= MAX_LIST:
        return (kind, tuple(_freeze(v) for v in value))
    raise _Unkeyable


def _freeze_params(params: Any) -> Any:
    if not params:
        return ()
    if isinstance(params, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in params.items()))
    if len(params) > MAX_LIST:
        raise _Unkeyable
    return tuple(_freeze_params(p) for p in params)  # executemany: one entry per parameter set


class _Caches:
    """Five bounded dicts (emptied when full: simpler and cheaper per hit than an LRU)."""

    def __init__(self) -> None:
        self.facts: dict[Any, tuple[str | None, bool, bool]] = {}
        self.routes: dict[Any, tuple[str, ...]] = {}
        self.plans: dict[Any, Any] = {}
        self.lookups: dict[Any, dict[str, frozenset[str]]] = {}
        self.single: dict[Any, str] = {}
        self.shard_map: Any = None
        self.hits = 0
        self.misses = 0
        self.uncached = 0

    def current(self) -> _Caches:
        """Forget everything if the shard map is not the one the answers were made with."""
        shard_map = _shards.current()
        if shard_map is not self.shard_map:
            self.facts.clear()
            self.routes.clear()
            self.plans.clear()
            self.lookups.clear()
            self.single.clear()
            self.shard_map = shard_map
        return self

    def remember(self, cache: dict[Any, Any], key: Any, value: Any) -> Any:
        self.misses += 1
        if len(cache) >= CAPACITY:
            cache.clear()
        cache[key] = value
        return value


_caches = _Caches()


class _Structure:
    """A statement's cache key (its structure), hashed once: the key is a deep tuple,
    and both caches look it up for the same statement."""

    __slots__ = ("key", "hash", "bindparams")

    def __init__(self, cache_key: Any) -> None:
        self.key = cache_key.key
        self.hash = hash(self.key)
        self.bindparams = cache_key.bindparams

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Structure) and self.hash == other.hash and self.key == other.key


_last: tuple[Any, _Structure | None] = (None, None)  # the last statement looked at, its _Structure


def _structure(statement: Any) -> _Structure | None:
    global _last
    last = _last  # one tuple, replaced whole: threads never see a statement with another's key
    if statement is last[0]:  # execute() asks for the facts, the chooser for the shards: one hash
        return last[1]
    try:
        cache_key = statement._generate_cache_key()  # memoized by SQLAlchemy; its compile uses it too
    except (AttributeError, NotImplementedError):
        return None
    structure = _Structure(cache_key) if cache_key is not None else None
    _last = (statement, structure)
    return structure


def _remembered(name: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, remembered in the cache called ``name`` under ``key``
    (``None``: this statement cannot be remembered; it is counted as uncached)."""
    if key is None:
        _caches.uncached += 1
        return compute()
    caches = _caches.current()
    cache = getattr(caches, name)
    found = cache.get(key)
    if found is None:
        return caches.remember(cache, key, compute())
    caches.hits += 1
    return found


def facts(statement: Any) -> tuple[str | None, bool, bool]:
    """``(locality problem or None, reads a sharded table?, select(exists(...)) only?)``."""
    return _remembered("facts", _structure(statement) if ENABLED else None,  # type: ignore[no-any-return]
                       lambda: (*locality(statement), is_exists_only(statement)))


def route_key(statement: Any, params: Any) -> Any:
    """The key under which ``shards_for(statement, params)`` is remembered, or ``None``.

    Structure, every bound value with its type, and the execute-time parameters.
    """
    structure = _structure(statement)
    if structure is None:
        return None
    try:
        values = []
        for bind in structure.bindparams:
            if bind.callable is not None:  # computed at each run: may differ next time
                return None
            values.append(_freeze(bind.value))
        return (structure, tuple(values), _freeze_params(params))
    except _Unkeyable:
        return None


def shards(statement: Any, params: Any = None, lookups: Any = None) -> list[str]:
    """:func:`shardlib.analysis.shards_for`, remembered (see the module docstring).

    ``lookups``: answers read from lookup tables for this statement (data, not
    structure): with them the statement is routed afresh, never remembered."""
    if lookups is not None:
        _caches.uncached += 1
        return shards_for(statement, params, lookups=lookups)
    return list(_remembered("routes", route_key(statement, params) if ENABLED else None,
                            lambda: tuple(shards_for(statement, params))))


def lookup_values(statement: Any, params: Any = None) -> dict[str, set[str]]:
    """:func:`shardlib.analysis.lookup_values` (which lookup values a WHERE asks for: no I/O,
    a pure function of the statement, its values and the parameters), remembered under the
    routing key. Most statements ask for none: they then cost a dictionary lookup."""
    found = _remembered("lookups", route_key(statement, params) if ENABLED else None,
                        lambda: {name: frozenset(values) for name, values in _lookup_values(statement, params).items()})
    return {name: set(values) for name, values in found.items()}  # the caller's own copy


def one_shard(statement: Any, params: Any = None) -> str | None:
    """The one shard a SELECT runs on when nothing but its routing decides it, or ``None``.

    The common case in one dictionary lookup (keyed as the routes are): a SELECT
    that reads a sharded table, that every shard can answer alone, that is not an
    EXISTS probe, whose WHERE names no lookup value (city, station: the lookup
    tables would have to be asked, and their answers are data, never remembered)
    and that :func:`shardlib.analysis.shards_for` sends to exactly one shard.
    Anything else is ``None``: the caller takes the full path, which asks each of
    those questions in turn (and remembers each answer on its own).
    """
    found = _remembered("single", route_key(statement, params) if ENABLED else None,
                        lambda: _one_shard(statement, params))
    return found or None


def _one_shard(statement: Any, params: Any) -> str:
    problem, reads_sharded, exists_only = facts(statement)
    if problem or not reads_sharded or exists_only or _lookup_values(statement, params):
        return ""  # remembered too: "take the full path"
    found = shards_for(statement, params)
    return found[0] if len(found) == 1 else ""


def plan(statement: Any, dialect: Any, make_plan: Any) -> Any:
    """``make_plan(statement, dialect)`` (:func:`shardlib.gather.plan`), remembered under the
    same key as routing plus the dialect. A plan embeds the statement's values (its per-shard
    statement, LIMIT, OFFSET), so only the same structure *with the same values* shares one."""
    key = route_key(statement, None) if ENABLED else None
    return _remembered("plans", (key, dialect) if key is not None else None,  # dialect: object or name
                       lambda: make_plan(statement, dialect))


def stats() -> dict[str, int]:
    """Hits, misses and statements that could not be cached, since the last :func:`clear`."""
    return {"hits": _caches.hits, "misses": _caches.misses, "uncached": _caches.uncached,
            "facts": len(_caches.facts), "routes": len(_caches.routes), "plans": len(_caches.plans)}


def clear() -> None:
    """Forget every remembered decision and reset the counters."""
    global _caches, _last
    _caches = _Caches()
    _last = (None, None)


__all__ = ["CAPACITY", "ENABLED", "MAX_LIST", "clear", "facts", "lookup_values", "one_shard", "plan", "route_key", "shards",
           "stats"]
