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

import os
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


def is_dask_array(obj) -> bool:
    """True for a ``dask.array.Array`` (without importing dask)."""
    return type(obj).__module__.split(".")[0] == "dask" and hasattr(obj, "chunks") and hasattr(obj, "compute")


def _is_backed(adata) -> bool:
    """An AnnData opened with ``backed="r"`` whose rows and columns are the file's."""
    return bool(getattr(adata, "isbacked", False)) and not getattr(adata, "is_view", False) and bool(
        getattr(adata, "filename", None))


class MatrixReader:
    """Reads blocks of a (cells x genes) count matrix where it lives, for the
    streaming paths (many-gene fits by chunks of genes, ZINBWaVE by chunks of cells).

    Three homes: in memory (ndarray or sparse matrix), an ``.h5ad`` file (the path and
    the element's key: ``"X"`` or ``"layers/<name>"``), or a ``dask.array``. A reader of
    a file or a dask array is small and picklable: sent to a Dask worker, it reads its
    block there (the file opened on the worker, the dask slice's graph computed there),
    so the whole matrix never passes through the client.

    ``columns(sel)`` and ``rows(sel)`` return the (cells x len(sel)) or (len(sel) x genes)
    block: CSC / CSR for sparse storage, a float ndarray for dense storage. Sparse
    ``.h5ad`` storage reads fast along its major axis (CSC: columns, CSR: rows; scanpy
    writes CSR); the other axis is read by scanning blocks of the major axis, so memory
    stays bounded but every call reads the whole file: store CSC for gene chunks
    (``adata.X = adata.X.tocsc()`` before ``write_h5ad``) and CSR for cell chunks.

    Parameters
    ----------
    kind : {"memory", "h5ad", "dask"}
    data : the array (memory, dask) or the file's path (h5ad)
    key : str, optional
        The element of the h5ad file.
    shape : tuple, optional
    where : str
        What to call the values in messages, e.g. ``"adata.X"``.
    anndata : bool
        Whether the values come from AnnData (non-integer values are then an error).

    Examples
    --------
    >>> import numpy as np
    >>> from skmixed._inputs import MatrixReader
    >>> r = MatrixReader.from_array(np.arange(12.0).reshape(3, 4))
    >>> r.columns(slice(1, 3))
    array([[ 1.,  2.],
           [ 5.,  6.],
           [ 9., 10.]])
    """

    def __init__(self, kind, data, *, key=None, shape=None, where="y", anndata=False):
        if kind not in ("memory", "h5ad", "dask"):
            raise ValueError(f"kind must be 'memory', 'h5ad' or 'dask', got {kind!r}.")
        self.kind, self.data, self.key = kind, data, key
        self.shape = tuple(int(v) for v in (data.shape if shape is None else shape))
        self.where, self.anndata = where, anndata

    @classmethod
    def from_array(cls, A, *, where="y", anndata=False):
        return cls("dask" if is_dask_array(A) else "memory", A, where=where, anndata=anndata)

    @classmethod
    def from_h5ad(cls, path, key="X", *, where="adata.X", anndata=True):
        """A reader of the element ``key`` (``"X"``, ``"layers/counts"``) of an h5ad file."""
        import h5py  # noqa: PLC0415 (h5py comes with anndata)

        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"{path!r} has no element {key!r}.")
            el = f[key]
            shape = tuple(el.attrs["shape"]) if isinstance(el, h5py.Group) else el.shape
        # absolute: a Dask worker may run in another folder (on a shared file system)
        return cls("h5ad", os.path.abspath(path), key=key, shape=shape, where=where, anndata=anndata)

    def __repr__(self):
        home = f"{self.data!r}[{self.key!r}]" if self.kind == "h5ad" else type(self.data).__name__
        return f"MatrixReader({self.kind}: {home}, shape={self.shape})"

    def columns(self, sel):
        """The block of columns ``sel`` (a slice or an array of positions)."""
        return self._read(slice(None), sel, axis=1)

    def rows(self, sel):
        """The block of rows ``sel`` (a slice or an array of positions)."""
        return self._read(sel, slice(None), axis=0)

    def _read(self, rows, cols, axis):
        if self.kind == "memory":
            A = self.data
            if isinstance(A, pd.DataFrame):
                A = A.to_numpy()
            return A[rows][:, cols] if axis == 0 else A[:, cols]
        if self.kind == "dask":
            import dask  # noqa: PLC0415

            # computed in the calling thread (on a worker: inside its task), not
            # submitted back to a cluster from within a task
            (out,) = dask.compute(self.data[rows, cols], scheduler="sync")
            return out
        return _read_h5ad(self.data, self.key, rows, cols, axis, self.shape)


class ColumnReader:
    """A count matrix left where it lives, read by the columns it is indexed with.

    ``A[:, cols]`` reads the columns ``cols`` through the :class:`MatrixReader` (in the
    calling process: on a Dask worker when the indexing runs in a task) and returns them
    as a float ndarray after ``check(block)`` (the caller's value checks). For
    estimators that index a (cells x genes) matrix by columns (GLMEIV's genes and gRNAs
    in pairs): handed this in place of the array, they read only what they index.

    Examples
    --------
    >>> import numpy as np
    >>> from skmixed._inputs import ColumnReader, MatrixReader
    >>> A = ColumnReader(MatrixReader.from_array(np.arange(6.0).reshape(2, 3)))
    >>> A.shape, A[:, [2, 0]].tolist()
    ((2, 3), [[2.0, 0.0], [5.0, 3.0]])
    """

    ndim = 2

    def __init__(self, reader, check=None):
        self.reader, self.check = reader, check
        self.shape = reader.shape

    def __getitem__(self, key):
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (key, None)
        if not (isinstance(rows, slice) and rows == slice(None)) or cols is None:
            raise IndexError("a ColumnReader is read by columns only: A[:, cols].")
        block = self.reader.columns(cols)
        block = np.asarray(block.toarray() if hasattr(block, "toarray") else block, dtype=float)
        if self.check is not None:
            self.check(block)
        return block


