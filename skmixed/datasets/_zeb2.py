"""A simulated data set with the structure of Boland et al. (2020)'s ZEB2 analysis."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pandas as pd
from sklearn.utils import check_random_state

CELL_TYPES = ("B", "M/DC", "NK", "T", "unknown")
TISSUES = ("PBMC", "R")
DISEASE = ("diseased", "healthy")
HEALTHY_PATIENTS = tuple(f"C{i}" for i in range(1, 10))
DISEASED_PATIENTS = tuple(f"U{i}" for i in range(1, 8))

# Share of each cell type among a patient's cells (T cells dominate, as in the atlas).
_TYPE_SHARE = {"B": 0.14, "M/DC": 0.10, "NK": 0.09, "T": 0.55, "unknown": 0.12}


def load_zeb2_truth() -> pd.DataFrame:
    """lme4's published estimates for the ZEB2 model, used as the simulation truth.

    Returns
    -------
    truth : DataFrame
        Columns ``kind`` (``"fixed"``, ``"patient"`` or ``"sd_patient"``), ``name``,
        ``value`` and ``lme4_se`` (the standard error lme4 reported for the
        cell-group means on the real data).
    """
    path = resources.files("skmixed.datasets") / "data" / "zeb2_truth.csv"
    with resources.as_file(path) as p:
        return pd.read_csv(p)


def make_zeb2_like(n_cells: int = 68_627, *, random_state=0, return_truth: bool = False):
    """Simulate ZEB2 counts with the structure of the seed analysis.

    Cells come from 16 patients (``C1``-``C9`` healthy, ``U1``-``U7`` with ulcerative
    colitis), two tissues (blood ``PBMC`` and rectum ``R``) and five cell types, giving
    20 cell groups ``"<type> : <tissue> : <disease>"``. Counts follow the model of the
    seed, ``ZEB2 ~ Poisson(exp(mu[cell_group] + b[patient]) * total_count)``, with
    ``mu`` and ``b`` set to lme4's published estimates on the real data.

    Parameters
    ----------
    n_cells : int, default=68627
        Number of cells (the real data set has 68,627).
    random_state : int, RandomState instance or None, default=0
        Seed of the simulation.
    return_truth : bool, default=False
        Also return the parameters used to simulate.

    Returns
    -------
    data : DataFrame
        One row per cell: ``cell_group`` (categorical), ``cell_type``, ``tissue``,
        ``disease``, ``patient_assignment``, ``total_count`` and ``ZEB2``.
    truth : dict
        Only when ``return_truth``: ``"fixed"`` (Series indexed by cell group),
        ``"patient"`` (Series indexed by patient) and ``"sd_patient"`` (float).

    Examples
    --------
    >>> from skmixed.datasets import make_zeb2_like
    >>> data = make_zeb2_like(2000, random_state=1)
    >>> data.shape
    (2000, 7)
    """
    n_cells = int(n_cells)
    if n_cells < 16:
        raise ValueError(f"n_cells must be at least 16 (one per patient), got {n_cells}.")
    rng = check_random_state(random_state)
    truth_table = load_zeb2_truth()
    fixed = truth_table.loc[truth_table.kind == "fixed"].set_index("name")["value"]
    patient = truth_table.loc[truth_table.kind == "patient"].set_index("name")["value"]
    sd_patient = float(truth_table.loc[truth_table.kind == "sd_patient", "value"].iloc[0])

    patients = np.array(HEALTHY_PATIENTS + DISEASED_PATIENTS)
    # Unequal numbers of cells per patient, every patient present.
    share = rng.dirichlet(np.full(patients.size, 8.0))
    n_per_patient = 1 + rng.multinomial(n_cells - patients.size, share)
    pat = np.repeat(patients, n_per_patient)
    disease = np.where(np.char.startswith(pat, "U"), "diseased", "healthy")
    type_p = np.array([_TYPE_SHARE[t] for t in CELL_TYPES])
    ctype = np.asarray(CELL_TYPES)[rng.choice(len(CELL_TYPES), size=n_cells, p=type_p)]
    tissue = np.asarray(TISSUES)[rng.randint(0, 2, size=n_cells)]
    group = np.char.add(np.char.add(np.char.add(np.char.add(ctype, " : "), tissue), " : "), disease)
    # Sequencing depth: log-normal around 4,000 UMIs per cell.
    total_count = np.round(np.exp(rng.normal(np.log(4000.0), 0.6, size=n_cells))).astype(np.int64)
    total_count = np.maximum(total_count, 200)
    eta = fixed.loc[group].to_numpy() + patient.loc[pat].to_numpy() + np.log(total_count)
    zeb2 = rng.poisson(np.exp(eta))

    levels = sorted(fixed.index)
    data = pd.DataFrame(
        {
            "cell_group": pd.Categorical(group, categories=levels),
            "cell_type": ctype,
            "tissue": tissue,
            "disease": disease,
            "patient_assignment": pat,
            "total_count": total_count,
            "ZEB2": zeb2.astype(np.int64),
        }
    )
    if return_truth:
        return data, {"fixed": fixed, "patient": patient, "sd_patient": sd_patient}
    return data


def load_zeb2_like() -> pd.DataFrame:
    """The bundled ZEB2-like data set: ``make_zeb2_like(random_state=0)``, frozen.

    The file is kept so that reference values computed by lme4 on it stay valid
    whatever future versions of numpy do to random streams.

    Returns
    -------
    data : DataFrame
        68,627 rows, the columns of :func:`make_zeb2_like`.
    """
    path = resources.files("skmixed.datasets") / "data" / "zeb2_like.csv.gz"
    with resources.as_file(path) as p:
        data = pd.read_csv(p)
    levels = sorted(data["cell_group"].unique())
    data["cell_group"] = pd.Categorical(data["cell_group"], categories=levels)
    return data


def make_boland_like_counts(
    n_genes: int = 2000,
    n_cells: int = 68_627,
    *,
    frac_de: float = 0.1,
    de_sd: float = 1.0,
    mean_log_rate: float = -11.2,
    random_state=0,
):
    """Whole-transcriptome counts with the cell structure of :func:`make_zeb2_like`.

    Every gene ``g`` follows ``Poisson(exp(mu_g + d_g[cell_group] + b_g[patient]) *
    total_count)``: a baseline ``mu_g`` (mean -11.2, SD 1 on the log scale per UMI,
    about 10% non-zero entries overall), cell-group deviations ``d_g ~ N(0, 0.3^2)``,
    patient effects ``b_g ~ N(0, 0.2^2)``. In a fraction ``frac_de`` of the genes the
    rectal T cells of patients with colitis get an extra log fold change
    ``N(0, de_sd^2)`` over healthy ones: the planted differential expression.

    Parameters
    ----------
    n_genes, n_cells : int
    frac_de : float
        Fraction of genes with a planted effect.
    de_sd : float
        Standard deviation of the planted log fold changes.
    mean_log_rate : float, default=-11.2
        Mean of the genes' baselines ``mu_g`` (log rate per UMI): -11.2 gives about 10%
        non-zero entries, -10.2 about 19%.
    random_state : int, RandomState instance or None

    Returns
    -------
    cells : DataFrame
        The cell table of :func:`make_zeb2_like` (without ``ZEB2``).
    counts : scipy.sparse.csc_matrix of shape (n_cells, n_genes)
    truth : DataFrame
        Per gene: ``gene``, ``de`` (bool) and ``log_fold_change`` (T cells in rectum,
        diseased minus healthy; 0 for the others).
    """
    import scipy.sparse as sp  # noqa: PLC0415

    rng = check_random_state(random_state)
    cells = make_zeb2_like(n_cells, random_state=rng).drop(columns="ZEB2")
    groups = list(cells["cell_group"].cat.categories)
    g_codes = cells["cell_group"].cat.codes.to_numpy()
    p_codes, _ = pd.factorize(cells["patient_assignment"], sort=True)
    log_depth = np.log(cells["total_count"].to_numpy())
    target = groups.index("T : R : diseased")
    de = rng.uniform(size=n_genes) < frac_de
    lfc = np.where(de, rng.normal(0.0, de_sd, n_genes), 0.0)
    cols = []
    for g in range(n_genes):
        d = rng.normal(0.0, 0.3, len(groups))
        d[target] = d[groups.index("T : R : healthy")] + lfc[g]
        b = rng.normal(0.0, 0.2, p_codes.max() + 1)
        y = rng.poisson(np.exp(rng.normal(mean_log_rate, 1.0) + d[g_codes] + b[p_codes] + log_depth))
        nz = np.flatnonzero(y)
        cols.append((nz, y[nz]))
    indptr = np.cumsum([0] + [len(nz) for nz, _ in cols])
    counts = sp.csc_matrix(
        (np.concatenate([v for _, v in cols]).astype(float), np.concatenate([nz for nz, _ in cols]), indptr),
        shape=(n_cells, n_genes),
    )
    names = [f"gene{g:05d}" for g in range(n_genes)]
    truth = pd.DataFrame({"gene": names, "de": de, "log_fold_change": lfc})
    return cells, counts, truth
