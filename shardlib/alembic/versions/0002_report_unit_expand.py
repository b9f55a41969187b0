"""Expand: ``weather_reports.unit`` ('C' or 'F'), added NULLABLE.

The first half of an expand/contract change (notebook 13). Adding a nullable
column without a default is instant on SQLite and PostgreSQL and breaks no
writer: code that does not know the column still inserts (leaving it NULL).
Then new code writes ``unit`` on every new row, :func:`shardlib.backfill`
fills the old rows batch by batch on every shard, and only then does
``0003_report_unit_contract`` make it NOT NULL.

This is an optional branch of its own (label ``report_unit``, based on the
shardlib schema): ``shardlib.migrate(engines)`` does not apply it, so the
ORM model ``Report`` (which does not map ``unit``) keeps matching the
default schema. Apply it with ``migrate(engines, "report_unit@head")`` or
one step at a time with ``"0002_report_unit_expand"``.

Revision ID: 0002_report_unit_expand
Revises: (branch base; depends on 0001_initial)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_report_unit_expand"
down_revision = None
branch_labels = ("report_unit",)
depends_on = "0001_initial"


def upgrade() -> None:
    op.add_column("weather_reports", sa.Column("unit", sa.String(length=1), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("weather_reports") as batch:
        batch.drop_column("unit")
