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


def make_multipatient_counts(
    n_genes: int = 2000,
    n_cells: int = 20_000,
    *,
    sd_patient=0.2,
    noise: str = "poisson",
    size: float = 5.0,
    frac_de: float = 0.1,
    frac_de_within: float = 0.0,
    de_sd: float = 1.0,
    mean_log_rate: float = -11.2,
    random_state=0,
):
    """Null and planted differential expression on the 16-patient Boland-like design,
    with a known patient SD and Poisson or negative binomial cell noise.

    Cells are those of :func:`skmixed.datasets.make_zeb2_like` (16 patients, 7 with
    colitis; 20 cell groups ``"<type> : <tissue> : <disease>"``). Gene ``g`` has rate
    ``exp(mu_g + d_g[cell_group] + b_g[patient]) * total_count`` with ``mu_g ~
    N(mean_log_rate, 1)``, ``d_g ~ N(0, 0.3^2)`` and ``b_g ~ N(0, sd_patient_g^2)``;
    the count is Poisson with that rate (``noise="poisson"``) or negative binomial
    with variance ``mu + mu^2 / size`` (``noise="nb"``, a Gamma-Poisson per cell).

    Two contrasts are null unless planted:

    * between patients, ``"T : R : diseased" - "T : R : healthy"`` (disease is a
      patient-level factor): equal cell-group effects, plus ``N(0, de_sd^2)`` in a
      fraction ``frac_de`` of the genes;
    * within patients, ``"T : R : healthy" - "T : PBMC : healthy"`` (the same healthy
      patients' rectal and blood T cells): equal effects, plus ``N(0, de_sd^2)`` in a
      fraction ``frac_de_within``.

    Parameters
    ----------
    n_genes, n_cells : int
    sd_patient : float or array of shape (n_genes,)
        Standard deviation of the patient effects on the log scale.
    noise : {"poisson", "nb"}
    size : float
        Negative binomial size (``noise="nb"``).
    frac_de, frac_de_within, de_sd : float
    mean_log_rate : float
        Mean log rate per UMI of the genes (-11.2: about 10% non-zero counts).
    random_state : int, RandomState instance or None

    Returns
    -------
    cells : DataFrame
        The cell table of :func:`~skmixed.datasets.make_zeb2_like` without ``ZEB2``.
    counts : scipy.sparse.csc_matrix of shape (n_cells, n_genes)
    truth : DataFrame
        Per gene: ``gene``, ``sd_patient``, ``de`` and ``log_fold_change`` (between),
        ``de_within`` and ``log_fold_change_within``.

    Examples
    --------
    >>> from skmixed.datasets import make_multipatient_counts
    >>> cells, counts, truth = make_multipatient_counts(50, 2000, noise="nb", random_state=0)
    >>> counts.shape, cells.patient_assignment.nunique()
    ((2000, 50), 16)
    """
    import scipy.sparse as sp  # noqa: PLC0415

    from ._zeb2 import make_zeb2_like  # noqa: PLC0415

    if noise not in ("poisson", "nb"):
        raise ValueError(f"noise must be 'poisson' or 'nb', got {noise!r}.")
    if not size > 0:
        raise ValueError(f"size must be positive, got {size!r}.")
    for name, frac in (("frac_de", frac_de), ("frac_de_within", frac_de_within)):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac!r}.")
    sd = np.broadcast_to(np.asarray(sd_patient, dtype=float), (int(n_genes),))
    if np.any(sd < 0) or not np.all(np.isfinite(sd)):
        raise ValueError("sd_patient must be finite and non-negative.")
    rng = check_random_state(random_state)
    cells = make_zeb2_like(n_cells, random_state=rng).drop(columns="ZEB2")
    groups = list(cells["cell_group"].cat.categories)
    g_codes = cells["cell_group"].cat.codes.to_numpy()
    p_codes, patients = pd.factorize(cells["patient_assignment"], sort=True)
    log_depth = np.log(cells["total_count"].to_numpy(dtype=float))
    t_rd, t_rh, t_ph = (groups.index(k) for k in ("T : R : diseased", "T : R : healthy", "T : PBMC : healthy"))
    de = rng.uniform(size=n_genes) < frac_de
    de_w = rng.uniform(size=n_genes) < frac_de_within
    lfc = np.where(de, rng.normal(0.0, de_sd, n_genes), 0.0)
    lfc_w = np.where(de_w, rng.normal(0.0, de_sd, n_genes), 0.0)
    D = rng.normal(0.0, 0.3, (n_genes, len(groups)))
    D[:, t_ph] = D[:, t_rh] - lfc_w
    D[:, t_rd] = D[:, t_rh] + lfc
    B = rng.normal(0.0, 1.0, (n_genes, patients.size)) * sd[:, None]
    mu0 = rng.normal(mean_log_rate, 1.0, n_genes)
    data, rows, indptr = [], [], [0]
    for start in range(0, n_genes, 256):  # (cells x 256) rates at a time
        sl = slice(start, min(start + 256, n_genes))
        rate = np.exp(mu0[None, sl] + D[sl].T[g_codes] + B[sl].T[p_codes] + log_depth[:, None])
        if noise == "nb":
            rate = rate * rng.gamma(size, 1.0 / size, rate.shape)
        y = rng.poisson(rate)
        for col in y.T:
            nz = np.flatnonzero(col)
            rows.append(nz)
            data.append(col[nz])
            indptr.append(indptr[-1] + nz.size)
    counts = sp.csc_matrix(
        (np.concatenate(data).astype(float), np.concatenate(rows), np.asarray(indptr)), shape=(n_cells, n_genes)
    )
    names = [f"gene{g:05d}" for g in range(n_genes)]
    truth = pd.DataFrame({"gene": names, "sd_patient": sd, "de": de, "log_fold_change": lfc,
                          "de_within": de_w, "log_fold_change_within": lfc_w})
    return cells, counts, truth
