"""Simulated GLM-EIV data (the setting of Barry, Roeder and Katsevich, 2024) with known truth."""

from __future__ import annotations

import numpy as np
import pandas as pd


def make_glmeiv_data(
    n_cells=50_000,
    n_pairs=1,
    *,
    pi=0.02,
    m_intercept=np.log(0.01),
    m_perturbation=np.log(0.25),
    g_intercept=np.log(0.005),
    g_perturbation=np.log(4.0),
    m_batch=np.log(0.9),
    g_batch=np.log(1.1),
    mrna_size=None,
    grna_size=None,
    mrna_library=10_000,
    grna_library=5_000,
    random_state=None,
):
    """Cells of a CRISPR screen drawn from the GLM-EIV model.

    Every cell ``i`` gets a batch ``b_i ~ Bernoulli(1/2)``, an mRNA library size
    ``L^m_i ~ Poisson(mrna_library)`` and a gRNA library size ``L^g_i ~ Poisson(grna_library)``.
    For each pair ``j``, ``p_ij ~ Bernoulli(pi)`` and

    - ``m_ij ~ F_m(exp(m_intercept + m_perturbation p_ij + m_batch b_i + log L^m_i))``,
    - ``g_ij ~ F_g(exp(g_intercept + g_perturbation p_ij + g_batch b_i + log L^g_i))``,

    with ``F`` Poisson when the size is None and negative binomial with that size otherwise.

    Parameters
    ----------
    n_cells, n_pairs : int
    pi, m_intercept, m_perturbation, g_intercept, g_perturbation, m_batch, g_batch : float
        The parameters (natural-log scale for the coefficients); ``g_perturbation`` may be
        an array of length ``n_pairs``.
    mrna_size, grna_size : float or None
    mrna_library, grna_library : float
        Means of the Poisson library sizes.
    random_state : int or numpy Generator

    Returns
    -------
    covariates : DataFrame with the column ``batch``
    mrna, grna : arrays of shape (n_cells, n_pairs) of counts
    offsets : DataFrame with columns ``mrna`` and ``grna`` (log library sizes)
    perturbed : array of bool, shape (n_cells, n_pairs): the latent indicators

    Examples
    --------
    >>> X, m, g, off, p = make_glmeiv_data(1000, 2, pi=0.1, random_state=0)
    >>> m.shape, g.shape, int(p.sum() > 0)
    ((1000, 2), (1000, 2), 1)
    """
    rng = np.random.default_rng(random_state)
    batch = (rng.uniform(size=n_cells) < 0.5).astype(float)
    lib_m = rng.poisson(mrna_library, n_cells).astype(float)
    lib_g = rng.poisson(grna_library, n_cells).astype(float)
    p = rng.uniform(size=(n_cells, n_pairs)) < pi
    g_pert = np.broadcast_to(np.asarray(g_perturbation, dtype=float), (n_pairs,))

    def draw(eta, size):
        mu = np.exp(eta)
        if size is None:
            return rng.poisson(mu)
        return rng.negative_binomial(size, size / (size + mu))

    eta_m = m_intercept + m_perturbation * p + (m_batch * batch + np.log(lib_m))[:, None]
    eta_g = g_intercept + g_pert[None, :] * p + (g_batch * batch + np.log(lib_g))[:, None]
    m = draw(eta_m, mrna_size)
    g = draw(eta_g, grna_size)
    offsets = pd.DataFrame({"mrna": np.log(lib_m), "grna": np.log(lib_g)})
    return pd.DataFrame({"batch": batch}), m, g, offsets, p
