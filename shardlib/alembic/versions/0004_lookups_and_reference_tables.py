"""Beyond the shard key: ``weather_locations.station`` and the ``countries`` reference table.

* ``weather_locations.station``: a NULLABLE weather-station code (adding a
  nullable column is instant and breaks no writer). It is unique across all
  shards, which no shard can check: the unique lookup does.
* ``countries``, a reference table, on **every** shard, filled with the same
  GeoNames rows everywhere (:mod:`shardlib.geonames`, CC BY 4.0).

The lookup tables are not made here: like an index, they are built and
filled from every shard's rows when asked for, by
``await shardlib.lookups.enable(engines)`` (a revision runs on one shard at a
time and cannot read the others).

Revision ID: 0004_lookups
Revises: 0001_initial
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shardlib.geonames import COUNTRIES

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


def downgrade() -> None:
    op.drop_table("countries")
    with op.batch_alter_table("weather_locations") as batch:
        batch.drop_column("station")
