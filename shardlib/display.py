"""Seeing the shards: every shard's rows as DataFrames, and a trace of routed SQL.

In a notebook::

    await show_shards(engines, "weather_locations")     # side-by-side tables

    with trace(engines) as t:
        await session.execute(select(WeatherLocation).where(...))
    t.frame()                     # one row per statement: shards | sql | params
    t.frame(per_shard=True)       # one row per shard and statement: shard | sql | params
    t.shards()                    # ['asia']

``ShardedSession`` runs a statement that needs several shards once on each,
one after another, with the same SQL and the same parameters. ``t.frame()``
folds such a run into one row that lists the shards, so a four-shard SELECT
reads as one statement, not four copies of it. The SQL is shown whole (never
cut at pandas' 50 characters) and wraps inside its cell instead of widening
the table; :func:`wrapped` gives any DataFrame the same rendering.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from sqlalchemy import Engine, event, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine

from .models import Base, counter_metadata, lookup_metadata
from .shards import SHARD_IDS

_TABLES = {**Base.metadata.tables, **counter_metadata.tables, **lookup_metadata.tables}


def _one_line(sql: str) -> str:
    return re.sub(r"\s+", " ", sql).strip()


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_CELL = "text-align: left; vertical-align: top; white-space: pre-wrap; overflow-wrap: anywhere"


class WrappedFrame(pd.DataFrame):
    """A DataFrame that shows every cell whole and wraps long text instead of widening.

    pandas cuts cells at ``display.max_colwidth`` (50 characters) by default,
    and with ``max_colwidth=None`` a long SQL statement makes a table many
    screens wide. This frame's HTML gives each cell ``white-space: pre-wrap``
    (long text wraps at spaces, inside the notebook's width) and its plain-text
    form never truncates. Everything else is an ordinary DataFrame; frames
    derived from it (filters, sorts) keep the rendering.
    """

    _metadata: list[str] = []

    @property
    def _constructor(self) -> type[WrappedFrame]:
        return WrappedFrame

    def _repr_html_(self) -> str:
        index_name = html.escape(str(self.index.name)) if self.index.name is not None else ""
        head = "".join(f'<th style="text-align: left">{html.escape(str(c))}</th>' for c in self.columns)
        rows = []
        for label, values in zip(self.index, self.itertuples(index=False, name=None)):
            cells = "".join(f'<td style="{_CELL}">{html.escape(_cell_text(v))}</td>' for v in values)
            rows.append(f"<tr><th>{html.escape(str(label))}</th>{cells}</tr>")
        return (
            '<table class="dataframe shardlib-wrapped" style="table-layout: auto; max-width: 100%">'
            f"<thead><tr><th>{index_name}</th>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>"
        )

    def __repr__(self) -> str:
        return pd.DataFrame(self).to_string()  # to_string() never cuts cells (unlike repr)


def _cell_text(value: Any) -> str:
    return "" if value is None else str(value)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # parameters that cannot be compared are taken as different
        return False


def wrapped(frame: pd.DataFrame) -> WrappedFrame:
    """``frame`` rendered whole and wrapped (see :class:`WrappedFrame`): keeps wide tables narrow."""
    return WrappedFrame(frame)


@dataclass
class Trace:
    """SQL statements recorded per shard while a :func:`trace` block was open."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def frame(self, params: bool = True, per_shard: bool = False) -> WrappedFrame:
        """The recorded SQL as a table, one row per statement execution.

        Columns ``shards`` (the shards that ran it, in the order they ran),
        ``sql`` (whole, on one line) and ``params``. Consecutive records with
        the same SQL and parameters on different shards are one execution of
        a statement on several shards, and become one row. The same statement
        run again on a shard that is already in the row starts a new row, so
        nothing that really ran twice is hidden.

        ``per_shard=True`` gives the raw records instead: one row per shard
        and statement, column ``shard``.
        """
        if per_shard:
            columns = ["shard", "sql", "params"] if params else ["shard", "sql"]
            return WrappedFrame([{k: r[k] for k in columns} for r in self.records], columns=columns)
        columns = ["shards", "sql", "params"] if params else ["shards", "sql"]
        rows = [
            {"shards": ", ".join(group["shards"]), "sql": group["sql"], "params": group["params"]}
            for group in self.statements()
        ]
        return WrappedFrame([{k: row[k] for k in columns} for row in rows], columns=columns)

    def statements(self) -> list[dict[str, Any]]:
        """The records folded into statement executions: ``shards`` (a list), ``sql``, ``params``."""
        groups: list[dict[str, Any]] = []
        for record in self.records:
            last = groups[-1] if groups else None
            if (
                last is not None
                and last["sql"] == record["sql"]
                and _same(last["raw_params"], record["raw_params"])
                and record["shard"] not in last["shards"]
            ):
                last["shards"].append(record["shard"])
            else:
                groups.append({"shards": [record["shard"]], "sql": record["sql"], "params": record["params"],
                               "raw_params": record["raw_params"]})
        return groups

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
            present = set(await conn.run_sync(lambda c: [col["name"] for col in inspect(c).get_columns(table)]))
            columns = [c for c in table_obj.columns if c.name in present]  # a table of an older schema
            key = [c for c in table_obj.primary_key.columns if c.name in present] or columns
            stmt = select(*columns).order_by(*key)
            rows = (await conn.execute(stmt)).all()
        frames[shard] = pd.DataFrame.from_records(
            [tuple(r) for r in rows], columns=[c.name for c in columns]
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


def routing_frame(statements: Mapping[str, Any], params: Mapping[str, Any] | None = None) -> WrappedFrame:
    """A table of labelled statements and the shards :func:`shards_for` picks.

    One column per shard with a check mark, so the narrowing is visible at a glance.
    """
    from .routing import shards_for

    rows = []
    for label, statement in statements.items():
        chosen = shards_for(statement, params)
        rows.append({"query": label, **{s: ("✓" if s in chosen else "") for s in SHARD_IDS}})
    return WrappedFrame(rows, columns=["query", *SHARD_IDS])


def shard_rows(frames: Mapping[str, pd.DataFrame]) -> pd.Series:
    """Rows per shard from :func:`shard_frames` output."""
    return pd.Series({s: len(f) for s, f in frames.items()}, name="rows")


__all__: Sequence[str] = ["Trace", "WrappedFrame", "wrapped", "trace", "shard_frames", "show_shards", "ShardTables", "routing_frame", "shard_rows"]
