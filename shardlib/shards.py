"""The shard map: which databases exist, which continent lives where, and how a
global id names its continent's *logical shard*.

Everything else in shardlib asks this module; nothing else hard-codes a shard.
The map is **data** (:class:`ShardMap`, with a version); the current one is
stored durably in the catalog (:mod:`shardlib.catalog`), and moving a
continent to another database (:mod:`shardlib.resharding`) publishes a new
version. Until a catalog is opened, the map is :data:`DEFAULT_MAP`: four
continents on four databases, as in SQLAlchemy's sharding example.

Directory sharding
------------------
Each continent is stored on exactly one database (a *directory* lookup)::

    >>> shard_for_continent("Asia")
    'asia'

A continent nobody stores is a mistake the caller should hear about at once,
with the value and the valid choices (read from the map) in the message::

    >>> shard_for_continent("Atlantis")
    Traceback (most recent call last):
    ...
    ValueError: unknown continent 'Atlantis'; valid continents are 'North America', 'Asia', 'Europe', 'South America'

Ids that name their logical shard
---------------------------------
``WeatherLocation`` ids are unique across all shards *and* carry their
continent's **logical shard** (a slot number fixed forever) in their low bits::

    id = (sequence_number << SHARD_BITS) | slot

A logical shard is not a database: the map says which database holds each
one *today*. So ``session.get(WeatherLocation, some_id)`` still touches exactly
one database after the continent has moved, at the cost of one dictionary
lookup in the map per id. Instagram maps thousands of logical shards onto a
few PostgreSQL servers the same way, and Vitess routes by a keyspace id that
its shard map resolves, for the same reason: data moves, ids must not::

    >>> make_id(3, "asia")            # the logical shard of Asia is slot 1
    49
    >>> shard_for_id(49)              # ...stored today on the database 'asia'
    'asia'
    >>> moved = DEFAULT_MAP.with_placement("Asia", "europe")
    >>> moved.database_for_id(49), moved.version
    ('europe', 2)

The names ``SHARD_IDS``, ``SHARD_FOR_CONTINENT`` and ``CONTINENTS`` are live
views of the current map: they change when a new version is activated.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

SHARD_BITS = 4
"""Low bits of every WeatherLocation id reserved for the logical shard (16 slots)."""

_SHARD_MASK = (1 << SHARD_BITS) - 1

COUNTER_SHARD: str = "north_america"
"""The database holding the global id counter (as in the seed, db1). A database,
not a continent: moving North America elsewhere leaves the counter where it is."""


def logical_shard_name(continent: str) -> str:
    """``'North America'`` -> ``'north_america'``: the name of a continent's logical shard."""
    return continent.lower().replace(" ", "_")


def _quoted(values: Any) -> str:
    return ", ".join(repr(v) for v in values)


