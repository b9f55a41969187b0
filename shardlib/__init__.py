"""shardlib: horizontal sharding with SQLAlchemy's ``ShardedSession`` under asyncio.

A small teaching library grown from SQLAlchemy's asyncio sharding example:
weather locations sharded by continent over four databases, their reports
stored alongside, correct and precise query routing, and cheap global ids.

Quick tour::

    import shardlib
    from shardlib import WeatherLocation, Report

    engines = shardlib.make_engines()          # four SQLite files in shard_data/
    await shardlib.reset(engines)              # empty tables, counter at 1
    Session = shardlib.make_sessionmaker(engines)

    async with Session() as session:
        session.add(WeatherLocation("Asia", "Tokyo"))
        await session.commit()

    await shardlib.show_shards(engines, "weather_locations")

Modules, one job each: :mod:`~shardlib.shards` (the shard map as data, with
a version, and the id layout), :mod:`~shardlib.catalog` (where the map is
stored), :mod:`~shardlib.resharding` (moving a continent while it is written),
:mod:`~shardlib.movelab` (writers that prove a move loses nothing),
:mod:`~shardlib.cities` (real GeoNames cities), :mod:`~shardlib.models`, :mod:`~shardlib.routing` (the choosers),
:mod:`~shardlib.ids` (global ids), :mod:`~shardlib.engines`,
:mod:`~shardlib.session`, :mod:`~shardlib.migrations` (Alembic on every
shard), :mod:`~shardlib.schema` (drift detection), :mod:`~shardlib.backfill`,
:mod:`~shardlib.display`, :mod:`~shardlib.locking` (deadlock-free SQLite writers),
:mod:`~shardlib.conflicts` (which errors are retryable), :mod:`~shardlib.retry`
(``run_transaction``), :mod:`~shardlib.upstream` (the seed's choosers, for comparison),
:mod:`~shardlib.twophase` (a durable commit log and ``recover()`` for
two-phase commit), :mod:`~shardlib.outages` (a shard server that is down),
:mod:`~shardlib.lookups` (lookup tables: global secondary indexes, unique
station codes), :mod:`~shardlib.reference` (tables copied to every shard) and
:mod:`~shardlib.joins` (cross-shard joins as an application-side hash join).
"""

from __future__ import annotations

from .bulk import bulk_insert
from .conflicts import ShardConflict, ShardLockTimeout, is_retryable
from .gather import GatherPlan, GatherRefused, ShardFailed, gather, plan
from .display import ShardTables, Trace, WrappedFrame, routing_frame, shard_frames, shard_rows, show_shards, trace, wrapped
from .execution import CONCATENATE, CrossShardRefused
from .exercises import check_answer, is_unanswered, shard_list
from .engines import check_engines, dispose, make_engines, parse_urls, reset
from .ids import IdAllocator
from .backfill import backfill
from .schema import SchemaDriftError
from .outages import ShardUnavailable
from .twophase import DecisionRefused, recover, recovery_task
from .locking import take_write_ticket
from .models import Base, Country, Report, WeatherLocation, id_counter
from .lookups import DuplicateLookupValue
from . import joins, lookups, reference
from .retry import PartialCommitError, run_transaction
from .routing import execute_chooser, identity_chooser, shard_chooser, shard_of, shards_for
from .session import ShardlibSession, make_sessionmaker, move_location
from .catalog import Catalog, StaleMapError
from .engines import ShardEngines
from .resharding import ContinentMove, ContinentMoved, MoveError, VDiffMismatch, add_continent, move_continent
from .shards import (
    CONTINENTS,
    COUNTER_SHARD,
    SHARD_BITS,
    SHARD_FOR_CONTINENT,
    SHARD_IDS,
    DEFAULT_MAP,
    ShardMap,
    make_id,
    shard_for_continent,
    shard_for_id,
)

_MIGRATIONS = ("MigrationError", "alembic_command", "downgrade", "migrate", "revisions")


def __getattr__(name: str) -> object:
    """``shardlib.migrate`` & co. come from :mod:`shardlib.migrations`, imported on
    first use so that ``python -m shardlib.migrations`` runs it only once."""
    if name in _MIGRATIONS:
        from . import migrations

        return getattr(migrations, name)
    raise AttributeError(f"module 'shardlib' has no attribute {name!r}")


__all__ = [
    "CONTINENTS", "COUNTER_SHARD", "SHARD_BITS", "SHARD_FOR_CONTINENT", "SHARD_IDS",
    "CONCATENATE", "CrossShardRefused", "Base", "GatherPlan", "GatherRefused", "IdAllocator", "MigrationError",
    "PartialCommitError", "Report", "SchemaDriftError", "ShardConflict", "ShardFailed", "ShardLockTimeout",
    "ShardTables", "ShardlibSession", "Trace", "WeatherLocation", "WrappedFrame",
    "alembic_command", "backfill", "bulk_insert", "check_answer", "check_engines", "dispose",
    "downgrade", "execute_chooser", "gather", "id_counter", "identity_chooser", "is_retryable", "is_unanswered",
    "make_engines", "make_id", "make_sessionmaker", "migrate", "move_location", "parse_urls", "plan", "reset",
    "revisions", "routing_frame", "run_transaction", "shard_chooser", "shard_for_continent", "shard_for_id",
    "shard_frames", "shard_list", "shard_of", "shard_rows", "shards_for", "show_shards", "take_write_ticket",
    "trace", "wrapped",
]
__all__ += ["Country", "DuplicateLookupValue", "joins", "lookups", "reference"]  # beyond the shard key
__all__ += ["Catalog", "ContinentMove", "ContinentMoved", "DEFAULT_MAP", "MoveError", "ShardEngines", "ShardMap",
            "StaleMapError", "VDiffMismatch", "add_continent", "move_continent"]  # the shard map as data
__all__ += ["DecisionRefused", "ShardUnavailable", "recover", "recovery_task"]  # shardlib.twophase, shardlib.outages
