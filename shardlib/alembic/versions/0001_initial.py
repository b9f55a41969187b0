"""Initial schema: today's weather tables on every shard, the id counter on one.

Written to match ``Base.metadata.create_all()`` exactly (tests/test_migrations.py
compares the two on SQLite and PostgreSQL with Alembic's ``compare_metadata``
and with ``inspect()``). ``weather_locations.id`` has ``autoincrement=False``:
ids come from shardlib's global counter, so PostgreSQL must not make it SERIAL.

Revision ID: 0001_initial
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shardlib.migrations import current_shard
from shardlib.shards import COUNTER_SHARD

revision = "0001_initial"
down_revision = None
branch_labels = ("shardlib",)
depends_on = None

# ``Mapped[float]`` becomes Float() under SQLAlchemy 2.0 and Double() under 2.1
# (both REAL on SQLite, double precision on PostgreSQL); build what create_all builds.
TEMPERATURE_TYPE = sa.Double() if tuple(map(int, sa.__version__.split(".")[:2])) >= (2, 1) else sa.Float()


def upgrade() -> None:
    op.create_table(
        "weather_locations",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("continent", sa.String(length=50), nullable=False),
        sa.Column("city", sa.String(length=100), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "weather_reports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("location_id", sa.Integer(), nullable=False),
        sa.Column("temperature", TEMPERATURE_TYPE, nullable=False),
        sa.Column("report_time", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["location_id"], ["weather_locations.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    if current_shard() == COUNTER_SHARD:
        counter = op.create_table(
            "id_counter", sa.Column("next_value", sa.Integer(), nullable=False)
        )
        op.bulk_insert(counter, [{"next_value": 1}])


def downgrade() -> None:
    if current_shard() == COUNTER_SHARD:
        op.drop_table("id_counter")
    op.drop_table("weather_reports")
    op.drop_table("weather_locations")
