"""Schema changes on every shard, with Alembic: one Alembic run per shard.

The schema lives in ``shardlib/alembic/versions/`` as ordinary Alembic
revision scripts. Each shard is its own database with its own
``alembic_version`` table; the id counter's table lives in
``COUNTER_SHARD``'s database and is created by the revision that creates the
weather tables there (revision scripts call :func:`current_shard`).
::

    frame = await shardlib.migrate(engines)            # every shard to the schema head
    await shardlib.revisions(engines)                  # DataFrame: shard -> revision
    await alembic_command(engines, "downgrade", "base", shard="asia")

From a shell (same engines as ``make_engines()``: ``$SHARDLIB_URLS`` or the
SQLite files in ``--data-dir`` / ``$SHARDLIB_DATA_DIR`` / ``shard_data``)::

    python -m shardlib.migrations upgrade head           # make migrate
    python -m shardlib.migrations current --shard asia
    python -m shardlib.migrations history                # no database needed

Any Alembic command and option works (the parser is Alembic's own); ``--shard``
(repeatable) limits it to some shards.

One transaction per shard
-------------------------
Each shard is upgraded inside one transaction (``BEGIN IMMEDIATE`` on
SQLite, whose driver would otherwise run DDL outside any transaction), in
``SHARD_IDS`` order. If a revision fails on a shard, that shard's whole
upgrade is rolled back, the shards after it are not attempted, and
:class:`MigrationError` lists every shard's revisions. Nothing is half-done
on any shard, so running the same upgrade again (after fixing the cause)
skips the shards already there and finishes the job. Transactional DDL is a
property of SQLite and PostgreSQL; MySQL commits at every DDL statement.

``head`` means the shardlib schema's head (``shardlib@head``): the scripts
also hold an optional branch, ``report_unit``, the expand/contract example
of notebook 13, applied only when asked for (``"report_unit@head"``).
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pandas as pd
from sqlalchemy import Connection, MetaData, update
from sqlalchemy.ext.asyncio import AsyncEngine

from . import schema
from .engines import check_engines
from .models import Base, counter_metadata, id_counter, lookup_metadata
from .shards import COUNTER_SHARD, SHARD_IDS, check_shard_id

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

SCRIPT_LOCATION = Path(__file__).with_name("alembic")
"""The Alembic environment shipped in the package (``env.py``, ``versions/``)."""

SCHEMA_BRANCH = "shardlib"
"""Branch label of the schema the code needs; ``head`` means ``shardlib@head``."""

DB_COMMANDS = frozenset({"upgrade", "downgrade", "stamp", "current", "check", "ensure_version"})
"""Alembic commands that run on every shard (the others read only the scripts)."""

T = TypeVar("T")


def target_metadata_for(shard: str | None) -> MetaData | list[MetaData]:
    """The tables a shard should have: the weather tables, plus the counter on its shard."""
    return [Base.metadata, counter_metadata] if shard == COUNTER_SHARD else Base.metadata


def alembic_config(shard: str | None = None, connection: Connection | None = None,
                   stdout: Any = None) -> Config:
    """An Alembic ``Config`` for one shard's connection (no ``alembic.ini`` needed)."""
    from alembic.config import Config

    config = Config(stdout=stdout if stdout is not None else sys.stdout)
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.attributes["shard"] = shard
    config.attributes["connection"] = connection
    return config


@lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    """The revision scripts, read once per process."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


@lru_cache(maxsize=1)
def schema_head() -> str:
    """The revision the code's models need: the head of the ``shardlib`` branch."""
    head = script_directory().get_revision(f"{SCHEMA_BRANCH}@head")
    assert head is not None
    return head.revision


def has_schema_head(revisions: Sequence[str]) -> bool:
    """Whether a shard with these ``alembic_version`` rows has the code's schema.

    True if the schema head is one of them or below one of them, following
    both ``down_revision`` and ``depends_on`` (a shard at
    ``0003_report_unit_contract`` records only that row, and has
    ``0001_initial`` through the branch's dependency). A revision the
    scripts do not know (a database newer than the code) does not count.
    """
    return _has_schema_head(tuple(sorted(revisions)))


