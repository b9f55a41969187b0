"""The mapped classes: weather locations (sharded by continent) and their reports.

Same domain as SQLAlchemy's sharding example. Two differences matter:

* ``WeatherLocation.id`` has no column default. Ids are handed out by
  :mod:`shardlib.ids` once per flush (not one transaction per row, as the seed
  does), and each id names its shard in its low bits.
* ``continent`` is checked the moment it is assigned: an unknown continent
  raises ``ValueError`` before the object can reach a session.
* ``station`` (optional, e.g. ``'RJTT'`` for Tokyo Haneda) is unique across
  **all** shards: no single database can enforce that, so a unique lookup
  table does (:mod:`shardlib.lookups`).

``Report.id`` is a plain, shard-local autoincrement key, so the same report id
exists on several shards; the ORM keeps them apart by *identity token*.

``Base`` includes :class:`~sqlalchemy.ext.asyncio.AsyncAttrs`, so under asyncio
a lazy relationship can be awaited instead of raising::

    reports = await location.awaitable_attrs.reports
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates

from .shards import shard_for_continent


class Base(AsyncAttrs, DeclarativeBase):
    """Declarative base for every sharded table (created on every shard)."""


class WeatherLocation(Base):
    """A city; stored on the shard of its continent."""

    __tablename__ = "weather_locations"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    continent: Mapped[str] = mapped_column(String(50))
    city: Mapped[str] = mapped_column(String(100))
    station: Mapped[str | None] = mapped_column(String(10), default=None)
    """A weather-station code (ICAO ``EGLL``, WMO ``03772``): unique across all shards, or ``None``."""

    reports: Mapped[list[Report]] = relationship(
        back_populates="location", cascade="all, delete-orphan"
    )

    def __init__(self, continent: str, city: str, station: str | None = None) -> None:
        self.continent = continent
        self.city = city
        self.station = station

    @validates("continent")
    def _check_continent(self, key: str, continent: str) -> str:
        shard_for_continent(continent)  # raises ValueError naming the bad value
        return continent

    def __repr__(self) -> str:
        station = f", station={self.station!r}" if self.station is not None else ""
        return f"WeatherLocation(id={self.id!r}, continent={self.continent!r}, city={self.city!r}{station})"


class Report(Base):
    """A temperature reading; stored on the same shard as its location."""

    __tablename__ = "weather_reports"

    id: Mapped[int] = mapped_column(primary_key=True)
    location_id: Mapped[int] = mapped_column(ForeignKey("weather_locations.id"))
    temperature: Mapped[float]
    report_time: Mapped[datetime.datetime] = mapped_column(default=datetime.datetime.now)

    location: Mapped[WeatherLocation] = relationship(back_populates="reports")

    def __init__(
        self, temperature: float, report_time: datetime.datetime | None = None
    ) -> None:
        self.temperature = temperature
        if report_time is not None:
            self.report_time = report_time

    def __repr__(self) -> str:
        return (
            f"Report(id={self.id!r}, location_id={self.location_id!r}, "
            f"temperature={self.temperature!r})"
        )


class Country(Base):
    """A reference table: the same rows on every shard, so joins with it stay local.

    ``continent`` uses shardlib's continent names (``'Europe'``); rows come
    from the GeoNames country list (:mod:`shardlib.geonames`, CC BY 4.0) and
    are written on every shard at once (:mod:`shardlib.reference`).
    """

    __tablename__ = "countries"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    continent: Mapped[str] = mapped_column(String(50))

    def __init__(self, code: str, name: str, continent: str) -> None:
        self.code, self.name, self.continent = code, name, continent

    def __repr__(self) -> str:
        return f"Country(code={self.code!r}, name={self.name!r}, continent={self.continent!r})"


SHARD_KEY_COLUMNS: tuple[tuple[str, Column[Any]], ...] = (
    ("continent", WeatherLocation.__table__.c.continent),
    ("location_id", WeatherLocation.__table__.c.id),
    ("location_id", Report.__table__.c.location_id),
)
"""What routing reads from the schema: the shard key (``continent``, looked up in
the shard map) and the columns holding a location id (which names its shard).
Reports have no continent: they are stored with their location."""

counter_metadata = MetaData()
"""Metadata for tables that live on :data:`~shardlib.shards.COUNTER_SHARD` only."""

id_counter = Table(
    "id_counter",
    counter_metadata,
    Column("next_value", Integer, nullable=False),
)
"""One row, one column: the next unused global sequence number."""


# --------------------------------------------------------------------------
# beyond the shard key: lookup tables and reference tables (data, not code)
# --------------------------------------------------------------------------

lookup_metadata = MetaData()
"""Lookup tables: on :data:`~shardlib.shards.COUNTER_SHARD` only, and only once
:func:`shardlib.lookups.enable` has built them (like creating an index)."""

city_lookup = Table(
    "city_lookup",
    lookup_metadata,
    Column("value", String(100), primary_key=True),
    Column("location_id", Integer, primary_key=True, autoincrement=False),
)
"""city -> every location id with that city (non-unique: London is in two continents)."""

station_lookup = Table(
    "station_lookup",
    lookup_metadata,
    Column("value", String(10), primary_key=True),
    Column("location_id", Integer, nullable=False),
)
"""station -> the one location id with that station (the primary key makes it unique)."""


@dataclass(frozen=True)
class Lookup:
    """A global secondary index: ``table`` maps each value of ``column`` to location ids.

    It stores the **location id**, never a database name: an id names its
    logical shard (:func:`shardlib.shards.shard_for_id`), so a continent moved
    to another database needs no change here.
    """

    name: str
    column: Column[Any]
    table: Table
    unique: bool


LOOKUPS: tuple[Lookup, ...] = (
    Lookup("city", WeatherLocation.__table__.c.city, city_lookup, unique=False),
    Lookup("station", WeatherLocation.__table__.c.station, station_lookup, unique=True),
)
"""Which columns of ``weather_locations`` have a lookup table (read by
:mod:`shardlib.analysis` to route, kept current by :mod:`shardlib.lookups`)."""

REFERENCE_TABLES: tuple[Table, ...] = (Country.__table__,)
"""Tables copied whole to every shard: joins with them run inside each shard
(:mod:`shardlib.reference`); reading one alone asks one shard."""