def _positions(sel, size):
    return np.arange(size)[sel] if isinstance(sel, slice) else np.asarray(sel, dtype=np.int64)


def _read_h5ad(path, key, rows, cols, axis, shape, block_entries=1 << 24):
    import h5py  # noqa: PLC0415

    with h5py.File(path, "r") as f:
        el = f[key]
        if not isinstance(el, h5py.Group):  # dense storage: h5py wants increasing positions
            sel = _positions(rows if axis == 0 else cols, shape[axis])
            if sel.size == 0:
                return np.zeros((0, shape[1]) if axis == 0 else (shape[0], 0))
            lo, hi = int(sel.min()), int(sel.max()) + 1
            part = el[lo:hi] if axis == 0 else el[:, lo:hi]
            return np.asarray(part[sel - lo] if axis == 0 else part[:, sel - lo], dtype=float)
        import anndata  # noqa: PLC0415

        ds = anndata.io.sparse_dataset(el)
        major = 1 if el.attrs["encoding-type"] == "csc_matrix" else 0
        sel = rows if axis == 0 else cols
        if isinstance(sel, slice) or np.all(np.diff(sel) > 0):
            pass
        else:  # the sparse dataset wants increasing positions
            order = np.asarray(sel)
            uniq, inv = np.unique(order, return_inverse=True)
            out = _read_h5ad(path, key, uniq if axis == 0 else rows, cols if axis == 0 else uniq, axis, shape)
            return out[inv] if axis == 0 else out[:, inv]
        if axis == major:
            return ds[rows, :] if axis == 0 else ds[:, cols]
        # the minor axis: blocks of the major axis, keeping the selection of each
        nnz = max(int(el["data"].shape[0]), 1)
        step = max(1, int(block_entries * shape[major] // nnz))
        parts = []
        for start in range(0, shape[major], step):
            block = slice(start, min(start + step, shape[major]))
            parts.append(ds[block, :][:, cols] if major == 0 else ds[:, block][rows, :])
        import scipy.sparse as sp  # noqa: PLC0415

        return sp.vstack(parts, format="csr") if major == 0 else sp.hstack(parts, format="csc")


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


def count_source(Y, *, layer=None, arg: str = "y", stream: bool = False) -> CountSource:
    """Read the count matrix of ``Y`` (AnnData, DataFrame or array-like).

    Parameters
    ----------
    Y : AnnData, DataFrame, array-like or sparse matrix (cells x genes)
    layer : str or None
        AnnData layer to read; None: ``layers["counts"]`` if present, else ``.X``.
    arg : str
        The argument's name, for messages.
    stream : bool, default=False
        For callers that read by blocks: an AnnData opened with ``backed="r"`` or a
        ``dask.array`` comes back as a :class:`MatrixReader` (nothing read yet) instead
        of being read into memory.
    """
    if is_anndata(Y):
        layers = getattr(Y, "layers", None)
        keys = list(layers.keys()) if layers is not None else []
        if layer is not None:
            if layer not in keys:
                raise ValueError(f"layer={layer!r} is not a layer of the AnnData {arg}; its layers are {keys}.")
            M, where, key = layers[layer], f"{arg}.layers[{layer!r}]", f"layers/{layer}"
        elif "counts" in keys:
            M, where, key = layers["counts"], f"{arg}.layers['counts']", "layers/counts"
        else:
            M, where, key = Y.X, f"{arg}.X", "X"
        if M is None:
            raise ValueError(f"{where} is empty (None); pass the layer that holds the raw counts with layer=.")
        names = unique_names(Y.var_names, f"{arg}.var_names")
        if stream and _is_backed(Y):
            return CountSource(MatrixReader.from_h5ad(Y.filename, key, where=where), names, where, True)
        if stream and is_dask_array(M):
            return CountSource(MatrixReader.from_array(M, where=where, anndata=True), names, where, True)
        return CountSource(_in_memory(M), names, where, True)
    if layer is not None:
        raise ValueError(f"layer={layer!r} applies to AnnData input only; {arg} is a {type(Y).__name__}.")
    if isinstance(Y, pd.DataFrame):
        return CountSource(Y, unique_names(Y.columns, f"the columns of {arg}"), arg, False)
    if stream and is_dask_array(Y):
        return CountSource(MatrixReader.from_array(Y, where=arg), None, arg, False)
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
_DE_COLUMNS = ("gene", "contrast", "estimate", "std_error", "p_value", "q_value")


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
    columns = set(getattr(table, "columns", []))
    stat = "statistic" if "statistic" in columns else "z"  # contrast() tables before the t test had "z"
    if not isinstance(table, pd.DataFrame) or not set(_DE_COLUMNS) | {stat} <= columns:
        missing = sorted((set(_DE_COLUMNS) | {stat}) - columns)
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
    stats = ["estimate", "std_error", stat, "p_value", "q_value"]
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
        fields["scores"].append(ranked[stat].to_numpy(dtype=np.float32))
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
