"""Global ids: one atomic counter, handed out in blocks, once per flush.

The seed opened a transaction on shard #1 for *every* new row (about 600
rows/s). shardlib instead:

1. counts the new ``WeatherLocation`` objects in ``before_flush``;
2. takes that many sequence numbers from a block it already holds in memory
   (hi/lo), refilling the block with one ``UPDATE id_counter SET next_value =
   next_value + :n RETURNING next_value`` when it runs short;
3. turns each sequence number into an id that names the object's shard
   (:func:`shardlib.shards.make_id`).

Deadlock freedom
----------------
The counter lives in a shard's database (``north_america``, as in the seed).
SQLite locks a whole database file for writing, so if *this* session already
holds a connection to that shard inside its transaction (it may have written
there), a second connection waiting for the file lock would wait for the
session, which is waiting for it: a deadlock. In that case the counter is
advanced on the session's own connection, inside its transaction, and
exactly as many numbers as needed are taken (a rollback returns them, so
none may be cached). Otherwise a short transaction of its own takes a whole
block and commits at once, so concurrent writers barely wait on the counter.

On PostgreSQL the counter is a row, and row locks are what a server offers:
``UPDATE ... RETURNING`` takes the row lock for the length of the allocator's
own short transaction, never the session's, so there is no such deadlock and
blocks are always cached.
"""

from __future__ import annotations

import weakref
from collections import deque

from sqlalchemy import Connection, Engine, update

from .models import id_counter

DEFAULT_BLOCK_SIZE = 1000


def advance_counter(connection: Connection, count: int) -> int:
    """Reserve ``count`` sequence numbers; return the first. One statement, atomic."""
    new_next = connection.execute(
        update(id_counter)
        .values(next_value=id_counter.c.next_value + count)
        .returning(id_counter.c.next_value)
    ).scalar_one()
    return int(new_next) - count


class IdAllocator:
    """Hands out unique sequence numbers from the counter on ``engine`` (hi/lo)."""

    def __init__(self, engine: Engine, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size!r}")
        self.engine = engine
        self.block_size = block_size
        self._cached: deque[range] = deque()  # committed, not yet handed out

    def forget(self) -> None:
        """Drop the cached block (after :func:`shardlib.reset` restarts the counter)."""
        self._cached.clear()

    def _take_cached(self, count: int) -> list[int]:
        taken: list[int] = []
        while self._cached and len(taken) < count:
            block = self._cached.popleft()
            need = count - len(taken)
            taken.extend(block[:need])
            if len(block) > need:
                self._cached.appendleft(block[need:])
        return taken

    def allocate(self, count: int, own_connection: Connection | None = None) -> list[int]:
        """Return ``count`` unused sequence numbers.

        ``own_connection`` is the caller's connection to the counter's database
        inside its open transaction, if it has one (see the module docstring).
        Runs without awaiting between reading and updating the cache, so
        concurrent asyncio tasks never receive the same number.
        """
        if count <= 0:
            return []
        taken = self._take_cached(count)
        need = count - len(taken)
        if need == 0:
            return taken
        if own_connection is not None:
            start = advance_counter(own_connection, need)
            return taken + list(range(start, start + need))
        size = max(need, self.block_size)
        with self.engine.begin() as connection:
            start = advance_counter(connection, size)
        self._cached.append(range(start + need, start + size))
        return taken + list(range(start, start + need))

    def reserve(self, numbers: list[int], own_connection: Connection | None = None) -> None:
        """Record explicitly chosen sequence numbers, so the counter never hands them out.

        The counter moves past the largest one (``next_value = max(next_value,
        n + 1)``), and this process's cached blocks forget them. A number below
        the counter may still sit, unused, in *another* process's cached block;
        if that process later hands it out on the same shard, the primary key
        refuses the row (an ``IntegrityError``, never a silent duplicate).
        """
        if not numbers:
            return
        wanted = set(numbers)
        self._cached = deque(
            part for block in self._cached for part in _without(block, wanted)
        )
        highest = max(numbers)
        statement = (
            update(id_counter)
            .where(id_counter.c.next_value <= highest)
            .values(next_value=highest + 1)
        )
        if own_connection is not None:
            own_connection.execute(statement)
        else:
            with self.engine.begin() as connection:
                connection.execute(statement)


def _without(block: range, numbers: set[int]) -> list[range]:
    """``block`` with ``numbers`` cut out, as contiguous ranges."""
    cuts = sorted(n for n in numbers if n in block)
    parts, start = [], block.start
    for n in cuts:
        if n > start:
            parts.append(range(start, n))
        start = n + 1
    if start < block.stop:
        parts.append(range(start, block.stop))
    return parts


_allocators: weakref.WeakKeyDictionary[Engine, IdAllocator] = weakref.WeakKeyDictionary()


def allocator_for(engine: Engine) -> IdAllocator:
    """The one allocator per counter engine, shared by every session using it."""
    allocator = _allocators.get(engine)
    if allocator is None:
        allocator = _allocators[engine] = IdAllocator(engine)
    return allocator


def forget_allocations(engine: Engine) -> None:
    """Called by :func:`shardlib.reset`: cached blocks refer to the old counter."""
    allocator = _allocators.get(engine)
    if allocator is not None:
        allocator.forget()