@dataclasses.dataclass(frozen=True)
class ShardMap:
    """One version of the shard map. Immutable: a change makes a new version.

    ``slots``: continent -> logical shard number (the low bits of its ids;
    never changes once given). ``placement``: continent -> database.
    ``databases``: database name -> URL (``None``: a SQLite file named after
    the database in the data directory), in canonical order (flushes and
    fan-outs visit databases in this order).
    """

    version: int
    databases: Mapping[str, str | None]
    slots: Mapping[str, int]
    placement: Mapping[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "databases", MappingProxyType(dict(self.databases)))
        object.__setattr__(self, "slots", MappingProxyType(dict(self.slots)))
        object.__setattr__(self, "placement", MappingProxyType(dict(self.placement)))
        if set(self.slots) != set(self.placement):
            raise ValueError(f"every continent needs a slot and a database: slots {dict(self.slots)}, "
                             f"placement {dict(self.placement)}")
        unknown = sorted(set(self.placement.values()) - set(self.databases))
        if unknown:
            raise ValueError(f"placement names databases {_quoted(unknown)} that the map does not "
                             f"list; databases are {_quoted(self.databases)}")
        numbers = list(self.slots.values())
        if len(set(numbers)) != len(numbers) or not all(0 <= n <= _SHARD_MASK for n in numbers):
            raise ValueError(f"slots must be distinct numbers 0-{_SHARD_MASK}: {dict(self.slots)}")
        by_slot = {n: c for c, n in self.slots.items()}
        object.__setattr__(self, "_serving", tuple(d for d in self.databases if d in set(self.placement.values())))
        object.__setattr__(self, "_slot_by_key", {**{logical_shard_name(c): n for c, n in self.slots.items()},
                                                   **self.slots})
        object.__setattr__(self, "_continent_by_slot", by_slot)
        object.__setattr__(self, "_database_by_slot",
                           tuple(self.placement[by_slot[n]] if n in by_slot else None
                                 for n in range(_SHARD_MASK + 1)))

    # ------------------------------------------------------------------ reading
    @property
    def database_ids(self) -> tuple[str, ...]:
        """The databases, in canonical order (the session's shard ids)."""
        return tuple(self.databases)

    @property
    def serving(self) -> tuple[str, ...]:
        """The databases that store at least one continent: a query that does not
        name its continent visits these (a database being filled by a move, or
        emptied by one, serves nothing and is never read by accident)."""
        return self._serving  # type: ignore[attr-defined, no-any-return]

    @property
    def continents(self) -> tuple[str, ...]:
        return tuple(self.placement)

    def database_for(self, continent: object) -> str:
        """The database storing ``continent``, or ``ValueError`` naming the valid ones."""
        try:
            return self.placement[continent]  # type: ignore[index]
        except (KeyError, TypeError):
            raise ValueError(f"unknown continent {continent!r}; valid continents are "
                             f"{_quoted(self.placement)}") from None

    def slot_for(self, continent: object) -> int:
        self.database_for(continent)
        return self.slots[continent]  # type: ignore[index]

    def continent_for_slot(self, slot: int) -> str | None:
        return self._continent_by_slot.get(slot)  # type: ignore[attr-defined]

    def database_for_id(self, location_id: object) -> str | None:
        """The database holding the location ``location_id`` names, or ``None``
        if no logical shard in this map has that number."""
        if isinstance(location_id, bool) or not isinstance(location_id, int):
            return None
        if location_id < 1 << SHARD_BITS:
            return None
        return self._database_by_slot[location_id & _SHARD_MASK]  # type: ignore[attr-defined, no-any-return]

    def continents_on(self, database: str) -> tuple[str, ...]:
        return tuple(c for c, d in self.placement.items() if d == database)

    # ------------------------------------------------------------------ changing
    def with_placement(self, continent: str, database: str) -> ShardMap:
        """The next version, with ``continent`` stored on ``database`` (which must exist)."""
        self.database_for(continent)
        if database not in self.databases:
            raise ValueError(f"unknown database {database!r}; the map's databases are "
                             f"{_quoted(self.databases)} (add one with with_database())")
        return dataclasses.replace(self, version=self.version + 1,
                                   placement={**self.placement, continent: database})

    def with_database(self, database: str, url: str | None = None) -> ShardMap:
        """The next version, with a new (empty) database."""
        if database in self.databases:
            raise ValueError(f"database {database!r} is already in the map")
        if not database.isidentifier():
            raise ValueError(f"database names are identifiers (they name files and shards), "
                             f"got {database!r}")
        return dataclasses.replace(self, version=self.version + 1,
                                   databases={**self.databases, database: url})

    def with_continent(self, continent: str, database: str) -> ShardMap:
        """The next version, with a new continent on ``database``: the next free slot."""
        if not isinstance(continent, str) or not continent.strip():
            raise ValueError(f"a continent is a non-empty name, got {continent!r}")
        if continent in self.placement:
            raise ValueError(f"continent {continent!r} is already in the map, on "
                             f"{self.placement[continent]!r}")
        if database not in self.databases:
            raise ValueError(f"unknown database {database!r}; the map's databases are "
                             f"{_quoted(self.databases)}")
        free = [n for n in range(_SHARD_MASK + 1) if n not in self.slots.values()]
        if not free:
            raise ValueError(f"all {_SHARD_MASK + 1} logical shards are taken (SHARD_BITS = {SHARD_BITS})")
        return dataclasses.replace(self, version=self.version + 1,
                                   slots={**self.slots, continent: free[0]},
                                   placement={**self.placement, continent: database})

    # ------------------------------------------------------------------ storing
    def to_json(self) -> str:
        return json.dumps({"databases": dict(self.databases), "slots": dict(self.slots),
                           "placement": dict(self.placement)}, sort_keys=False)

    @classmethod
    def from_json(cls, version: int, text: str) -> ShardMap:
        body = json.loads(text)
        return cls(version=version, databases=body["databases"], slots=body["slots"],
                   placement=body["placement"])

    def frame(self) -> Any:
        """The map as a DataFrame: one row per continent (slot, database)."""
        import pandas as pd

        rows = [{"continent": c, "logical shard": logical_shard_name(c), "slot": self.slots[c],
                 "database": self.placement[c]} for c in self.placement]
        frame = pd.DataFrame(rows)
        frame.attrs["version"] = self.version
        return frame


DEFAULT_MAP = ShardMap(
    version=1,
    databases={"north_america": None, "asia": None, "europe": None, "south_america": None},
    slots={"North America": 0, "Asia": 1, "Europe": 2, "South America": 3},
    placement={"North America": "north_america", "Asia": "asia", "Europe": "europe",
               "South America": "south_america"},
)
"""Version 1: SQLAlchemy's example, one continent per database."""

_current: ShardMap = DEFAULT_MAP


def current() -> ShardMap:
    """The shard map this process routes by."""
    return _current


