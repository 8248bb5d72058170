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
    return align_names(names, fitted, arg=arg)


def align_names(names, fitted, *, arg: str = "Y"):
    """Positions that put the columns named ``names`` in the order of ``fitted`` (None
    when already in it); a different set of names is a ``ValueError`` listing what is
    missing or unexpected."""
    names, fitted = np.asarray(names, dtype=object), np.asarray(fitted, dtype=object)
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


# ------------------------------------------------------------------ AnnData out
_DE_COLUMNS = ("gene", "contrast", "estimate", "std_error", "z", "p_value", "q_value")


def _require_anndata(adata, arg):
    if not is_anndata(adata):
        raise ValueError(f"{arg} must be an AnnData object to store results in; got {type(adata).__name__}.")


def check_obsm_key(adata, key_added, *, arg: str = "Y") -> None:
    """``ValueError`` naming the argument unless ``adata.obsm[key_added]`` can be written."""
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string (an obsm key such as 'X_zinbwave'), got {key_added!r}.")
    if not is_anndata(adata) or not hasattr(adata, "obsm"):
        raise ValueError(
            f"key_added={key_added!r} stores the result in {arg}.obsm, so {arg} must be an AnnData object; "
            f"got {type(adata).__name__}."
        )


def write_obsm(adata, key_added, values, *, arg: str = "Y") -> None:
    """Store a (cells x k) embedding in ``adata.obsm[key_added]``, as scanpy does
    (CuPy values are copied to the host)."""
    check_obsm_key(adata, key_added, arg=arg)
    values = np.asarray(values.get() if hasattr(values, "get") and not isinstance(values, np.ndarray) else values)
    if values.shape[0] != len(adata.obs_names):
        raise ValueError(f"{values.shape[0]} rows to store but {arg} has {len(adata.obs_names)} cells.")
    adata.obsm[key_added] = values


def store_contrast(adata, table, *, key_added: str = "skmixed_de", params=None) -> None:
    """Store a per-gene contrast table in AnnData, as ``scanpy.tl.rank_genes_groups`` does.

    Two entries are written (an existing one under ``key_added`` is replaced):

    - ``adata.uns[key_added]``: scanpy's ``rank_genes_groups`` layout, one field per
      contrast in each record array, genes sorted by p-value (smallest first, NaN
      last): ``names``, ``scores`` (Wald z), ``logfoldchanges`` (``estimate / log(2)``:
      log2, as scanpy reports them), ``pvals``, ``pvals_adj`` (Benjamini-Hochberg
      q-values), and ``params`` (scanpy's ``method``, ``groupby``, ``reference``,
      ``use_raw``, ``corr_method``, updated by ``params``). So
      ``scanpy.get.rank_genes_groups_df(adata, group=contrast, key=key_added)``
      returns the table of one contrast, and ``scanpy.pl.rank_genes_groups(adata,
      key=key_added)`` plots the top genes' z.
    - ``adata.varm[key_added]``: a DataFrame in ``var_names`` order with the columns
      ``"<contrast>|<column>"`` for ``estimate``, ``std_error``, ``z``, ``p_value`` and
      ``q_value`` (NaN for genes absent from the table).

    Both survive ``adata.write_h5ad``.

    Parameters
    ----------
    adata : AnnData
    table : DataFrame
        :meth:`skmixed.PoissonGLMM.contrast`'s output: gene, contrast, estimate,
        std_error, z, p_value, q_value.
    key_added : str, default="skmixed_de"
    params : dict, optional
        Extra entries of ``uns[key_added]["params"]`` (e.g. the formula); str, numbers
        or lists of them.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> from skmixed import store_contrast
    >>> adata = anndata.AnnData(np.ones((3, 2)), var=pd.DataFrame(index=["g1", "g2"]))
    >>> table = pd.DataFrame({"gene": ["g1", "g2"], "contrast": "B vs A", "estimate": [0.1, -2.0],
    ...                       "std_error": [0.5, 0.5], "z": [0.2, -4.0], "p_value": [0.84, 6e-5],
    ...                       "q_value": [0.84, 1.2e-4]})
    >>> store_contrast(adata, table, params={"formula": "~ 0 + group + (1 | patient)"})
    >>> list(adata.uns["skmixed_de"]["names"]["B vs A"])
    ['g2', 'g1']
    >>> adata.varm["skmixed_de"].loc["g2", "B vs A|q_value"]
    np.float64(0.00012)
    """
    _require_anndata(adata, "adata")
    if not isinstance(key_added, str) or not key_added:
        raise ValueError(f"key_added must be a non-empty string, got {key_added!r}.")
    if not isinstance(table, pd.DataFrame) or not set(_DE_COLUMNS) <= set(table.columns):
        missing = sorted(set(_DE_COLUMNS) - set(getattr(table, "columns", [])))
        raise ValueError(f"table must be a contrast table (PoissonGLMM.contrast's output); it lacks {missing}.")
    var = pd.Index(np.asarray(adata.var_names, dtype=object).astype(str))
    genes = table["gene"].astype(str)
    unknown = sorted(set(genes) - set(var))
    if unknown:
        raise ValueError(f"table has genes that are not var_names of adata, e.g. {unknown[:5]}.")
    contrasts = list(dict.fromkeys(table["contrast"].astype(str)))
    slashed = [c for c in contrasts if "/" in c]
    if slashed:  # h5ad stores the names as keys, where '/' is a path separator
        raise ValueError(f"contrast names stored in AnnData cannot contain '/' (h5ad keys): {slashed}; rename them.")
    stats = ["estimate", "std_error", "z", "p_value", "q_value"]
    varm = pd.DataFrame(index=adata.var_names)
    fields = {k: [] for k in ("names", "scores", "logfoldchanges", "pvals", "pvals_adj")}
    for name in contrasts:
        part = table[table["contrast"].astype(str).to_numpy() == name]
        if part["gene"].astype(str).duplicated().any():
            raise ValueError(f"table has several rows for one gene in contrast {name!r}.")
        pos = var.get_indexer(part["gene"].astype(str))
        for col in stats:
            values = np.full(var.size, np.nan)
            values[pos] = part[col].to_numpy(dtype=float)
            varm[f"{name}|{col}"] = values
        order = np.argsort(part["p_value"].to_numpy(dtype=float), kind="stable")  # NaN last
        ranked = part.iloc[order]
        fields["names"].append(ranked["gene"].astype(str).to_numpy(dtype=object))
        fields["scores"].append(ranked["z"].to_numpy(dtype=np.float32))
        fields["logfoldchanges"].append((ranked["estimate"].to_numpy(dtype=float) / np.log(2)).astype(np.float32))
        fields["pvals"].append(ranked["p_value"].to_numpy(dtype=float))
        fields["pvals_adj"].append(ranked["q_value"].to_numpy(dtype=float))
    lengths = {len(a) for a in fields["names"]}
    if len(lengths) > 1:
        raise ValueError("every contrast of table must have the same genes to be stored together.")
    scanpy_params = {  # what scanpy's readers and plots of rank_genes_groups look up
        "method": "skmixed PoissonGLMM Wald", "groupby": "contrast", "reference": "", "use_raw": False,
        "corr_method": "benjamini-hochberg",
    }
    uns = {"params": {**scanpy_params, **{k: v for k, v in (params or {}).items() if v is not None}}}
    for key, arrays in fields.items():
        uns[key] = np.rec.fromarrays(arrays, names=contrasts)
    adata.varm[key_added] = varm
    adata.uns[key_added] = uns
