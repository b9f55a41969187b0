"""CPU cost of routing one statement, by number of WHERE conditions.

Prints, for clauses of 1 to 100 conditions in three shapes, the median CPU
time of ``shards_for`` (tree building + the per-shard decision) and of the
locality check the session runs before executing. Issue target: < 1 ms up to
100 conditions. Run: ``python benchmarks/routing_cost.py``.
"""

from __future__ import annotations

import statistics
import time

from sqlalchemy import and_, or_, select

from shardlib import WeatherLocation as WL
from shardlib.analysis import locality_problem, shards_for


def shapes(n: int) -> dict[str, object]:
    continents = ["Asia", "Europe", "North America", "South America"]
    return {
        "AND of city !=": select(WL).where(WL.continent == "Asia", *[WL.city != f"c{i}" for i in range(n - 1)]),
        "OR of (continent AND city)": select(WL).where(
            or_(*[and_(WL.continent == continents[i % 4], WL.city == f"c{i}") for i in range(max(1, n // 2))])),
        "repeated atom, both signs": select(WL).where(
            or_(*[and_(WL.city == f"c{i % 5}", ~(WL.city == f"c{(i + 1) % 5}")) for i in range(max(1, n // 2))]),
            WL.continent == "Europe"),
    }


def cpu_ms(fn, repeat: int = 30) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time_ns()
        fn()
        times.append((time.process_time_ns() - start) / 1e6)
    return statistics.median(times)


def main() -> None:
    print(f"{'shape':<28} {'conditions':>10} {'shards_for ms':>14} {'locality ms':>12} shards")
    for n in (1, 10, 13, 50, 100):
        for name, statement in shapes(n).items():
            routed = shards_for(statement)
            print(f"{name:<28} {n:>10} {cpu_ms(lambda: shards_for(statement)):>14.3f} "
                  f"{cpu_ms(lambda: locality_problem(statement)):>12.3f} {','.join(routed)}")


if __name__ == "__main__":
    main()