@lru_cache(maxsize=64)
def _has_schema_head(revisions: tuple[str, ...]) -> bool:
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    script, head = script_directory(), schema_head()
    stack, seen = list(revisions), set()
    while stack:
        name = stack.pop()
        if name == head:
            return True
        if name in seen:
            continue
        seen.add(name)
        try:
            revision = script.revision_map.get_revision(name)
        except (CommandError, RevisionError):  # unknown to this code
            continue
        if revision is not None:
            stack.extend(revision._all_down_revisions)
    return False


def current_shard() -> str:
    """In a revision script: the shard being migrated (e.g. to skip a step elsewhere)."""
    from alembic import context

    shard = context.config.attributes.get("shard")
    if shard is None:
        raise RuntimeError("no shard: revision scripts run through shardlib.migrations only")
    return check_shard_id(shard)


def _target(revision: str) -> str:
    """``head`` -> ``shardlib@head``; an unknown revision raises before any shard is touched."""
    from alembic.script.revision import RevisionError
    from alembic.util import CommandError

    target = f"{SCHEMA_BRANCH}@head" if revision == "head" else revision
    if target in ("base", "heads") or any(sign in target for sign in "+-:"):
        return target  # relative steps and ranges resolve against each shard's revision
    try:
        script_directory().revision_map.get_revisions(target)
    except (CommandError, RevisionError):
        script = script_directory()
        labels = sorted({f"{label}@head" for r in script.walk_revisions() for label in r.branch_labels})
        valid = ["head", "heads", "base", *labels, *sorted(r.revision for r in script.walk_revisions())]
        raise ValueError(f"unknown revision {revision!r}; valid: {', '.join(map(repr, valid))}") from None
    return target


def _shards(shard: str | Sequence[str] | None) -> list[str]:
    if shard is None:
        return list(SHARD_IDS)
    wanted = [shard] if isinstance(shard, str) else list(shard)
    for s in wanted:
        check_shard_id(s)
    return [s for s in SHARD_IDS if s in wanted]


async def in_shard_transaction(engine: AsyncEngine, fn: Callable[[Connection], T]) -> T:
    """Run ``fn(sync_connection)`` in one transaction on one shard; commit or roll back.

    SQLite's Python driver only opens a transaction before INSERT/UPDATE/
    DELETE, so CREATE/ALTER/DROP would each commit on their own and a failed
    migration would leave half its tables behind: ``BEGIN IMMEDIATE`` opens
    the transaction explicitly (and takes the write lock at once, waiting
    for concurrent writers instead of failing halfway with a stale snapshot).
    """
    async with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            await conn.begin()
        try:
            result = await conn.run_sync(fn)
        except BaseException:
            await conn.rollback()
            raise
        await conn.commit()
        return result


def run_alembic(connection: Connection, shard: str, name: str, *args: Any, **kw: Any) -> str:
    """Run ``alembic.command.<name>`` on one shard's open connection; return its output."""
    from alembic import command

    out = io.StringIO()
    getattr(command, name)(alembic_config(shard, connection, stdout=out), *args, **kw)
    return out.getvalue()


async def _read(engine: AsyncEngine) -> tuple[str, ...]:
    async with engine.connect() as conn:
        revisions = await conn.run_sync(schema.read_revisions)
    schema.remember(engine, revisions)
    return revisions


async def revisions(engines: Mapping[str, AsyncEngine]) -> pd.DataFrame:
    """Every shard's revisions, one row per shard: ``revision`` and ``has schema head``."""
    check_engines(engines)
    rows = []
    for shard in SHARD_IDS:
        revs = await _read(engines[shard])
        rows.append({"shard": shard, "revision": schema.describe(revs), "has schema head": has_schema_head(revs)})
    return pd.DataFrame(rows).set_index("shard")


