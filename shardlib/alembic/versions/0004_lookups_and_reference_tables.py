"""Beyond the shard key: ``weather_locations.station``, lookup tables, ``countries``.

* ``weather_locations.station``: a NULLABLE weather-station code (adding a
  nullable column is instant and breaks no writer). It is unique across all
  shards, which no shard can check: the unique lookup does.
* ``city_lookup`` and ``station_lookup``, on ``COUNTER_SHARD`` only (next to
  the id counter): value -> location id (an id names its logical shard, so
  the lookup never stores a database name).
* ``countries``, a reference table, on **every** shard, filled with the same
  GeoNames rows everywhere (:mod:`shardlib.geonames`, CC BY 4.0).

Shards that already hold locations: each shard is migrated on its own, and
the lookups on ``COUNTER_SHARD`` must list rows of every shard, so after this
upgrade run ``await shardlib.lookups.repair(engines)`` once to fill them.

Revision ID: 0004_lookups
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shardlib.geonames import COUNTRIES
from shardlib.migrations import current_shard
from shardlib.shards import COUNTER_SHARD

revision = "0004_lookups"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("weather_locations", sa.Column("station", sa.String(length=10), nullable=True))
    countries = op.create_table(
        "countries",
        sa.Column("code", sa.String(length=2), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("continent", sa.String(length=50), nullable=False),
        sa.PrimaryKeyConstraint("code"),
    )
    op.bulk_insert(countries, [{"code": c, "name": n, "continent": k} for c, n, k in COUNTRIES])
    if current_shard() == COUNTER_SHARD:
        op.create_table(
            "city_lookup",
            sa.Column("value", sa.String(length=100), nullable=False),
            sa.Column("location_id", sa.Integer(), autoincrement=False, nullable=False),
            sa.PrimaryKeyConstraint("value", "location_id"),
        )
        op.create_table(
            "station_lookup",
            sa.Column("value", sa.String(length=10), nullable=False),
            sa.Column("location_id", sa.Integer(), nullable=False),
            sa.PrimaryKeyConstraint("value"),
        )


def downgrade() -> None:
    if current_shard() == COUNTER_SHARD:
        op.drop_table("station_lookup")
        op.drop_table("city_lookup")
    op.drop_table("countries")
    with op.batch_alter_table("weather_locations") as batch:
        batch.drop_column("station")
