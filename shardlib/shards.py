"""The shard map: which shards exist, which continent lives where, and how a
global id names its shard.

Everything else in shardlib asks this module; nothing else hard-codes a shard.

Directory sharding
------------------
Each continent is stored on exactly one shard (a *directory* lookup)::

    >>> shard_for_continent("Asia")
    'asia'

A continent nobody stores is a mistake the caller should hear about at once,
with the value and the valid choices in the message::

    >>> shard_for_continent("Atlantis")
    Traceback (most recent call last):
    ...
    ValueError: unknown continent 'Atlantis'; valid continents are 'North America', 'Asia', 'Europe', 'South America'

Ids that name their shard
-------------------------
``WeatherLocation`` ids are unique across all shards *and* carry their shard
in their low bits (Instagram's and Vitess's schemes work the same way)::

    id = (sequence_number << SHARD_BITS) | shard_index

so ``session.get(WeatherLocation, some_id)`` can go straight to one shard::

    >>> make_id(3, "asia")
    49
    >>> shard_for_id(49)
    'asia'
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

SHARD_IDS: tuple[str, ...] = ("north_america", "asia", "europe", "south_america")
"""The four shard ids, in their canonical order (flushes write in this order)."""

SHARD_FOR_CONTINENT: Mapping[str, str] = MappingProxyType(
    {
        "North America": "north_america",
        "Asia": "asia",
        "Europe": "europe",
        "South America": "south_america",
    }
)
"""The directory: continent -> shard id. Several continents may share a shard."""

CONTINENTS: tuple[str, ...] = tuple(SHARD_FOR_CONTINENT)
"""The continents shardlib knows how to store."""

COUNTER_SHARD: str = SHARD_IDS[0]
"""The shard whose database holds the global id counter (as in the seed, db1)."""

SHARD_BITS = 4
"""Low bits of every WeatherLocation id reserved for the shard index (16 slots)."""

_SHARD_MASK = (1 << SHARD_BITS) - 1
assert len(SHARD_IDS) <= 1 << SHARD_BITS, "more shards than SHARD_BITS can name"
assert set(SHARD_FOR_CONTINENT.values()) <= set(SHARD_IDS)


def _quoted(values: object) -> str:
    return ", ".join(repr(v) for v in values)  # type: ignore[attr-defined]


def shard_for_continent(continent: object) -> str:
    """Return the shard that stores ``continent``, or raise ``ValueError``."""
    try:
        return SHARD_FOR_CONTINENT[continent]  # type: ignore[index]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown continent {continent!r}; valid continents are "
            f"{_quoted(CONTINENTS)}"
        ) from None


def continents_on(shard_id: str) -> tuple[str, ...]:
    """The continents whose rows live on ``shard_id``."""
    return tuple(c for c, s in SHARD_FOR_CONTINENT.items() if s == shard_id)


def check_shard_id(shard_id: object) -> str:
    """Return ``shard_id`` if it is a known shard, else raise ``ValueError``."""
    if shard_id not in SHARD_IDS:
        raise ValueError(
            f"unknown shard id {shard_id!r}; valid shard ids are {_quoted(SHARD_IDS)}"
        )
    return shard_id  # type: ignore[return-value]


def make_id(sequence_number: int, shard_id: str) -> int:
    """Combine a global sequence number and a shard into one id."""
    if sequence_number < 1:
        raise ValueError(f"sequence_number must be >= 1, got {sequence_number!r}")
    return (sequence_number << SHARD_BITS) | SHARD_IDS.index(check_shard_id(shard_id))


def shard_for_id(location_id: object) -> str | None:
    """The shard named by a WeatherLocation id, or ``None`` if no shard can hold it.

    ``None`` (rather than an exception) because a query for an id that cannot
    exist is legal SQL: it simply matches nothing.
    """
    if isinstance(location_id, bool) or not isinstance(location_id, int):
        return None
    if location_id < 1 << SHARD_BITS:
        return None
    index = location_id & _SHARD_MASK
    return SHARD_IDS[index] if index < len(SHARD_IDS) else None
