"""The spread the benchmark tables print: a quantile read off sorted values.

Imported by the benchmark scripts (``make bench`` runs only the files whose
name does not start with ``_``).
"""

from __future__ import annotations

from collections.abc import Sequence


def quantile(ordered: Sequence[float], q: float) -> float:
    """The value at fraction ``q`` (0.25: the 25th percentile) of the sorted ``ordered``:
    the nearest rank, no interpolation (the tables show measured runs, not estimates)."""
    return ordered[round(q * (len(ordered) - 1))]
