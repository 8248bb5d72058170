"""Poisson GLMM simulators with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state


def make_poisson_glmm(
    n_groups: int = 30,
    n_per_group: int = 40,
    *,
    beta=(0.5, 0.3, -0.2),
    sd_intercept: float = 0.6,
    sd_slope: float = 0.0,
    corr: float = 0.0,
    n_crossed: int = 0,
    sd_crossed: float = 0.4,
    random_state=None,
):
    """Simulate a Poisson GLMM with a random intercept, an optional random slope and
    an optional second, crossed grouping factor.

    The model is ``y ~ Poisson(exp(beta_0 + x_1 beta_1 + ... + b_0[g] + x_1 b_1[g]
    + c[h] + offset))`` with ``(b_0, b_1)[g] ~ N(0, Sigma)``, ``Sigma`` built from
    ``sd_intercept``, ``sd_slope`` and ``corr``, and ``c[h] ~ N(0, sd_crossed**2)``.

    Parameters
    ----------
    n_groups, n_per_group : int
        Levels of the grouping factor ``g`` and observations per level.
    beta : sequence of float
        Intercept then one coefficient per covariate ``x1, x2, ...`` (standard normal).
    sd_intercept, sd_slope, corr : float
        Random intercept and random slope (on ``x1``) standard deviations and their
        correlation. ``sd_slope = 0`` gives a random-intercept model.
    n_crossed : int
        Levels of a second grouping factor ``h`` crossed with ``g`` (0 for none).
    sd_crossed : float
        Standard deviation of the ``h`` intercepts.
    random_state : int, RandomState instance or None

    Returns
    -------
    data : DataFrame
        Columns ``x1, ...``, ``g``, (``h``), ``offset`` (log exposure) and ``y``.
    truth : dict
        ``beta``, ``b`` (array ``(n_groups, 2)``), ``Sigma`` (2 x 2), ``c`` and
        ``sd_crossed``.
    """
    rng = check_random_state(random_state)
    beta = np.asarray(beta, dtype=float)
    if beta.ndim != 1 or beta.size < 1:
        raise ValueError(f"beta must be a non-empty 1-D sequence, got {beta!r}.")
    if n_groups < 2 or n_per_group < 1:
        raise ValueError(f"need n_groups >= 2 and n_per_group >= 1, got {n_groups}, {n_per_group}.")
    n = n_groups * n_per_group
    p = beta.size - 1
    x = rng.standard_normal((n, p))
    g = np.repeat(np.arange(n_groups), n_per_group)
    sigma = np.array(
        [
            [sd_intercept**2, corr * sd_intercept * sd_slope],
            [corr * sd_intercept * sd_slope, sd_slope**2],
        ]
    )
    b = rng.multivariate_normal(np.zeros(2), sigma, size=n_groups)
    offset = rng.normal(0.0, 0.3, size=n)
    eta = beta[0] + x @ beta[1:] + b[g, 0] + offset
    if p >= 1:
        eta += x[:, 0] * b[g, 1]
    data = {f"x{j + 1}": x[:, j] for j in range(p)}
    data["g"] = np.char.add("g", g.astype(str))
    c = np.zeros(0)
    if n_crossed:
        h = rng.randint(0, n_crossed, size=n)
        c = rng.normal(0.0, sd_crossed, size=n_crossed)
        eta += c[h]
        data["h"] = np.char.add("h", h.astype(str))
    data["offset"] = offset
    data["y"] = rng.poisson(np.exp(eta))
    truth = {"beta": beta, "b": b, "Sigma": sigma, "c": c, "sd_crossed": sd_crossed}
    return pd.DataFrame(data), truth
