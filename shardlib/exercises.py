"""Checking a learner's answer in a notebook exercise, in words.

Every exercise in the course has three cells: the learner's cell (the answer
starts as ``...``), a visible *check* cell, and a hidden solution. The check
cell compares the learner's answer with what really happens and says so::

    check_answer("lima_shard", lima_shard, observed_shard, cell="the cell above")

It prints one line and returns ``True`` (right), ``False`` (wrong) or
``None`` (not answered yet: the answer is still ``...``). It never raises for a wrong or missing answer:
Restart & Run All must stay green before the learner has written anything.
"""

from __future__ import annotations

from typing import Any

def is_unanswered(value: Any) -> bool:
    """True for the placeholder a learner's cell starts with: ``...`` (or a dict of only ``...``).

    ``None`` is an answer (e.g. "no such row"), not a placeholder.

    >>> is_unanswered(...), is_unanswered({"A": ..., "B": ...}), is_unanswered(None), is_unanswered({"A": 1, "B": ...})
    (True, True, False, False)
    """
    if value is Ellipsis:
        return True
    if isinstance(value, dict):
        return bool(value) and all(is_unanswered(v) for v in value.values())
    return False


def shard_list(value: Any) -> Any:
    """A learner's list of shard ids in ``SHARD_IDS`` order (unknown names last), so order never matters.

    Placeholders (``...``) pass through unchanged.

    >>> shard_list(["europe", "asia"])
    ['asia', 'europe']
    >>> shard_list(["europa", "asia"])
    ['asia', 'europa']
    """
    from .shards import SHARD_IDS

    if is_unanswered(value) or isinstance(value, str) or not hasattr(value, "__iter__"):
        return value
    return sorted(value, key=lambda s: (SHARD_IDS.index(s) if s in SHARD_IDS else len(SHARD_IDS), str(s)))


def check_answer(name: str, given: Any, expected: Any, *, cell: str) -> bool | None:
    """Compare ``given`` with ``expected`` and say what happened, naming ``cell`` to change.

    >>> check_answer("x", ..., 3, cell="the cell above")
    x: not answered yet: put your answer in the cell above and run it, then run this cell again
    >>> check_answer("x", 3, 3, cell="the cell above")
    x: right (3)
    True
    >>> check_answer("x", 4, 3, cell="the cell above")
    x: not quite: expected 3, you gave 4; change the cell above and run it, then run this cell again
    False
    """
    if is_unanswered(given):
        print(f"{name}: not answered yet: put your answer in {cell} and run it, then run this cell again")
        return None
    if given == expected:
        print(f"{name}: right ({given!r})")
        return True
    print(f"{name}: not quite: expected {expected!r}, you gave {given!r}; "
          f"change {cell} and run it, then run this cell again")
    return False


__all__ = ["check_answer", "is_unanswered", "shard_list"]
