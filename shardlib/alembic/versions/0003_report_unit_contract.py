"""Contract: ``weather_reports.unit`` becomes NOT NULL, once every row has one.

Refuses (and so rolls back this shard's migration) while any row still has
no unit, naming the shard and the count: run :func:`shardlib.backfill`
first, and make sure every writer writes ``unit``. On SQLite the NOT NULL is
made by Alembic's batch mode (the table is copied); on PostgreSQL by
``ALTER TABLE ... ALTER COLUMN unit SET NOT NULL``.

Revision ID: 0003_report_unit_contract
Revises: 0002_report_unit_expand
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from shardlib.migrations import current_shard

revision = "0003_report_unit_contract"
down_revision = "0002_report_unit_expand"
branch_labels = None
depends_on = None


def upgrade() -> None:
    missing = op.get_bind().execute(
        sa.text("SELECT count(*) FROM weather_reports WHERE unit IS NULL")
    ).scalar_one()
    if missing:
        raise RuntimeError(
            f"{current_shard()}: {missing} weather_reports rows have no unit; "
            f"backfill them first (shardlib.backfill(engines, 'weather_reports', 'unit', 'F')) "
            f"and make every writer write unit, then upgrade again"
        )
    with op.batch_alter_table("weather_reports") as batch:
        batch.alter_column("unit", existing_type=sa.String(length=1), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("weather_reports") as batch:
        batch.alter_column("unit", existing_type=sa.String(length=1), nullable=True)