class MigrationError(RuntimeError):
    """A migration failed on one shard: which one, why, and where every shard is now.

    ``shard`` failed (and was rolled back); ``done`` finished before it;
    ``not_attempted`` come after it; ``revisions`` is :func:`revisions`' frame
    read after the failure.
    """

    def __init__(self, command: str, revision: str, shard: str, error: BaseException,
                 done: list[str], not_attempted: list[str], frame: pd.DataFrame) -> None:
        self.command, self.revision, self.shard, self.error = command, revision, shard, error
        self.done, self.not_attempted, self.revisions = done, not_attempted, frame
        state = {s: "done" for s in done} | {shard: "FAILED, rolled back"} | {
            s: "not attempted" for s in not_attempted}
        listed = "; ".join(f"{s}={frame.loc[s, 'revision']} ({state[s]})"
                           for s in frame.index if s in state)
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        super().__init__(
            f"{command} to {revision!r} failed on shard {shard!r}: {type(error).__name__}: {reason}. "
            f"Shards now: {listed}. Fix the cause and run the same {command} again "
            f"(python -m shardlib.migrations {command} {revision}): shards already done are skipped"
        )


async def _each_shard(engines: Mapping[str, AsyncEngine], targets: list[str], name: str,
                      revision: str, *args: Any, **kw: Any) -> dict[str, str]:
    outputs: dict[str, str] = {}
    for i, shard in enumerate(targets):
        engine = engines[shard]

        def go(conn: Connection, shard: str = shard) -> tuple[str, tuple[str, ...]]:
            output = run_alembic(conn, shard, name, *args, **kw)
            return output, schema.read_revisions(conn)

        try:
            outputs[shard], revs = await in_shard_transaction(engine, go)
        except Exception as error:
            schema.forget(engines.values())
            if name not in ("upgrade", "downgrade", "stamp"):
                raise
            frame = await revisions(engines)
            raise MigrationError(name, revision, shard, error, targets[:i], targets[i + 1:], frame) from error
        schema.remember(engine, revs)
    return outputs


def _upgrade_with_cached_scripts(connection: Connection, shard: str, target: str) -> None:
    """What ``alembic.command.upgrade`` does, with the revision scripts read once per
    process instead of once per call (``reset()`` runs for every notebook and test)."""
    from alembic.runtime.environment import EnvironmentContext

    script = script_directory()
    with EnvironmentContext(alembic_config(shard, connection), script, destination_rev=target,
                            fn=lambda rev, context: script._upgrade_revs(target, rev)):
        script.run_env()


async def rebuild(engine: AsyncEngine, shard: str, *, first_sequence_number: int = 1) -> None:
    """Empty one shard and build it through the migrations (what :func:`shardlib.reset` does).

    In one transaction: drop every shardlib table (lookup tables included) and
    ``alembic_version``, upgrade to the schema head, set the id counter (on
    ``COUNTER_SHARD``). Lookups are then not built (:func:`shardlib.lookups.enable`).
    """
    from .engines import refuse_in_doubt_transactions
    from .resharding import drop_sidecar

    def go(conn: Connection) -> tuple[str, ...]:
        if conn.dialect.name == "postgresql":
            refuse_in_doubt_transactions(conn, shard)
        counter_metadata.drop_all(conn)
        lookup_metadata.drop_all(conn)  # built on demand by shardlib.lookups.enable()
        Base.metadata.drop_all(conn)
        drop_sidecar(conn)  # a continent move's tables (shardlib.resharding)
        conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
        _upgrade_with_cached_scripts(conn, shard, f"{SCHEMA_BRANCH}@head")
        if shard == COUNTER_SHARD:
            conn.execute(update(id_counter).values(next_value=first_sequence_number))
        return schema.read_revisions(conn)

    schema.remember(engine, await in_shard_transaction(engine, go))
    if shard == COUNTER_SHARD:
        from .lookups import remember

        remember(engine, False)


