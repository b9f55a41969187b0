"""Concurrent writers in separate processes: the write ticket is the file's own
lock (SQLite) and the server's (PostgreSQL), so it holds across processes.

Each worker process builds its own engines on the same shard files (or
``SHARDLIB_URLS``), waits at a barrier so that all start together, and runs
several sessions at once, each writing two shards in opposite order with two
flushes. The parent then reads every shard without shardlib and compares
with one unsharded database holding the rows the workers reported.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from typing import Any

import pytest

import shardlib

from .test_concurrency import ORDERS, check_final_rows, opposite_order_writer

JOIN_TIMEOUT_S = 240
"""A worker still running after this is hung (the test fails; no speed is asserted)."""


def _worker(data_dir: str, worker: int, sessions: int, barrier: Any, results: Any,
            ticket: bool) -> None:
    async def go() -> list[Any]:
        engines = shardlib.make_engines(data_dir=data_dir)
        info = {} if ticket else {"shardlib.write_ticket": False}
        Session = shardlib.make_sessionmaker(engines, info=info)
        try:
            await asyncio.to_thread(barrier.wait)
            return await asyncio.gather(
                *(opposite_order_writer(Session, f"p{worker}s{n}", *ORDERS[(worker + n) % len(ORDERS)],
                                        pause=0.02)
                  for n in range(sessions)),
                return_exceptions=True,
            )
        finally:
            await shardlib.dispose(engines)

    outcome = asyncio.run(go())
    results.put((worker, [r if not isinstance(r, BaseException) else f"{type(r).__name__}: {r}"
                          for r in outcome]))


def run_workers(data_dir: str, processes: int, sessions: int, ticket: bool = True) -> list[Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    workers = [ctx.Process(target=_worker, args=(data_dir, w, sessions, barrier, results, ticket))
               for w in range(processes)]
    for p in workers:
        p.start()
    collected = []
    try:
        for _ in workers:
            collected.append(results.get(timeout=JOIN_TIMEOUT_S))
    finally:
        for p in workers:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [r for _, outcome in sorted(collected) for r in outcome]


@pytest.mark.parametrize("processes, sessions", [(2, 1), (6, 5)], ids=["2 processes", "30 sessions in 6 processes"])
def test_opposite_order_writers_in_separate_processes_all_commit(world, processes, sessions) -> None:
    data_dir = os.path.dirname(world.engines["asia"].url.database or "") or "unused-on-servers"
    outcome = run_workers(data_dir, processes, sessions)
    errors = [r for r in outcome if isinstance(r, str)]
    assert not errors, f"{len(errors)} of {len(outcome)} sessions failed: {errors[:2]}"
    written = [tuple(row) for r in outcome for row in r]
    assert len(written) == 2 * processes * sessions
    check_final_rows(world.loop, world.engines, written)
