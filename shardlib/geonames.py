"""A small, real country list for the reference-table examples.

Source: GeoNames ``countryInfo.txt`` (https://download.geonames.org/export/dump/countryInfo.txt),
columns ``ISO``, ``Country`` and ``Continent``, a subset: the countries of
shardlib's continents that the notebooks' cities need, and a few more per
continent. GeoNames' continent codes (``EU``, ``AS``, ...) are spelled the way
shardlib names continents (:data:`CONTINENT_NAMES`).

Attribution (required by the licence): this data is from GeoNames
(https://www.geonames.org/), licensed under a Creative Commons Attribution 4.0
License (https://creativecommons.org/licenses/by/4.0/). It is reproduced
unchanged except for the selection of rows and columns and the spelled-out
continent names.

>>> len(COUNTRIES), COUNTRIES[0]
(48, ('AR', 'Argentina', 'South America'))
"""

from __future__ import annotations

CONTINENT_NAMES = {
    "AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe",
    "NA": "North America", "OC": "Oceania", "SA": "South America",
}
"""GeoNames continent code -> the continent name shardlib uses."""

_GEONAMES_ROWS = """\
AR	Argentina	SA
AU	Australia	OC
AT	Austria	EU
BE	Belgium	EU
BO	Bolivia	SA
BR	Brazil	SA
CA	Canada	NA
CL	Chile	SA
CN	China	AS
CO	Colombia	SA
CR	Costa Rica	NA
CU	Cuba	NA
DK	Denmark	EU
EC	Ecuador	SA
EG	Egypt	AF
FI	Finland	EU
FR	France	EU
DE	Germany	EU
GR	Greece	EU
IN	India	AS
ID	Indonesia	AS
IE	Ireland	EU
IT	Italy	EU
JP	Japan	AS
KE	Kenya	AF
MY	Malaysia	AS
MX	Mexico	NA
NL	Netherlands	EU
NZ	New Zealand	OC
NG	Nigeria	AF
NO	Norway	EU
PA	Panama	NA
PY	Paraguay	SA
PE	Peru	SA
PH	Philippines	AS
PL	Poland	EU
PT	Portugal	EU
SG	Singapore	AS
ZA	South Africa	AF
KR	South Korea	AS
ES	Spain	EU
SE	Sweden	EU
CH	Switzerland	EU
TH	Thailand	AS
GB	United Kingdom	EU
US	United States	NA
UY	Uruguay	SA
VN	Vietnam	AS
"""

COUNTRIES: tuple[tuple[str, str, str], ...] = tuple(
    sorted(
        ((code, name, CONTINENT_NAMES[continent])
         for code, name, continent in (line.split("\t") for line in _GEONAMES_ROWS.splitlines())),
        key=lambda row: row[1],
    )
)
"""``(ISO code, name, continent)``, sorted by name."""

ATTRIBUTION = (
    "Country data from GeoNames (https://www.geonames.org/), "
    "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"
)
