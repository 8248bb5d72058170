"""Zero-inflated negative binomial counts with known cell types and batches."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils import Bunch, check_random_state


def make_zinb_counts(
    n_cells: int = 1000,
    n_genes: int = 500,
    *,
    n_clusters: int = 5,
    n_batches: int = 2,
    n_latent: int = 3,
    cluster_sep: float = 1.5,
    batch_sd: float = 0.5,
    dispersion: float = 0.5,
    mean_log_mu: float = 0.0,
    sd_log_mu: float = 1.0,
    zero_inflation: float = 0.2,
    sparse: bool = True,
    random_state=None,
):
    """Simulate zinbwave's model with planted cell types (clusters) and batches.

    Cells of cluster ``c`` have latent factors ``W_i = m_c + N(0, 0.3^2 I)`` with cluster
    centres ``m_c ~ N(0, cluster_sep^2 I)`` in ``n_latent`` dimensions. Then

    - ``log mu_ij = beta_j + batch_j[b_i] + W_i alpha_j + log s_i`` with gene baselines
      ``beta_j ~ N(mean_log_mu, sd_log_mu^2)``, batch effects ``batch_j[b] ~ N(0, batch_sd^2)``
      (per batch and gene), loadings ``alpha_j ~ N(0, I / n_latent)`` and library-size
      factors ``log s_i ~ N(0, 0.3^2)``;
    - ``logit pi_ij = logit(zero_inflation) - 0.5 (log mu_ij - mean)`` (more dropouts
      for lowly expressed genes);
    - ``y_ij ~ pi_ij delta_0 + (1 - pi_ij) NB(mu_ij, size = 1 / dispersion)``.

    Parameters
    ----------
    n_cells, n_genes : int
    n_clusters, n_batches, n_latent : int
        Cell types, batches (assigned at random, independently of the cell types) and
        the dimension of the planted latent space.
    cluster_sep : float
        Standard deviation of the cluster centres (larger: better separated types).
    batch_sd : float
        Standard deviation of the per-gene batch effects on the log mean.
    dispersion : float
        NB dispersion ``1 / theta`` (common to all genes, zinbwave's default model).
    mean_log_mu, sd_log_mu : float
        Mean and SD of the gene baselines on the log scale.
    zero_inflation : float
        Typical dropout probability.
    sparse : bool
        Return ``counts`` as CSR (default) or a dense array.
    random_state : int, RandomState instance or None

    Returns
    -------
    Bunch with ``counts`` (n_cells, n_genes) float64 integers, ``cells`` (a DataFrame with
    ``cluster`` and ``batch``), ``batch_design`` (n_cells, n_batches) an intercept plus
    batch indicators for ``cell_covariates``, and the truth: ``W``, ``mu``, ``pi``,
    ``theta``, ``nb_counts`` (the counts before dropouts).

    Examples
    --------
    >>> from skmixed.datasets import make_zinb_counts
    >>> sim = make_zinb_counts(200, 100, random_state=0)
    >>> sim.counts.shape, sorted(sim.cells.columns)
    ((200, 100), ['batch', 'cluster'])
    """
    rng = check_random_state(random_state)
    cluster = rng.randint(n_clusters, size=n_cells)
    batch = rng.randint(n_batches, size=n_cells)
    centres = rng.normal(0.0, cluster_sep, size=(n_clusters, n_latent))
    W = centres[cluster] + rng.normal(0.0, 0.3, size=(n_cells, n_latent))
    alpha = rng.normal(0.0, 1.0 / np.sqrt(n_latent), size=(n_latent, n_genes))
    beta = rng.normal(mean_log_mu, sd_log_mu, size=n_genes)
    batch_eff = rng.normal(0.0, batch_sd, size=(n_batches, n_genes))
    log_s = rng.normal(0.0, 0.3, size=n_cells)
    log_mu = beta[None, :] + batch_eff[batch] + W @ alpha + log_s[:, None]
    logit_pi = np.log(zero_inflation / (1 - zero_inflation)) - 0.5 * (log_mu - log_mu.mean())
    mu = np.exp(log_mu)
    pi = 1.0 / (1.0 + np.exp(-logit_pi))
    theta = 1.0 / dispersion
    nb = rng.negative_binomial(theta, theta / (theta + mu)).astype(float)
    drop = rng.uniform(size=nb.shape) < pi
    counts = np.where(drop, 0.0, nb)
    design = np.zeros((n_cells, n_batches))
    design[:, 0] = 1.0
    if n_batches > 1:
        design[np.arange(n_cells), batch] = np.where(batch > 0, 1.0, design[np.arange(n_cells), batch])
    cells = pd.DataFrame({"cluster": cluster, "batch": batch})
    return Bunch(
        counts=sp.csr_matrix(counts) if sparse else counts,
        cells=cells,
        batch_design=design,
        W=W, mu=mu, pi=pi, theta=theta, nb_counts=nb,
    )
