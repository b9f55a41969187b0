"""Shared fixtures: a fresh set of four file-backed shards per test.

Async code runs on one event loop per test (``run``); engines belong to it.
With ``SHARDLIB_URLS`` set, the same tests run against those servers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Iterator
from typing import Any

import pytest

import shardlib
from shardlib import Report, WeatherLocation

FIXED_TIME = datetime.datetime(2024, 1, 1, 12, 0, 0)

SEED_CITIES = [
    ("Asia", "Tokyo"),
    ("North America", "New York"),
    ("North America", "Toronto"),
    ("Europe", "London"),
    ("Europe", "Dublin"),
    ("South America", "Brasilia"),
    ("South America", "Quito"),
]


def seed_locations() -> list[WeatherLocation]:
    """The seed's seven cities, with its three reports (fixed report times)."""
    locations = {city: WeatherLocation(continent, city) for continent, city in SEED_CITIES}
    locations["Tokyo"].reports.append(Report(80.0, FIXED_TIME))
    locations["New York"].reports.append(Report(75, FIXED_TIME))
    locations["Quito"].reports.append(Report(85, FIXED_TIME))
    return list(locations.values())


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


class World:
    """Engines, a sessionmaker and the loop they live on."""

    def __init__(self, loop: asyncio.AbstractEventLoop, data_dir: str) -> None:
        self.loop = loop
        self.engines = shardlib.make_engines(data_dir=data_dir)
        self.Session = shardlib.make_sessionmaker(self.engines)
        self.run(shardlib.reset(self.engines))

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(shardlib.dispose(self.engines))


@pytest.fixture
def world(loop: asyncio.AbstractEventLoop, tmp_path: Any) -> Iterator[World]:
    w = World(loop, str(tmp_path / "shards"))
    yield w
    w.close()


def on_postgres() -> bool:
    return bool(os.environ.get("SHARDLIB_URLS", "").strip())
