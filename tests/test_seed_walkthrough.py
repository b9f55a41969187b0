"""The upstream example's own walkthrough, as a test against shardlib.

Every assert of the seed's ``main()`` is here, plus the shard each step touched.
"""

from __future__ import annotations

from sqlalchemy import inspect, select
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import immediateload

from shardlib import Report, WeatherLocation, shard_for_id, trace

from .conftest import seed_locations


def test_seed_walkthrough(world) -> None:
    async def main() -> None:
        locations = {loc.city: loc for loc in seed_locations()}
        tokyo, newyork = locations["Tokyo"], locations["New York"]
        async with world.Session() as sess:
            sess.add_all(list(locations.values()))
            await sess.commit()

            assert shard_for_id(tokyo.id) == "asia"
            assert len({loc.id for loc in locations.values()}) == 7

            with trace(world.engines) as t:
                t_loc = await sess.get(WeatherLocation, tokyo.id, options=[immediateload(WeatherLocation.reports)])
            assert t_loc.city == tokyo.city
            assert t_loc.reports[0].temperature == 80.0
            assert t.shards() == []  # identity map hit: no SQL at all

        async with world.Session() as sess:
            with trace(world.engines) as t:
                t_loc = await sess.get(WeatherLocation, tokyo.id, options=[immediateload(WeatherLocation.reports)])
            assert t_loc.reports[0].temperature == 80.0
            assert t.shards() == ["asia"]

            with trace(world.engines) as t:
                asia_and_europe = (
                    await sess.execute(
                        select(WeatherLocation).filter(WeatherLocation.continent.in_(["Europe", "Asia"]))
                    )
                ).scalars()
                assert {c.city for c in asia_and_europe} == {"Tokyo", "London", "Dublin"}
            assert t.shards() == ["asia", "europe"]

            with trace(world.engines) as t:
                north_american_cities_w_t = (
                    await sess.execute(
                        select(WeatherLocation)
                        .filter(WeatherLocation.city.startswith("T"))
                        .options(set_shard_id("north_america"))
                    )
                ).scalars()
                assert {c.city for c in north_american_cities_w_t} == {"Toronto"}
            assert t.shards() == ["north_america"]

        newyork_report = newyork.reports[0]
        tokyo_report = tokyo.reports[0]
        assert inspect(newyork_report).identity_key == (Report, (1,), "north_america")
        assert inspect(tokyo_report).identity_key == (Report, (1,), "asia")
        assert inspect(newyork_report).identity_token == "north_america"
        assert inspect(tokyo_report).identity_token == "asia"

    world.run(main())
