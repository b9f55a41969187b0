"""Seeing the shards: every shard's rows as DataFrames, and a trace of routed SQL.

In a notebook::

    await show_shards(engines, "weather_locations")     # side-by-side tables

    with trace(engines) as t:
        await session.execute(select(WeatherLocation).where(...))
    t.frame()                                            # shard | sql | params
    t.shards()                                           # ['asia']
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import Engine, event, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Base, counter_metadata
from .shards import SHARD_IDS

_TABLES = {**Base.metadata.tables, **counter_metadata.tables}


def _one_line(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Trace:
    """SQL statements recorded per shard while a :func:`trace` block was open."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def frame(self, params: bool = True) -> pd.DataFrame:
        """One row per statement: ``shard``, ``sql`` (one line) and ``params``."""
        columns = ["shard", "sql", "params"] if params else ["shard", "sql"]
        return pd.DataFrame([{k: r[k] for k in columns} for r in self.records], columns=columns)

    def shards(self) -> list[str]:
        """Shards that ran at least one statement, in ``SHARD_IDS`` order."""
        seen = {r["shard"] for r in self.records}
        return [s for s in SHARD_IDS if s in seen]

    def counts(self) -> pd.Series:
        """Statements per shard (every shard listed, zero included)."""
        counts = pd.Series(0, index=pd.Index(SHARD_IDS, name="shard"), name="statements")
        for record in self.records:
            counts[record["shard"]] += 1
        return counts

    def clear(self) -> None:
        self.records.clear()


@contextmanager
def trace(engines: Mapping[str, AsyncEngine | Engine]) -> Iterator[Trace]:
    """Record which shard ran which SQL, using ``before_cursor_execute`` events."""
    recorder = Trace()
    listeners = []
    for shard, engine in engines.items():
        sync_engine = getattr(engine, "sync_engine", engine)

        def before(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any,
                   executemany: bool, _shard: str = shard) -> None:
            recorder.records.append(
                {"shard": _shard, "sql": _one_line(statement), "params": _short(parameters),
                 "raw_params": parameters, "executemany": executemany}
            )

        event.listen(sync_engine, "before_cursor_execute", before)
        listeners.append((sync_engine, before))
    try:
        yield recorder
    finally:
        for sync_engine, before in listeners:
            event.remove(sync_engine, "before_cursor_execute", before)


async def shard_frames(
    engines: Mapping[str, AsyncEngine], table: str
) -> dict[str, pd.DataFrame]:
    """Every shard's rows of ``table`` as a DataFrame, ordered by primary key.

    A shard without the table (the id counter lives on one shard only) gets
    an empty frame.
    """
    try:
        table_obj = _TABLES[table]
    except KeyError:
        raise ValueError(f"unknown table {table!r}; valid tables are {', '.join(map(repr, _TABLES))}") from None
    frames: dict[str, pd.DataFrame] = {}
    for shard in SHARD_IDS:
        async with engines[shard].connect() as conn:
            has_table = await conn.run_sync(lambda c: c.dialect.has_table(c, table))
            if not has_table:
                frames[shard] = pd.DataFrame(columns=[c.name for c in table_obj.columns])
                frames[shard].attrs["missing_table"] = True  # shown as "(no such table)"
                continue
            stmt = select(table_obj).order_by(*(table_obj.primary_key.columns or table_obj.columns))
            rows = (await conn.execute(stmt)).all()
        frames[shard] = pd.DataFrame.from_records(
            [tuple(r) for r in rows], columns=[c.name for c in table_obj.columns]
        )
    return frames


def _empty(frame: pd.DataFrame) -> str:
    return "(no such table)" if frame.attrs.get("missing_table") else "(no rows)"


@dataclass
class ShardTables:
    """Several shards' DataFrames, shown side by side in a notebook."""

    table: str
    frames: dict[str, pd.DataFrame]

    def _repr_html_(self) -> str:
        cells = []
        for shard, frame in self.frames.items():
            body = frame.to_html(index=False) if len(frame) else f"<p><em>{_empty(frame)}</em></p>"
            cells.append(
                '<div style="flex: 1 1 0; min-width: 14em; overflow-x: auto">'
                f'<p style="font-weight: bold; margin: 0 0 0.3em 0">{html.escape(shard)}'
                f' <span style="font-weight: normal">({len(frame)} rows)</span></p>'
                f"{body}</div>"
            )
        return (
            f'<div class="shardlib-shards"><p><code>{html.escape(self.table)}</code> on each shard</p>'
            f'<div style="display: flex; gap: 1.5em; align-items: flex-start">{"".join(cells)}</div></div>'
        )

    def __repr__(self) -> str:
        parts = []
        for shard, frame in self.frames.items():
            body = frame.to_string(index=False) if len(frame) else _empty(frame)
            parts.append(f"--- {shard}: {self.table} ({len(frame)} rows) ---\n{body}")
        return "\n".join(parts)


async def show_shards(engines: Mapping[str, AsyncEngine], table: str = "weather_locations") -> ShardTables:
    """Each shard's rows of ``table``, displayed side by side (shard names as captions)."""
    return ShardTables(table, await shard_frames(engines, table))


def routing_frame(statements: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """A table of labelled statements and the shards :func:`shards_for` picks.

    One column per shard with a check mark, so the narrowing is visible at a glance.
    """
    from .routing import shards_for

    rows = []
    for label, statement in statements.items():
        chosen = shards_for(statement, params)
        rows.append({"query": label, **{s: ("✓" if s in chosen else "") for s in SHARD_IDS}})
    return pd.DataFrame(rows, columns=["query", *SHARD_IDS])


def shard_rows(frames: Mapping[str, pd.DataFrame]) -> pd.Series:
    """Rows per shard from :func:`shard_frames` output."""
    return pd.Series({s: len(f) for s, f in frames.items()}, name="rows")


__all__: Sequence[str] = ["Trace", "trace", "shard_frames", "show_shards", "ShardTables", "routing_frame", "shard_rows"]
