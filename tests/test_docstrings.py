"""The examples in shardlib's docstrings are documentation: they must run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import shardlib

MODULES = [m.name for m in pkgutil.iter_modules(shardlib.__path__, "shardlib.")]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_explain_shows_each_shards_clause() -> None:
    from sqlalchemy import or_, select

    from shardlib import WeatherLocation as WL
    from shardlib.routing import explain

    rows = explain(select(WL).where(or_(WL.continent == "Asia", WL.city == "Quito")))
    assert [r["visit"] for r in rows] == ["yes"] * 4
    assert rows[2]["clause on this shard"] == "(FALSE OR city = 'Quito')"
    rows = explain(select(WL).where(WL.continent.in_(["Asia", "Europe"]) & (WL.city != "X")))
    assert [r["visit"] for r in rows] == ["no", "yes", "yes", "no"]
    assert rows[0]["clause on this shard"] == "(FALSE AND NOT city = 'X')"
