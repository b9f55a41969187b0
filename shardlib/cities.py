"""Real cities: the GeoNames list of 34,006 cities with 15,000 people or more.

Shipped with shardlib as a 450 kB extract (``shardlib/data/cities15000.csv.gz``,
GeoNames data under CC BY 4.0, see ``shardlib/data/ATTRIBUTION.md``), so no
download and no 179 MB package are needed. Real data has real skew: Asia has
almost thirty times as many cities as Oceania, which is what makes a
directory-sharded continent worth moving (notebook 14)::

    >>> from shardlib.cities import load_cities, counts_by_continent
    >>> len(load_cities())
    34006
    >>> counts_by_continent()["Asia"], counts_by_continent()["Oceania"]
    (12523, 438)
"""

from __future__ import annotations

import csv
import functools
import gzip
from collections import Counter
from importlib import resources
from typing import NamedTuple


class City(NamedTuple):
    geonameid: int
    name: str
    country: str
    continent: str
    population: int


@functools.cache
def load_cities() -> tuple[City, ...]:
    """Every city in the extract, by GeoNames id."""
    raw = resources.files("shardlib").joinpath("data/cities15000.csv.gz").read_bytes()
    reader = csv.reader(gzip.decompress(raw).decode("utf-8").splitlines())
    next(reader)  # header
    return tuple(City(int(g), name, country, continent, int(population))
                 for g, name, country, continent, population in reader)


def counts_by_continent() -> dict[str, int]:
    """Cities per continent, largest first."""
    return dict(Counter(c.continent for c in load_cities()).most_common())


def cities_of(*continents: str) -> list[City]:
    """The cities of ``continents``, by GeoNames id."""
    wanted = set(continents)
    return [c for c in load_cities() if c.continent in wanted]


__all__ = ["City", "cities_of", "counts_by_continent", "load_cities"]
