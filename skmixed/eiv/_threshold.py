"""The thresholding estimator GLM-EIV is compared with: call a cell perturbed when its gRNA
count is at least ``threshold``, then regress the mRNA on the call (a GLM)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from .._families import NegativeBinomial, Poisson
from ..glm._newton import fit_glm


def thresholding_estimator(X, y, grna, *, threshold, offset=None, family="poisson", size=None):
    """``m_perturbation`` by thresholding: ``p_hat = grna >= threshold``, then the GLM
    ``y ~ 1 + p_hat + X (+ offset)``, for every column pair ``(y[:, j], grna[:, j])``.

    Misclassified cells attenuate the estimate towards 0 (Barry, Roeder and Katsevich, 2024).

    Parameters
    ----------
    X : array-like of shape (n, d)
    y, grna : array-like of shape (n,) or (n, B)
    threshold : float
    offset : array-like of shape (n,) or None
    family : {"poisson", "negative_binomial"}
    size : float, needed for ``"negative_binomial"``

    Returns
    -------
    ndarray of shape (B,)
        The estimated perturbation coefficients (NaN where no cell, or every cell, passes).

    Examples
    --------
    >>> from skmixed.eiv import make_glmeiv_data, thresholding_estimator
    >>> X, m, g, off, p = make_glmeiv_data(5000, 1, pi=0.1, random_state=0)
    >>> est = thresholding_estimator(X, m, g, threshold=50, offset=off["mrna"])
    >>> round(float(est[0]), 1)
    -1.4
    """
    Xa = np.asarray(X, dtype=float)
    Y = np.asarray(y, dtype=float)
    Gr = np.asarray(grna, dtype=float)
    Y = Y[:, None] if Y.ndim == 1 else Y
    Gr = Gr[:, None] if Gr.ndim == 1 else Gr
    n = Y.shape[0]
    o = np.zeros(n) if offset is None else np.asarray(pd.Series(offset) if not isinstance(offset, np.ndarray) else offset, dtype=float)
    fam = Poisson() if family == "poisson" else NegativeBinomial(size)
    out = np.full(Y.shape[1], np.nan)
    for j in range(Y.shape[1]):
        p = (Gr[:, j] >= threshold).astype(float)
        if p.sum() == 0 or p.sum() == n:
            continue
        D = np.column_stack([np.ones(n), p, Xa])
        out[j] = fit_glm(D, Y[:, j], fam, offset=o).coef[0, 1]
    return out