async def migrate(engines: Mapping[str, AsyncEngine], revision: str = "head", *,
                  shard: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Upgrade every shard (or ``shard``) to ``revision``, one transaction per shard.

    Returns :func:`revisions`' frame; raises :class:`MigrationError` naming the
    failed shard and every shard's revisions if one fails (run it again to finish).
    """
    check_engines(engines)
    await _each_shard(engines, _shards(shard), "upgrade", revision, _target(revision))
    return await revisions(engines)


async def downgrade(engines: Mapping[str, AsyncEngine], revision: str, *,
                    shard: str | Sequence[str] | None = None) -> pd.DataFrame:
    """Downgrade every shard (or ``shard``) to ``revision``; see :func:`migrate`."""
    check_engines(engines)
    await _each_shard(engines, _shards(shard), "downgrade", revision, _target(revision))
    return await revisions(engines)


async def alembic_command(engines: Mapping[str, AsyncEngine], name: str, *args: Any,
                          shard: str | Sequence[str] | None = None, **kw: Any) -> dict[str, str]:
    """Run any ``alembic.command`` function on every shard (or ``shard``); outputs by shard.

    Commands that only read the scripts (``history``, ``heads``, ``show``,
    ``revision``, ...) run once, keyed ``"scripts"``; ``revision(...,
    autogenerate=True)`` compares against ``COUNTER_SHARD``, the shard with
    every table. ``"head"`` means ``shardlib@head`` as in :func:`migrate`.
    """
    check_engines(engines)
    if name not in DB_COMMANDS and not (name == "revision" and kw.get("autogenerate")):
        out = io.StringIO()
        from alembic import command

        getattr(command, name)(alembic_config(stdout=out), *args, **kw)
        return {"scripts": out.getvalue()}
    if name == "revision":
        shard = shard or COUNTER_SHARD
    if name in ("upgrade", "downgrade", "stamp") and args:
        args = (_target(args[0]), *args[1:])
    label = str(args[0]) if args else name
    return await _each_shard(engines, _shards(shard), name, label, *args, **kw)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m shardlib.migrations [--shard S]... [--data-dir D] <alembic command> ...``"""
    import asyncio

    from alembic.config import CommandLine

    from .engines import dispose, make_engines

    rest, shards, data_dir = [], [], None
    args = list(sys.argv[1:] if argv is None else argv)
    while args:
        arg = args.pop(0)
        if arg in ("--shard", "--data-dir") and args:
            value = args.pop(0)
            if arg == "--shard":
                shards += [s for s in value.split(",") if s]
            else:
                data_dir = value
        else:
            rest.append(arg)
    cli = CommandLine(prog="python -m shardlib.migrations")
    options = cli.parser.parse_args(rest)
    if not hasattr(options, "cmd"):
        cli.parser.error("too few arguments: give an Alembic command, e.g. upgrade head")
    fn, positional, kwarg = options.cmd
    pos = [getattr(options, k, None) for k in positional]
    kws = {k: getattr(options, k, None) for k in kwarg}

    async def go() -> int:
        engines = make_engines(data_dir=data_dir or os.environ.get("SHARDLIB_DATA_DIR"))
        try:
            outputs = await alembic_command(engines, fn.__name__, *pos, shard=shards or None, **kws)
            for shard, text in outputs.items():
                if text.strip():
                    print(f"== {shard}\n{text.rstrip()}")
            if fn.__name__ in DB_COMMANDS:
                print((await revisions(engines)).to_string())
            return 0
        except MigrationError as error:
            print(f"error: {error}", file=sys.stderr)
            print(error.revisions.to_string(), file=sys.stderr)
            return 1
        except ValueError as error:  # an unknown shard or revision: nothing was run
            print(f"error: {error}", file=sys.stderr)
            return 2
        finally:
            await dispose(engines)

    return asyncio.run(go())


__all__ = ["MigrationError", "SCHEMA_BRANCH", "alembic_command", "alembic_config", "current_shard",
           "downgrade", "in_shard_transaction", "migrate", "rebuild", "revisions", "schema_head"]

if __name__ == "__main__":
    sys.exit(main())
