"""gather() when a shard fails or is slow: the others are cancelled, every connection goes back
to its pool, and the error names the shards involved (issue 11, class 4).

Slow shards are made slow with :func:`shardlib.latency.injected_latency` (a sleep on the shard's own
connection before each statement). Whether a shard's real statement *finished* is observed with an
``after_cursor_execute`` engine event; connections still out are read from each pool
(``engine.sync_engine.pool.checkedout()``) the moment gather raises. No timing is asserted: the slow
shards sleep several times longer than the fast path needs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, func, select

from shardlib import SHARD_IDS, WeatherLocation as WL, gather, trace
from shardlib.gather import ShardFailed
from shardlib.latency import injected_latency

SLOW_S = 4.0
STATEMENT = select(func.count()).select_from(WL)


@contextmanager
def finished_statements(engines: dict[str, Any]) -> Iterator[Counter[str]]:
    """Per shard: statements that completed (after_cursor_execute fired)."""
    counts: Counter[str] = Counter()
    listeners = []
    for shard, engine in engines.items():
        def after(*args: Any, _shard: str = shard) -> None:
            counts[_shard] += 1
        event.listen(engine.sync_engine, "after_cursor_execute", after)
        listeners.append((engine.sync_engine, after))
    try:
        yield counts
    finally:
        for target, fn in listeners:
            event.remove(target, "after_cursor_execute", fn)


@contextmanager
def failing(engine: Any) -> Iterator[None]:
    def boom(*args: Any) -> None:
        raise RuntimeError("injected failure")
    event.listen(engine.sync_engine, "before_cursor_execute", boom)
    try:
        yield
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", boom)


def checked_out(engines: dict[str, Any]) -> dict[str, int]:
    return {shard: engine.sync_engine.pool.checkedout() for shard, engine in engines.items()}


def test_one_failing_shard_cancels_the_others_and_returns_their_connections(world) -> None:
    engines = world.engines
    slow = {s: e for s, e in engines.items() if s != "asia"}
    seen: dict[str, Any] = {}

    async def go() -> None:
        with pytest.raises(ShardFailed) as info:
            await gather(engines, STATEMENT)
        seen["error"] = info.value
        seen["checked_out"] = checked_out(engines)  # the moment gather raised

    with trace(engines) as t, finished_statements(engines) as finished, injected_latency(slow, SLOW_S), \
            failing(engines["asia"]):
        world.run(go())
    error = seen["error"]
    assert error.shard == "asia" and "'asia'" in str(error) and "injected failure" in str(error)
    assert "cancelled" in str(error) and all(repr(s) in str(error) for s in slow)
    assert seen["checked_out"] == {s: 0 for s in SHARD_IDS}
    assert "asia" in t.shards()  # the others may be cancelled before or after they send their SQL...
    assert sum(finished.values()) == 0  # ...but none finishes it: cancelled, not awaited


def test_timeout_cancels_every_shard_and_names_those_that_had_not_answered(world) -> None:
    engines = world.engines
    slow = {s: e for s, e in engines.items() if s != "asia"}
    seen: dict[str, Any] = {}

    async def go() -> None:
        with pytest.raises(TimeoutError) as info:
            await gather(engines, STATEMENT, timeout=SLOW_S / 3)
        seen["error"] = info.value
        seen["checked_out"] = checked_out(engines)

    with finished_statements(engines) as finished, injected_latency(slow, SLOW_S):
        world.run(go())
    message = str(seen["error"])
    assert all(repr(s) in message.split("answered")[0] for s in slow), message
    assert "answered: 'asia'" in message
    assert seen["checked_out"] == {s: 0 for s in SHARD_IDS}
    assert dict(finished) == {"asia": 1}


def test_a_caller_cancelling_gather_gets_every_connection_back(world) -> None:
    engines = world.engines
    seen: dict[str, Any] = {}

    async def go() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(gather(engines, STATEMENT), SLOW_S / 3)
        seen["checked_out"] = checked_out(engines)

    with finished_statements(engines) as finished, injected_latency(engines, SLOW_S):
        world.run(go())
    assert seen["checked_out"] == {s: 0 for s in SHARD_IDS}
    assert sum(finished.values()) == 0


def test_cancelled_twice_gather_still_waits_for_every_connection(world) -> None:
    engines = world.engines
    seen: dict[str, Any] = {}

    async def go() -> None:
        task = asyncio.ensure_future(gather(engines, STATEMENT))
        await asyncio.sleep(SLOW_S / 8)
        task.cancel()  # gather cancels the shards and waits for them...
        await asyncio.sleep(SLOW_S / 8)
        task.cancel()  # ...and a second cancel must not cut that wait short
        with pytest.raises(asyncio.CancelledError):
            await task
        seen["checked_out"] = checked_out(engines)

    with finished_statements(engines) as finished, injected_latency(engines, SLOW_S):
        world.run(go())
    assert seen["checked_out"] == {s: 0 for s in SHARD_IDS}
    assert sum(finished.values()) == 0


def test_no_failure_no_timeout_gives_the_answer(world) -> None:
    assert world.run(gather(world.engines, STATEMENT, timeout=60))[0][0] == 0
