"""lme4's data sets for linear mixed models, bundled as gzipped CSV.

Written from R by ``tests/reference/lmm/make_reference.R`` (lme4 1.1-31). Factors are
read as strings.
"""

from __future__ import annotations

from importlib import resources

import pandas as pd


def _read(name, factors):
    path = resources.files("skmixed.datasets") / "data" / f"{name}.csv.gz"
    with resources.as_file(path) as p:
        return pd.read_csv(p, dtype={f: str for f in factors})


def load_sleepstudy() -> pd.DataFrame:
    """Reaction times in a sleep deprivation study (lme4's ``sleepstudy``).

    180 rows: average ``Reaction`` time (ms) of 18 subjects (``Subject``) on ``Days``
    0-9 of sleep deprivation (Belenky et al. 2003).

    Returns
    -------
    data : DataFrame
        Columns ``Reaction, Days, Subject`` (``Subject`` a string).

    Examples
    --------
    >>> from skmixed.datasets import load_sleepstudy
    >>> load_sleepstudy().shape
    (180, 3)
    """
    return _read("sleepstudy", ["Subject"])


def load_penicillin() -> pd.DataFrame:
    """Penicillin potency assay (lme4's ``Penicillin``): crossed factors.

    144 rows: ``diameter`` of the growth-inhibition zone for 6 penicillin ``sample`` s
    on each of 24 ``plate`` s.

    Examples
    --------
    >>> from skmixed.datasets import load_penicillin
    >>> load_penicillin().shape
    (144, 3)
    """
    return _read("penicillin", ["plate", "sample"])


def load_pastes() -> pd.DataFrame:
    """Paste strength (lme4's ``Pastes``): casks nested in batches.

    60 rows: ``strength`` of 2 samples from each of 3 ``cask`` s in each of 10
    ``batch`` es; ``sample`` labels the cask within batch.

    Examples
    --------
    >>> from skmixed.datasets import load_pastes
    >>> load_pastes().shape
    (60, 4)
    """
    return _read("pastes", ["batch", "cask", "sample"])


def load_insteval() -> pd.DataFrame:
    """University lecture evaluations (lme4's ``InstEval``): large crossed design.

    73,421 ratings ``y`` (1-5) of lecturers ``d`` (1,128) by students ``s`` (2,972),
    with the lecturer's department ``dept`` (14), ``service`` (lecture held for another
    department), ``studage`` and ``lectage``.

    Examples
    --------
    >>> from skmixed.datasets import load_insteval
    >>> load_insteval().shape
    (73421, 7)
    """
    return _read("insteval", ["s", "d", "studage", "lectage", "service", "dept"])
