"""The upstream example's choosers and id generator, kept for comparison only.

Copied from SQLAlchemy's ``examples/sharding/asyncio.py`` (the seed), adapted
to shardlib's models. **Do not use them**: the notebooks and benchmarks use
them to show what shardlib fixes.

* :func:`execute_chooser` never narrows. ``visitors.traverse`` visits a
  comparison *before* the column and bind inside it, so when
  ``visit_binary`` asks "is the left side a column I have seen?" the answer is
  always no, the comparison list stays empty, and every SELECT goes to all
  four shards. Results stay correct, which is why nobody notices. Had it
  fired, it would also have been wrong: it treats every comparison as AND-ed,
  so ``continent = 'Asia' OR city = 'Quito'`` would skip South America.
* :func:`identity_chooser` sends ``get()`` to every shard.
* :func:`id_generator` runs one transaction per new row (about 600 rows/s).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import ORMExecuteState
from sqlalchemy.sql import operators, visitors

from .models import WeatherLocation, id_counter
from .shards import SERVING_SHARD_IDS
from .shards import SHARD_FOR_CONTINENT


def identity_chooser(mapper: Any, primary_key: Any, *, lazy_loaded_from: Any = None, **kw: Any) -> list[str]:
    """The seed's identity chooser: the parent's shard in a lazy load, else all."""
    if lazy_loaded_from:
        return [lazy_loaded_from.identity_token]
    return list(SERVING_SHARD_IDS)


def execute_chooser(context: ORMExecuteState) -> list[str]:
    """The seed's execute chooser (verbatim logic)."""
    ids: list[str] = []
    for column, operator, value in get_select_comparisons(context.statement):
        if column.shares_lineage(WeatherLocation.__table__.c.continent):
            if operator == operators.eq:
                ids.append(SHARD_FOR_CONTINENT[value])
            elif operator == operators.in_op:
                ids.extend(SHARD_FOR_CONTINENT[v] for v in value)
    if len(ids) == 0:
        return list(SERVING_SHARD_IDS)
    return ids


def get_select_comparisons(statement: Any) -> list[tuple[Any, Any, Any]]:
    """The seed's ``_get_select_comparisons`` (verbatim): always returns ``[]``."""
    binds: dict[Any, Any] = {}
    clauses: set[Any] = set()
    comparisons: list[tuple[Any, Any, Any]] = []

    def visit_bindparam(bind: Any) -> None:
        value = bind.effective_value
        binds[bind] = value

    def visit_column(column: Any) -> None:
        clauses.add(column)

    def visit_binary(binary: Any) -> None:
        if binary.left in clauses and binary.right in binds:
            comparisons.append((binary.left, binary.operator, binds[binary.right]))
        elif binary.left in binds and binary.right in clauses:
            comparisons.append((binary.right, binary.operator, binds[binary.left]))

    if getattr(statement, "whereclause", None) is not None:
        visitors.traverse(
            statement.whereclause,
            {},
            {"bindparam": visit_bindparam, "binary": visit_binary, "column": visit_column},
        )
    return comparisons


def id_generator(engine: Engine) -> int:
    """The seed's id generator: a whole transaction for every single id."""
    with engine.begin() as conn:
        nextid = conn.scalar(select(id_counter.c.next_value).with_for_update())
        conn.execute(update(id_counter).values(next_value=id_counter.c.next_value + 1))
    return int(nextid)
