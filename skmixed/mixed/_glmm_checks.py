"""Input checks shared by the mixed models: groups, factor codes, weights, vectors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.utils.validation import _check_sample_weight

from .._inputs import is_anndata


def _is_count_matrix(y) -> bool:
    """Several responses: a sparse matrix, AnnData, or a 2-D array with > 1 column."""
    if sp.issparse(y) or is_anndata(y):
        return True
    if isinstance(y, (list, tuple)):
        y = np.asarray(y)
    shape = getattr(y, "shape", None)  # array-likes without a shape are single responses
    return shape is not None and len(shape) == 2 and shape[1] > 1


def _as_2d_groups(groups, n):
    """Groups as a list of (name, values) columns."""
    if isinstance(groups, pd.Series):
        return [(str(groups.name) if groups.name is not None else "group", groups.to_numpy())]
    if isinstance(groups, pd.DataFrame):
        return [(str(c), groups[c].to_numpy()) for c in groups.columns]
    arr = np.asarray(groups, dtype=object)
    if arr.ndim == 1:
        return [("group", arr)]
    if arr.ndim == 2:
        return [(f"group{j}" if arr.shape[1] > 1 else "group", arr[:, j]) for j in range(arr.shape[1])]
    raise ValueError(f"groups must be 1-D or 2-D, got an array with {arr.ndim} dimensions.")


def _factor_codes(name, values, n):
    """Integer codes and sorted string levels of one grouping factor, validated."""
    if values.shape[0] != n:
        raise ValueError(f"groups has {values.shape[0]} rows but X has {n}.")
    codes, levels = pd.factorize(values, sort=True)
    if np.any(codes < 0):
        raise ValueError(f"groups column {name!r} contains missing values.")
    if len(levels) < 2:
        raise ValueError(
            f"groups column {name!r} has a single level ({levels[0]!r}); a variance "
            "cannot be estimated from one group."
        )
    return codes.astype(np.int64), [str(v) for v in levels]


def _check_weights(sample_weight, X):
    if sample_weight is None:
        return None
    sample_weight = _check_sample_weight(sample_weight, X, dtype=np.float64)
    if np.any(sample_weight < 0):
        raise ValueError("sample_weight must be non-negative.")
    return sample_weight


def _check_vector(values, n, name):
    if values is None:
        return None
    try:
        v = np.asarray(values, dtype=float).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric values, one per row of X; got {type(values).__name__}.") from exc
    if v.shape[0] != n:
        raise ValueError(f"{name} has {v.shape[0]} entries but X has {n} rows.")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite; found {v[~np.isfinite(v)][0]!r}.")
    return v