def activate(shard_map: ShardMap) -> None:
    """Route by ``shard_map`` from now on (the catalog calls this on a new version).

    One map per process: like one Vitess ``vtgate``, a process talks to one
    sharded cluster."""
    global _current
    if not isinstance(shard_map, ShardMap):
        raise TypeError(f"expected a ShardMap, got {shard_map!r}")
    _current = shard_map


class _LiveDatabases(Sequence[str]):
    """``SHARD_IDS``: the current map's databases, in canonical order."""

    def __getitem__(self, index: Any) -> Any:
        return _current.database_ids[index]

    def __len__(self) -> int:
        return len(_current.databases)

    def __iter__(self) -> Iterator[str]:
        return iter(_current.database_ids)

    def __contains__(self, value: object) -> bool:
        return value in _current.databases

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        return _current.database_ids.index(value)

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _LiveDatabases)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return repr(_current.database_ids)


class _LiveDirectory(Mapping[str, str]):
    """``SHARD_FOR_CONTINENT``: the current map's continent -> database."""

    def __getitem__(self, continent: str) -> str:
        return _current.placement[continent]

    def __len__(self) -> int:
        return len(_current.placement)

    def __iter__(self) -> Iterator[str]:
        return iter(_current.placement)

    def __repr__(self) -> str:
        return repr(dict(_current.placement))


class _LiveContinents(_LiveDatabases):
    """``CONTINENTS``: the current map's continents."""

    def __getitem__(self, index: Any) -> Any:
        return _current.continents[index]

    def __len__(self) -> int:
        return len(_current.placement)

    def __iter__(self) -> Iterator[str]:
        return iter(_current.continents)

    def __contains__(self, value: object) -> bool:
        return value in _current.placement

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        return _current.continents.index(value)

    def __repr__(self) -> str:
        return repr(_current.continents)


SHARD_IDS: Sequence[str] = _LiveDatabases()
"""The databases (the session's shard ids), in canonical order; flushes write in this order."""

class _LiveServing(_LiveDatabases):
    """``SERVING_SHARD_IDS``: the current map's databases that store a continent."""

    def __getitem__(self, index: Any) -> Any:
        return _current.serving[index]

    def __len__(self) -> int:
        return len(_current.serving)

    def __iter__(self) -> Iterator[str]:
        return iter(_current.serving)

    def __contains__(self, value: object) -> bool:
        return value in _current.serving

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        return _current.serving.index(value)

    def __repr__(self) -> str:
        return repr(_current.serving)


SERVING_SHARD_IDS: Sequence[str] = _LiveServing()
"""The databases that store at least one continent (what a fan-out visits)."""

SHARD_FOR_CONTINENT: Mapping[str, str] = _LiveDirectory()
"""The directory: continent -> database. Several continents may share a database."""

CONTINENTS: Sequence[str] = _LiveContinents()
"""The continents shardlib knows how to store."""


def shard_for_continent(continent: object) -> str:
    """Return the database that stores ``continent``, or raise ``ValueError``."""
    return _current.database_for(continent)


def slot_for_continent(continent: object) -> int:
    """The logical shard number of ``continent`` (the low bits of its ids)."""
    return _current.slot_for(continent)


def slot_of_id(location_id: int) -> int:
    """The logical shard number a location id carries."""
    return location_id & _SHARD_MASK


def continents_on(shard_id: str) -> tuple[str, ...]:
    """The continents whose rows live on database ``shard_id``."""
    return _current.continents_on(shard_id)


def check_shard_id(shard_id: object) -> str:
    """Return ``shard_id`` if it is a known database, else raise ``ValueError``."""
    if shard_id not in _current.databases:
        raise ValueError(
            f"unknown shard id {shard_id!r}; valid shard ids are {_quoted(_current.databases)}"
        )
    return shard_id  # type: ignore[return-value]


def make_id(sequence_number: int, logical_shard: str) -> int:
    """Combine a global sequence number and a logical shard into one id.

    ``logical_shard`` is a continent (``"North America"``) or its logical
    shard's name (``"north_america"``)."""
    if sequence_number < 1:
        raise ValueError(f"sequence_number must be >= 1, got {sequence_number!r}")
    slot = _current._slot_by_key.get(logical_shard)  # type: ignore[attr-defined]
    if slot is None:
        raise ValueError(f"unknown logical shard {logical_shard!r}; valid ones are "
                         f"{_quoted(map(logical_shard_name, _current.placement))} (or their continents)")
    return (sequence_number << SHARD_BITS) | slot


def shard_for_id(location_id: object) -> str | None:
    """The database holding the location ``location_id`` names, or ``None`` if no
    shard can hold it.

    ``None`` (rather than an exception) because a query for an id that cannot
    exist is legal SQL: it simply matches nothing.
    """
    return _current.database_for_id(location_id)
