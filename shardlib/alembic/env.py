"""shardlab's Alembic environment: runs on ONE shard's connection at a time.

A sharded schema is one schema in N databases. Alembic's usual ``env.py``
opens one database from ``sqlalchemy.url``; this one never opens anything.
:mod:`shardlib.migrations` opens each shard's connection (inside a
transaction), puts it and the shard id in ``config.attributes`` and runs
Alembic once per shard, so every shard keeps its own ``alembic_version``
table and a failure on one shard leaves the others untouched.

Revision scripts ask :func:`shardlib.migrations.current_shard` when a step
applies to some shards only (the id counter lives on ``COUNTER_SHARD``).

``render_as_batch=True``: autogenerate writes ``op.batch_alter_table(...)``
blocks, which SQLite needs for anything beyond ADD COLUMN (Alembic copies the
table: CREATE new, INSERT ... SELECT, DROP old, RENAME); on PostgreSQL the
same block issues plain ALTER TABLE statements.
"""

from alembic import context

from shardlib.migrations import target_metadata_for

config = context.config
connection = config.attributes.get("connection")
shard = config.attributes.get("shard")

if context.is_offline_mode() or connection is None:
    raise RuntimeError(
        "shardlab's migrations run on one shard's connection at a time, opened by "
        "shardlib: use `python -m shardlib.migrations upgrade head [--shard asia]` or "
        "`await shardlib.migrate(engines)`; offline (--sql) mode is not supported"
    )

def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate ignores the sidecar tables of a continent move (shardlib.resharding)
    and the shard map's catalog: they belong to shardlib, not to the schema."""
    return not (type_ == "table" and name is not None and name.startswith("shardlib_"))


context.configure(
    connection=connection,
    target_metadata=target_metadata_for(shard),
    render_as_batch=True,
    include_name=include_name,
)

with context.begin_transaction():
    context.run_migrations()
