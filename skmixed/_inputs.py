"""The one place that reads users' count containers.

AnnData objects (duck-typed: anndata need not be installed), DataFrames and
array-likes become the matrix the numerical core wants, with the gene names kept and
checked. One rule for every estimator that takes AnnData:

- ``layer=None`` reads the ``"counts"`` layer when there is one, else ``.X`` (zinbwave
  reads ``assay(se, "counts")``; scanpy keeps raw counts in ``layers["counts"]`` once
  ``.X`` is normalised); ``layer="name"`` reads that layer.
- The values read from an AnnData object must be counts: non-integer values (``.X``
  after ``normalize_total`` + ``log1p``) are an error naming where they were read.
- Gene names (``var_names``, DataFrame columns) must be unique; an estimator fitted on
  named genes matches later inputs by name (:func:`match_names`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


def is_anndata(obj) -> bool:
    """True for AnnData-like objects (``.X``, ``.var_names`` and ``.obs_names``)."""
    return all(hasattr(obj, a) for a in ("X", "var_names", "obs_names"))


def _in_memory(M):
    """A backed AnnData matrix (h5py dataset or backed sparse dataset) read into memory."""
    if hasattr(M, "to_memory"):
        return M.to_memory()
    if type(M).__module__.split(".")[0] == "h5py":
        return M[()]
    return M


@dataclass
class CountSource:
    """A count matrix as read from the user's container."""

    values: object  # ndarray, sparse matrix, DataFrame or CuPy array
    names: np.ndarray | None  # gene names (object array of str), None when unnamed
    where: str  # what to call the values in messages: "adata.X", "y", ...
    anndata: bool


def unique_names(values, arg: str) -> np.ndarray:
    """Gene names as an object array of str; ``ValueError`` naming a duplicate."""
    names = np.asarray([str(v) for v in values], dtype=object)
    dup = pd.Index(names).duplicated()
    if dup.any():
        raise ValueError(
            f"{arg} has duplicate gene names ({int(dup.sum())} duplicated, first {names[dup][0]!r}); "
            "results are reported per gene name, so make them unique first "
            "(AnnData: adata.var_names_make_unique())."
        )
    return names


def count_source(Y, *, layer=None, arg: str = "y") -> CountSource:
    """Read the count matrix of ``Y`` (AnnData, DataFrame or array-like).

    Parameters
    ----------
    Y : AnnData, DataFrame, array-like or sparse matrix (cells x genes)
    layer : str or None
        AnnData layer to read; None: ``layers["counts"]`` if present, else ``.X``.
    arg : str
        The argument's name, for messages.
    """
    if is_anndata(Y):
        layers = getattr(Y, "layers", None)
        keys = list(layers.keys()) if layers is not None else []
        if layer is not None:
            if layer not in keys:
                raise ValueError(f"layer={layer!r} is not a layer of the AnnData {arg}; its layers are {keys}.")
            M, where = layers[layer], f"{arg}.layers[{layer!r}]"
        elif "counts" in keys:
            M, where = layers["counts"], f"{arg}.layers['counts']"
        else:
            M, where = Y.X, f"{arg}.X"
        if M is None:
            raise ValueError(f"{where} is empty (None); pass the layer that holds the raw counts with layer=.")
        return CountSource(_in_memory(M), unique_names(Y.var_names, f"{arg}.var_names"), where, True)
    if layer is not None:
        raise ValueError(f"layer={layer!r} applies to AnnData input only; {arg} is a {type(Y).__name__}.")
    if isinstance(Y, pd.DataFrame):
        return CountSource(Y, unique_names(Y.columns, f"the columns of {arg}"), arg, False)
    return CountSource(Y, None, arg, False)


def require_counts(src: CountSource, integer: bool) -> None:
    """Non-integer values read from AnnData are an error naming where they were read.

    (Other inputs keep each estimator's own rule: a warning where the likelihood
    extends to non-integers.)
    """
    if src.anndata and not integer:
        raise ValueError(
            f"{src.where} holds non-integer values, not raw counts (e.g. after "
            "sc.pp.normalize_total and sc.pp.log1p). Pass the layer with the raw counts, "
            "e.g. layer='counts' after adata.layers['counts'] = adata.X.copy() before normalising."
        )


def match_names(est, names, *, reset: bool, arg: str = "Y"):
    """Record (``reset``) or check gene names against ``est.feature_names_in_``.

    Returns None when the columns are already in the fitted order, else the column
    positions that put them in that order (same set of names, another order). A
    different set of names is a ``ValueError`` listing what is missing or unexpected.
    """
    if names is None:
        return None
    if reset:
        est.feature_names_in_ = np.asarray(names, dtype=object)
        return None
    fitted = getattr(est, "feature_names_in_", None)
    if fitted is None:
        return None
    names = np.asarray(names, dtype=object)
    if names.shape == fitted.shape and np.array_equal(names, fitted):
        return None
    order = pd.Index(names).get_indexer(fitted)
    if names.size != fitted.size or np.any(order < 0):
        missing = [str(v) for v in fitted[order < 0][:5]]
        unexpected = [str(v) for v in pd.Index(names).difference(pd.Index(fitted))[:5]]
        raise ValueError(
            f"The gene names of {arg} differ from those seen at fit ({fitted.size} genes): "
            f"missing {missing}, unexpected {unexpected} (at most 5 of each shown)."
        )
    return order
