"""lme4's ``grouseticks`` data (Elston et al. 2001), bundled as CSV."""

from __future__ import annotations

from importlib import resources

import pandas as pd


def load_grouseticks() -> pd.DataFrame:
    """Ticks counted on red grouse chicks (lme4's ``grouseticks``).

    403 chicks (``INDEX``) in 118 broods (``BROOD``) at 63 locations (``LOCATION``),
    in three years, with the altitude of the location (``HEIGHT``, and ``cHEIGHT``
    centred). Written from R by ``tests/reference/make_reference.R``.

    Returns
    -------
    data : DataFrame
        Columns ``INDEX, TICKS, BROOD, HEIGHT, YEAR, LOCATION, cHEIGHT``; the factors
        are strings.

    References
    ----------
    Elston, D. A., Moss, R., Boulinier, T., Arrowsmith, C. and Lambin, X. (2001).
    Analysis of aggregation, a worked example: numbers of ticks on red grouse chicks.
    Parasitology 122, 563-569.
    """
    path = resources.files("skmixed.datasets") / "data" / "grouseticks.csv"
    with resources.as_file(path) as p:
        data = pd.read_csv(p, dtype={"INDEX": str, "BROOD": str, "LOCATION": str, "YEAR": str})
    return data
