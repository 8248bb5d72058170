"""Simulated single-cell CRISPR screens with known truth, for the resampling tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import brentq
from scipy.special import expit, logit

# values (cells x perturbations or genes) drawn at a time
_BLOCK = 2**22


def make_perturbation_screen(
    n_cells=2000,
    n_genes=50,
    n_perturbations=20,
    *,
    treated_fraction=0.05,
    size=2.0,
    effects=None,
    confounding=1.0,
    random_state=None,
):
    """A screen: counts, technical covariates and treatment indicators.

    Each cell has a log library size ``log_lib`` (normal around log 1e4) and a batch
    (0/1). Gene ``g`` has counts ``NB(mu, size)`` with
    ``log mu = a_g + log_lib - log 1e4 + c_g * batch (+ effect if treated)``; ``a_g``
    spreads the mean expression over 0.05 to 20 counts per cell. Perturbation ``p``
    is present in a cell with probability ``expit(b_p + confounding * (log_lib - log 1e4
    + batch / 2))``, so treatment and expression share the covariates (the confounding
    that conditional resampling corrects for) and are otherwise independent. The
    perturbation intercepts ``b_p`` scatter (SD 0.2) around a common value chosen so that
    the probability averaged over the simulated cells and perturbations is
    ``treated_fraction``.

    Parameters
    ----------
    n_cells, n_genes, n_perturbations : int
    treated_fraction : float
        Probability of treatment averaged over cells and perturbations (each
        perturbation's own mean varies around it with its intercept).
    size : float
        NB size of every gene.
    effects : dict mapping (gene, perturbation) -> log fold change, optional
        Planted effects; every other pair is null.
    confounding : float
        Strength of the covariates' effect on treatment.
    random_state : int or numpy Generator

    Returns
    -------
    counts : DataFrame of shape (n_cells, n_genes)
    treatment : DataFrame of bool, shape (n_cells, n_perturbations)
    covariates : DataFrame with columns log_lib, batch
    truth : DataFrame with columns gene, perturbation, effect (the planted pairs)
    """
    rng = np.random.default_rng(random_state)
    log_lib = rng.normal(np.log(1e4), 0.4, n_cells)
    batch = (rng.uniform(size=n_cells) < 0.4).astype(float)
    z = log_lib - np.log(1e4) + 0.5 * batch
    if not 0.0 < treated_fraction < 1.0:
        raise ValueError(f"treated_fraction must lie in (0, 1), got {treated_fraction!r}")
    scatter = rng.normal(0, 0.2, n_perturbations)
    # the common intercept at which the probability averaged over cells and perturbations
    # is treated_fraction (a plain logit overshoots: expit is convex at small
    # probabilities and the covariates and the scatter spread it); the cells' z enter
    # through a fine histogram (midpoint rule, error far below the sampling error)
    counts_z, edges = np.histogram(z, bins=512)
    mid = 0.5 * (edges[1:] + edges[:-1])
    w = counts_z / counts_z.sum()

    def excess(b0):
        return float(w @ expit(b0 + scatter[None, :] + confounding * mid[:, None]).mean(axis=1)) - treated_fraction

    logit0 = brentq(excess, logit(treated_fraction) - 20.0, logit(treated_fraction) + 20.0, xtol=1e-10)
    b = logit0 + scatter
    # drawn by blocks of cells: a generator fills an array in C order, so consecutive
    # row blocks are the draws of one (cells x perturbations) call, without holding its
    # probabilities and uniforms (two 10 GB arrays for a Gasperini-size screen)
    rows = max(1, _BLOCK // max(n_perturbations, n_genes, 1))
    T = np.empty((n_cells, n_perturbations), bool)
    for s in range(0, n_cells, rows):
        pi = 1.0 / (1.0 + np.exp(-(b[None, :] + confounding * z[s : s + rows, None])))
        T[s : s + rows] = rng.uniform(size=pi.shape) < pi
    a = np.log(rng.uniform(0.05, 20.0, n_genes))
    c = rng.normal(0, 0.3, n_genes)
    planted = {}
    for (g, p), effect in (effects or {}).items():
        planted.setdefault(g, []).append((p, effect))
    Y = np.empty((n_cells, n_genes), np.int64)
    for s in range(0, n_cells, rows):
        e = min(s + rows, n_cells)
        eta = a[None, :] + (log_lib[s:e] - np.log(1e4))[:, None] + c[None, :] * batch[s:e, None]
        for g, planted_g in planted.items():
            for p, effect in planted_g:
                eta[T[s:e, p], g] += effect
        mu = np.exp(eta)
        Y[s:e] = rng.negative_binomial(size, size / (size + mu))
    rows = [(f"gene{g}", f"pert{p}", effect) for (g, p), effect in (effects or {}).items()]
    genes = [f"gene{g}" for g in range(n_genes)]
    perts = [f"pert{p}" for p in range(n_perturbations)]
    return (
        pd.DataFrame(Y, columns=genes),
        pd.DataFrame(T, columns=perts),
        pd.DataFrame({"log_lib": log_lib, "batch": batch}),
        pd.DataFrame(rows, columns=["gene", "perturbation", "effect"]),
    )
