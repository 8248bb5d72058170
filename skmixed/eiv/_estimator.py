"""The scikit-learn shell of GLM-EIV: input checks, pairs, blocks, threads, tidy results."""

from __future__ import annotations

import functools
import numbers
import os
import warnings

import numpy as np
import pandas as pd
import scipy.sparse
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils.validation import check_is_fitted

from .._backend import get_namespace, gpu_namespace, to_host
from .._families import Poisson
from .._inputs import ColumnReader, MatrixReader, count_source, require_counts
from .._malloc import tune_malloc
from .._parallel import Engine, call_item
from .._threads import one_blas_thread
from . import _init
from ._fit import MIN_PERTURBED_CELLS, draw_guesses, fit_block
from ._inference import Z975, delta_method
from ._init import fit_pilot
from ._model import Design, base_eta, component_logliks, e_step, make_family, normaliser

_FAMILIES = ("poisson", "negative_binomial")
_INITS = ("accelerated", "random")
# (n, pairs) arrays of one block stay below this many elements
_BLOCK_ELEMENTS = 2**17
# (n, columns) float64 elements of one block of y or grna columns read for the zero checks
# and the pilot fits (32 MB): a backed y then costs one block, not n x genes-in-pairs
_READ_ELEMENTS = 2**22


def _read_width(n):
    """Columns per read block: a whole number of :func:`fit_pilot`'s own blocks of columns,
    so that fitting block by block repeats its numbers exactly."""
    step = max(1, _init._PILOT_ELEMENTS // max(n, 1))
    return step * max(1, _READ_ELEMENTS // (step * max(n, 1)))


def _column_blocks(A, keep, n):
    """``(positions in keep, A[:, keep[positions]])`` block after block of columns; ``A`` an
    array or a :class:`~skmixed._inputs.ColumnReader` (which reads each block from its file)."""
    width = _read_width(n)
    for s in range(0, len(keep), width):
        sl = slice(s, min(s + width, len(keep)))
        yield sl, A[:, keep[sl]]


def _all_zero(A, keep, n):
    """Whether each column ``keep`` of ``A`` is zero in every cell (read by blocks)."""
    return np.concatenate([np.zeros(0, bool)] + [~np.any(B > 0, axis=0) for _, B in _column_blocks(A, keep, n)])


def _check_counts(arr, name, src):
    require_counts(src, Poisson.check_response(arr, name))


def _as_counts(a, name, n=None, layer=None, stream=False):
    src = count_source(a, layer=layer, arg=name, stream=stream)  # AnnData: the layer rule; unique names
    a = src.values
    names = None if src.names is None else list(src.names)
    if isinstance(a, MatrixReader):  # backed AnnData, dask array: the columns indexed are read (and checked)
        a = ColumnReader(a, functools.partial(_check_counts, name=name, src=src))
        if n is not None and a.shape[0] != n:
            raise ValueError(f"{name} has {a.shape[0]} rows but X has {n}: the lengths must match.")
        return a, names if names is not None else [str(j) for j in range(a.shape[1])]
    if isinstance(a, pd.Series):
        names = [str(a.name)] if a.name is not None else None
    if scipy.sparse.issparse(a):
        a = a.toarray()
    try:
        arr = np.asarray(to_host(a), dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an array of counts.") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}.")
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} rows but X has {n}: the lengths must match.")
    _check_counts(arr, name, src)
    if names is None:
        names = [str(j) for j in range(arr.shape[1])]
    return arr, names


def _as_offset(o, name, n, width):
    if o is None:
        return np.zeros((n, 1))
    arr = np.asarray(to_host(o), dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.shape[0] != n or arr.ndim != 2 or arr.shape[1] not in (1, width):
        raise ValueError(f"{name} must have shape ({n},) or ({n}, {width}), got {np.shape(o)}.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite.")
    return arr


class GLMEIV(BaseEstimator):
    """GLM-EIV (Barry, Roeder and Katsevich, Biostatistics 2024) for CRISPR screens.

    For one gene-perturbation pair and cells ``i``: a latent ``p_i ~ Bernoulli(pi)``,
    ``pi <= 1/2``; mRNA ``m_i | p_i`` Poisson or NB with
    ``log mu = b0_m + b1_m p_i + gamma_m' z_i + o_m_i``; gRNA ``g_i | p_i`` likewise with
    its own coefficients; ``m`` and ``g`` independent given ``p``. The maximum-likelihood
    estimate comes from the EM algorithm (glmeiv's), started by the accelerated
    initialisation; standard errors from the observed information (Louis's formula).
    Every pair of a screen is fitted in one vectorised call.

    Parameters
    ----------
    mrna_family, grna_family : {"negative_binomial", "poisson"}
    mrna_size, grna_size : float, array of shape (n_genes,) / (n_perturbations,), or None
        NB sizes; None estimates each from the covariates-only NB GLM (``MASS::glm.nb``,
        as glmeiv) and holds it fixed in the EM. Ignored for Poisson.
    init : {"accelerated", "random"}, default="accelerated"
        ``"accelerated"``: covariates-only pilot GLMs, a reduced EM with closed-form
        M-steps from ``n_restarts`` random starts, one full EM from the best.
        ``"random"``: ``n_restarts`` full EMs from glmeiv's random starts (15 iterations
        each), the best continued to convergence.
    n_restarts : int, default=15
    tol : float, default=1e-10
        The EM stops when the log-likelihood still to gain is below ``tol`` times its
        absolute value: the gain a Newton step on the observed log-likelihood predicts,
        ``S' I^{-1} S / 2`` with Louis's information ``I`` and the score ``S``. Every
        estimate is then within ``sqrt(2 tol |loglik|)`` standard errors of the MLE (0.009
        at 50,000 cells). Where ``I`` is not positive definite, glmeiv's rule: the relative
        change of the log-likelihood below ``tol`` (glmeiv's default 1e-4 stops short of
        the MLE).
    max_iter : int, default=500
        EM iterations per pair.
    n_jobs : int or None, default=None
        Threads over blocks of pairs (results do not depend on it). Within
        ``skmixed.parallel_config(client=...)`` the blocks of pairs run on that Dask
        cluster instead (same results; the pilot fits stay in-process).
    device : {None, "cpu", "gpu"}, default=None
        None follows the inputs (CuPy arrays fit on the GPU), "gpu" moves them there.
    random_state : int, Generator or None
        Seeds the random starts, which every pair shares (a pair's fit does not depend on
        the batch it is fitted in).
    layer : str or None, default=None
        For AnnData ``y`` or ``grna``: the layer with the raw counts (None:
        ``layers["counts"]`` when present, else ``.X``); genes and perturbations are
        named by ``var_names``. Non-integer values read from AnnData are an error.

    Attributes
    ----------
    results_ : DataFrame
        Tidy: ``parameter`` (``pi``, ``m_intercept``, ``m_perturbation``, ``m_<covariate>``,
        ``g_intercept``, ``g_perturbation``, ``g_<covariate>``; glmeiv's names), ``estimate``,
        ``std_error``, ``z``, ``p_value``, ``confint_lower``, ``confint_upper`` and the fold
        change ``fc_estimate``, ``fc_confint_lower``, ``fc_confint_upper`` (glmeiv's
        ``run_delta_method``; NaN for ``pi``); ``gene`` and ``perturbation`` lead when
        several pairs are fitted.
    pairs_ : DataFrame
        One row per pair: ``gene``, ``perturbation``, ``loglik``, ``n_iter`` (full-EM steps
        from the chosen start: M-steps, or Newton steps on the observed log-likelihood
        near the maximum), ``n_iter_init`` (full-EM iterations spent on the random
        restarts of ``init="random"``; 0 for the accelerated start), ``converged``
        and the flags ``grna_zero``, ``mrna_zero``, ``no_grna_signal`` (the fitted gRNA effect is
        not significantly above 0, Wald z < 1.96: the perturbed component is not above background), ``pi_at_bound`` (the 95% interval of pi reaches the 1/2 bound: the
        labels of the two components are not identified),
        ``too_few_cells`` (n pi < 10), ``singular_information`` (no standard errors), and
        ``flagged`` (any of them, or not converged).
    coef_ : ndarray of shape (n_pairs, n_parameters)
    mrna_size_, grna_size_ : ndarray of shape (n_pairs,) or None
    loglik_, n_iter_, loglik_path_ : per pair (scalars / one array for one pair)
    converged_ : bool
        Every pair converged.
    n_features_in_, feature_names_in_ : as scikit-learn.

    Notes
    -----
    On Linux with glibc, the first ``fit`` in a process raises the C allocator's mmap and
    trim thresholds to 32 and 64 MB (``mallopt``, :mod:`skmixed._malloc`): a fit frees and
    reallocates thousands of arrays of 0.1-30 MB, and with glibc's defaults each reuse
    costs fresh pages from the kernel (6,000-7,700 page faults, 30-40% more CPU time, for
    one pair of 50,000 cells). The setting is process-wide and stays: up to 64 MB of freed
    memory may be kept by the process rather than returned to the system. Set
    ``SKMIXED_NO_MALLOPT=1`` in the environment before the first fit to leave the allocator
    alone.

    Examples
    --------
    >>> from skmixed.eiv import GLMEIV, make_glmeiv_data
    >>> X, m, g, off, p = make_glmeiv_data(5000, pi=0.1, random_state=0)
    >>> model = GLMEIV(mrna_family="poisson", random_state=0).fit(
    ...     X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"])
    >>> row = model.results_.set_index("parameter").loc["m_perturbation"]
    >>> round(float(row["estimate"]), 1), bool(model.converged_)
    (-1.4, True)
    """

    def __init__(self, *, mrna_family="negative_binomial", grna_family="poisson", mrna_size=None, grna_size=None,
                 init="accelerated", n_restarts=15, tol=1e-10, max_iter=500, n_jobs=None, device=None,
                 random_state=None, layer=None):
        self.mrna_family = mrna_family
        self.grna_family = grna_family
        self.mrna_size = mrna_size
        self.grna_size = grna_size
        self.init = init
        self.n_restarts = n_restarts
        self.tol = tol
        self.max_iter = max_iter
        self.n_jobs = n_jobs
        self.device = device
        self.random_state = random_state
        self.layer = layer

    # ------------------------------------------------------------------ validation
    def _validate_params(self):
        for name in ("mrna_family", "grna_family"):
            if getattr(self, name) not in _FAMILIES:
                raise ValueError(f"{name} must be one of {_FAMILIES}, got {getattr(self, name)!r}.")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}.")
        for name in ("n_restarts", "max_iter"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not isinstance(self.tol, numbers.Real) or not self.tol > 0:
            raise ValueError(f"tol must be a positive number, got {self.tol!r}.")
        if self.n_jobs is not None and (not isinstance(self.n_jobs, numbers.Integral) or self.n_jobs == 0):
            raise ValueError(f"n_jobs must be None or a non-zero integer, got {self.n_jobs!r}.")
        if self.device not in (None, "cpu", "gpu"):
            raise ValueError(f"device must be None, 'cpu' or 'gpu', got {self.device!r}.")
        if self.layer is not None and not isinstance(self.layer, str):
            raise ValueError(f"layer must be None or the name of an AnnData layer, got {self.layer!r}.")
        for name in ("mrna_size", "grna_size"):
            v = getattr(self, name)
            if v is not None:
                r = np.asarray(v, dtype=float)
                if r.ndim > 1 or r.size == 0 or not np.all(np.isfinite(r)) or np.any(r <= 0):
                    raise ValueError(f"{name} must be None, a positive number or a 1-D array of them, got {v!r}.")

    def _design(self, X, n=None, reset=True):
        names = None
        if isinstance(X, pd.DataFrame):
            names = [str(c) for c in X.columns]
            if any(not np.issubdtype(t, np.number) and t != bool for t in X.dtypes):
                raise ValueError("X must hold numeric covariates (encode categories first, e.g. with a ColumnTransformer).")
        try:
            Xa = np.asarray(to_host(X), dtype=float)
        except (TypeError, ValueError):
            raise ValueError("X must be a numeric array of covariates.") from None
        if Xa.ndim == 1:
            raise ValueError("X must be 2-D (n_cells, n_covariates); use X.reshape(-1, 1) for one covariate.")
        if Xa.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {Xa.shape}.")
        if not np.all(np.isfinite(Xa)):
            raise ValueError("X must be finite (no NaN or infinite covariates).")
        if n is not None and Xa.shape[0] != n:
            raise ValueError(f"X has {Xa.shape[0]} rows but y has {n}: the lengths must match.")
        if reset:
            self.n_features_in_ = Xa.shape[1]
            if names is not None:
                self.feature_names_in_ = np.asarray(names, dtype=object)
            elif hasattr(self, "feature_names_in_"):
                del self.feature_names_in_
            self._cov_names = names if names is not None else [f"x{j}" for j in range(Xa.shape[1])]
            if "perturbation" in self._cov_names or "intercept" in self._cov_names:
                raise ValueError("X may not have a column named 'perturbation' or 'intercept' (reserved).")
        elif Xa.shape[1] != self.n_features_in_:
            raise ValueError(f"X has {Xa.shape[1]} features, but GLMEIV was fitted with {self.n_features_in_}.")
        Z = np.column_stack([np.ones(Xa.shape[0]), Xa])
        # rank of the q x q cross-product (scaled to unit diagonal): no SVD of the n x q design
        G = Z.T @ Z
        dg = np.sqrt(np.maximum(np.diag(G), 1e-300))
        if reset and np.linalg.matrix_rank(G / dg[:, None] / dg[None, :], tol=1e-10) < Z.shape[1]:
            raise ValueError("X with an intercept is rank deficient: drop collinear or constant covariates.")
        return Z

    @staticmethod
    def _pairs(pairs, gnames, pnames):
        G, P = len(gnames), len(pnames)
        if pairs is None:
            return [(i, j) for i in range(G) for j in range(P)]
        gi = {g: i for i, g in enumerate(gnames)}
        pj = {p: j for j, p in enumerate(pnames)}
        out = []
        for pair in pairs:
            try:
                a, b = pair
            except (TypeError, ValueError):
                raise ValueError(f"pairs must list (gene, perturbation) pairs, got {pair!r}.") from None
            i = gi.get(str(a), a if isinstance(a, numbers.Integral) and 0 <= a < G else None)
            j = pj.get(str(b), b if isinstance(b, numbers.Integral) and 0 <= b < P else None)
            if i is None or j is None:
                raise ValueError(f"pairs: {pair!r} names a gene or perturbation that is not in y / grna.")
            out.append((int(i), int(j)))
        if not out:
            raise ValueError("pairs is empty.")
        return out

    # ------------------------------------------------------------------ fit
    def fit(self, X, y, *, grna, offset=None, grna_offset=None, pairs=None):
        """Fit GLM-EIV to every pair.

        Parameters
        ----------
        X : array-like of shape (n_cells, n_covariates)
            Technical covariates (an intercept is added); DataFrame columns name them.
        y : array-like of shape (n_cells,) or (n_cells, n_genes)
            mRNA counts.
        grna : array-like of shape (n_cells,) or (n_cells, n_perturbations)
            gRNA counts.
        offset, grna_offset : array-like of shape (n_cells,) or (n_cells, n_genes/n_perturbations)
            Offsets (log library sizes), shared or one per column.
        pairs : list of (gene, perturbation) or None
            Names (DataFrame columns) or column indices; None fits every combination.

        Returns
        -------
        self
        """
        self._validate_params()
        tune_malloc()
        if grna is None:
            raise ValueError("grna is required: the gRNA counts of the cells.")
        Y, gnames = _as_counts(y, "y", layer=self.layer, stream=True)
        n = Y.shape[0]
        Gr, pnames = _as_counts(grna, "grna", n, layer=self.layer, stream=True)
        Z = self._design(X, n)
        Om = _as_offset(offset, "offset", n, Y.shape[1])
        Og = _as_offset(grna_offset, "grna_offset", n, Gr.shape[1])
        idx = self._pairs(pairs, gnames, pnames)
        # the work is many small matrix products: a multithreaded BLAS only spins (3x slower
        # on a loaded 2-core machine); parallelism is over blocks of pairs (n_jobs)
        with one_blas_thread():
            self._fit_arrays(Z, Y, Gr, Om, Og, idx, gnames, pnames)
        return self

    def _namespace(self, *arrays):
        if self.device == "gpu":
            return gpu_namespace()
        if self.device == "cpu":
            return np
        return get_namespace(*arrays)

    def _fit_arrays(self, Z, Y, Gr, Om, Og, idx, gnames, pnames):
        xp = self._namespace()
        n = Y.shape[0]
        gi = np.array([i for i, _ in idx])
        pj = np.array([j for _, j in idx])
        ug, up = np.unique(gi), np.unique(pj)
        zero_m, zero_g = _all_zero(Y, ug, n), _all_zero(Gr, up, n)
        if len(idx) == 1 and zero_g[0]:
            raise ValueError("grna is zero in every cell: the perturbation cannot be detected.")
        if len(idx) == 1 and zero_m[0]:
            raise ValueError("y is zero in every cell: the mRNA model has no maximum-likelihood estimate.")
        dev = (lambda a: a) if xp is np else xp.asarray
        Zd = Design(dev(Z))  # the z z' table, built once for the pilot fits and every block
        n_jobs = 1 if self.n_jobs is None else self.n_jobs
        if n_jobs < 0:
            n_jobs = max(1, (os.cpu_count() or 1) + 1 + n_jobs)
        # the pilot fits run on n_jobs threads here; the blocks of pairs in _fit_with_pool
        with Engine(n_jobs=n_jobs, client=False) as pool:
            self._fit_with_pool(pool, xp, dev, Zd, Z, Y, Gr, Om, Og, idx, gnames, pnames, gi, pj, ug, up,
                                zero_m, zero_g, n)

    def _fit_with_pool(self, pool, xp, dev, Zd, Z, Y, Gr, Om, Og, idx, gnames, pnames, gi, pj, ug, up,
                       zero_m, zero_g, n):
        # pilot fits, once per gene and per perturbation (the accelerated initialisation's
        # precomputation; also where an NB size is estimated)
        ok_g, ok_p = ug[~zero_m], up[~zero_g]
        pm = self._pilot_blocks(pool, Zd, dev, Y, ok_g, Om, self.mrna_family,
                                self._size_for(self.mrna_size, ok_g, Y.shape[1], "mrna_size"))
        pg = self._pilot_blocks(pool, Zd, dev, Gr, ok_p, Og, self.grna_family,
                                self._size_for(self.grna_size, ok_p, Gr.shape[1], "grna_size"))
        gpos = {g: k for k, g in enumerate(ok_g)}
        ppos = {p: k for k, p in enumerate(ok_p)}
        good = np.array([(i in gpos) and (j in ppos) for i, j in idx])
        rng = np.random.default_rng(self.random_state)
        guesses = draw_guesses(rng, self.n_restarts, self.init, Z.shape[1])
        B = int(good.sum())
        k = 1 + 2 * (Z.shape[1] + 1)
        est = np.full((len(idx), k), np.nan)
        tables = {name: np.full((len(idx), k), np.nan) for name in ("se", "z", "p", "lo", "hi")}
        loglik = np.full(len(idx), np.nan)
        n_iter = np.zeros(len(idx), dtype=int)
        init_iter = np.zeros(len(idx), dtype=int)
        converged = np.zeros(len(idx), dtype=bool)
        paths = [np.array([])] * len(idx)
        msize = np.full(len(idx), np.nan) if self.mrna_family == "negative_binomial" else None
        gsize = np.full(len(idx), np.nan) if self.grna_family == "negative_binomial" else None
        where = np.flatnonzero(good)
        step = max(1, _BLOCK_ELEMENTS // max(n, 1))
        blocks = [where[s:s + step] for s in range(0, B, step)]

        def run(block):
            bi = [gpos[gi[t]] for t in block]
            bp = [ppos[pj[t]] for t in block]
            bix = bi if xp is np else xp.asarray(bi)
            bpx = bp if xp is np else xp.asarray(bp)
            M = dev(Y[:, gi[block]])
            G = dev(Gr[:, pj[block]])
            om = dev(Om if Om.shape[1] == 1 else Om[:, gi[block]])
            og = dev(Og if Og.shape[1] == 1 else Og[:, pj[block]])
            # the pilots' linear predictors, as fit_pilot computes them, for this block only
            cm, cg = pm[0][bix], pg[0][bpx]
            return fit_block(
                Zd, M, G, om, og, mrna_family=self.mrna_family, grna_family=self.grna_family,
                mrna_size=None if pm[1] is None else pm[1][bix], grna_size=None if pg[1] is None else pg[1][bpx],
                pilot_m=(cm, Zd.Z @ cm.T + om), pilot_g=(cg, Zd.Z @ cg.T + og),
                guesses=guesses, init=self.init, tol=self.tol, max_iter=self.max_iter,
            )

        # blocks through skmixed._parallel: n_jobs threads, or the Dask client of
        # parallel_config (the GPU path in-process); run with the data it closes over and
        # the blocks go to a cluster once, the tasks get block numbers
        with Engine(n_jobs=pool.n_jobs, client=None if xp is np else False) as engine:
            results = list(engine.map(call_item, range(len(blocks)), engine.share(run), engine.share(blocks)))
        for block, r in zip(blocks, results):
            est[block] = r.estimate
            for name in tables:
                tables[name][block] = getattr(r, name)
            loglik[block] = r.loglik
            n_iter[block] = r.n_iter
            init_iter[block] = r.extra["init_em_iter"]
            converged[block] = r.converged
            for t, pth in zip(block, r.loglik_path):
                paths[t] = pth
        if msize is not None and good.any():
            msize[good] = to_host(pm[1])[[gpos[gi[t]] for t in where]]
        if gsize is not None and good.any():
            gsize[good] = to_host(pg[1])[[ppos[pj[t]] for t in where]]
        self._finish(idx, gnames, pnames, gi, pj, zero_m, zero_g, ug, up, est, tables, loglik, n_iter, converged,
                     paths, msize, gsize, n, init_iter)

    def _size_for(self, size, cols, width, name):
        if size is None:
            return None
        s = np.asarray(size, dtype=float)
        if s.ndim == 0:
            return np.full(len(cols), float(s))
        if s.shape[0] != width:
            raise ValueError(f"{name} has {s.shape[0]} entries for {width} columns.")
        return s[cols]

    def _pilot_blocks(self, pool, Zd, dev, A, keep, O, family, size):
        """``(coef (C, q), size (C,) or None)`` of the pilot fits of the columns ``keep`` of
        ``A``, read and fitted a block of columns at a time (the pilot GLMs are per column:
        the numbers are those of one call on every column). Their linear predictors, an
        (n, C) array, are not kept: each block of pairs recomputes its own."""
        parts = []
        for sl, B in _column_blocks(A, keep, Zd.n):
            o = O if O.shape[1] == 1 else O[:, keep[sl]]
            coef, _, sz, _ = self._pilot(pool, Zd, dev(B), dev(o), family, None if size is None else size[sl])
            parts.append((coef, sz))
        if not parts:
            return get_namespace(Zd.Z).zeros((0, Zd.q)), None
        xp = get_namespace(parts[0][0])
        return xp.concatenate([c for c, _ in parts]), None if parts[0][1] is None else xp.concatenate(
            [z for _, z in parts])

    @staticmethod
    def _pilot(pool, Z, Y, O, family, size):
        xp = get_namespace(Y)
        if Y.shape[1] == 0:
            return xp.zeros((0, Z.q)), xp.zeros((Z.n, 0)), None, np.zeros(0, bool)
        return fit_pilot(Z, Y, O, family, None if size is None else xp.asarray(size),
                         map=pool.map)

    def _finish(self, idx, gnames, pnames, gi, pj, zero_m, zero_g, ug, up, est, tables, loglik, n_iter, converged,
                paths, msize, gsize, n, init_iter):
        params = ["pi"] + [f"{m}_{c}" for m in ("m", "g") for c in ["intercept", "perturbation"] + self._cov_names]
        # the flags as numpy arrays and each table built once from them: pandas column
        # inserts, frame reductions and boolean Series cost milliseconds, a one-pair fit ~20
        zg = np.zeros(int(up.max()) + 1 if len(up) else 0, dtype=bool)
        zm = np.zeros(int(ug.max()) + 1 if len(ug) else 0, dtype=bool)
        zg[up], zm[ug] = zero_g, zero_m
        grna_zero, mrna_zero = zg[pj], zm[gi]
        pi_hat = est[:, 0]
        g_z = tables["z"][:, 2 + len(self._cov_names) + 2]
        with np.errstate(invalid="ignore"):
            flag = {
                "grna_zero": grna_zero,
                "mrna_zero": mrna_zero,
                "no_grna_signal": ~(g_z > Z975),
                "pi_at_bound": pi_hat + Z975 * np.nan_to_num(tables["se"][:, 0]) >= 0.5,
                "too_few_cells": ~(n * pi_hat >= MIN_PERTURBED_CELLS),
                "singular_information": ~np.all(np.isfinite(tables["se"]), axis=1),
            }
        flagged = ~converged
        for v in flag.values():
            flagged = flagged | v
        gene_names = np.asarray([gnames[i] for i in gi], dtype=object)
        pert_names = np.asarray([pnames[j] for j in pj], dtype=object)
        flags = pd.DataFrame({
            "gene": gene_names, "perturbation": pert_names, "loglik": loglik, "n_iter": n_iter,
            "n_iter_init": init_iter, "converged": converged, **flag, "flagged": flagged,
        })
        self.pairs_ = flags
        self.coef_ = est
        self.parameter_names_ = params
        self.mrna_size_ = msize
        self.grna_size_ = gsize
        fc, fl, fu = delta_method(est, tables["se"])
        fc[:, 0] = fl[:, 0] = fu[:, 0] = np.nan
        B, k = est.shape
        lead = {"gene": np.repeat(gene_names, k), "perturbation": np.repeat(pert_names, k)} if B > 1 else {}
        self.results_ = pd.DataFrame({
            **lead, "parameter": np.tile(np.asarray(params, dtype=object), B),
            "estimate": est.ravel(), "std_error": tables["se"].ravel(), "z": tables["z"].ravel(),
            "p_value": tables["p"].ravel(), "confint_lower": tables["lo"].ravel(), "confint_upper": tables["hi"].ravel(),
            "fc_estimate": fc.ravel(), "fc_confint_lower": fl.ravel(), "fc_confint_upper": fu.ravel(),
        })
        one = B == 1
        self.loglik_ = float(loglik[0]) if one else loglik
        self.n_iter_ = int(n_iter[0]) if one else n_iter
        self.loglik_path_ = paths[0] if one else paths
        self.converged_ = bool(np.all(converged))
        self._pair_index = (gi, pj)
        bad = np.flatnonzero(~converged & ~grna_zero & ~mrna_zero)
        if bad.size:
            warnings.warn(
                f"GLM-EIV EM did not converge in max_iter={self.max_iter} iterations for {bad.size} pair(s) "
                f"(first: {gene_names[bad[0]]}, {pert_names[bad[0]]}); see pairs_.",
                ConvergenceWarning, stacklevel=3,
            )
        skipped = int(np.sum(grna_zero | mrna_zero))
        if skipped:
            warnings.warn(f"{skipped} pair(s) with all-zero counts were not fitted (NaN results, flagged in pairs_).",
                          UserWarning, stacklevel=3)

    # ------------------------------------------------------------------ predict
    def predict_proba(self, X, y, *, grna, offset=None, grna_offset=None):
        """Posterior probabilities ``[P(p_i = 0), P(p_i = 1)]`` of every cell at the fitted
        parameters: shape (n_cells, 2) for one fitted pair, (n_cells, n_pairs, 2) otherwise.
        ``y`` and ``grna`` have the columns used in ``fit``."""
        check_is_fitted(self, "coef_")
        Y, _ = _as_counts(y, "y", layer=self.layer)
        n = Y.shape[0]
        Gr, _ = _as_counts(grna, "grna", n, layer=self.layer)
        Z = self._design(X, n, reset=False)
        Om = _as_offset(offset, "offset", n, Y.shape[1])
        Og = _as_offset(grna_offset, "grna_offset", n, Gr.shape[1])
        gi, pj = self._pair_index
        if gi.max() >= Y.shape[1] or pj.max() >= Gr.shape[1]:
            raise ValueError("y and grna must have the columns used in fit.")
        M, G = Y[:, gi], Gr[:, pj]
        om = Om if Om.shape[1] == 1 else Om[:, gi]
        og = Og if Og.shape[1] == 1 else Og[:, pj]
        p1 = Z.shape[1] + 1
        est = self.coef_
        # pairs that were not fitted have NaN sizes (and NaN coefficients, so NaN posteriors)
        fm = make_family(self.mrna_family, None if self.mrna_size_ is None else np.nan_to_num(self.mrna_size_, nan=1.0))
        fg = make_family(self.grna_family, None if self.grna_size_ is None else np.nan_to_num(self.grna_size_, nan=1.0))
        cm, cg = est[:, 1:1 + p1], est[:, 1 + p1:]
        with np.errstate(invalid="ignore"):  # NaN parameters of pairs that were not fitted
            eta_m, eta_g = base_eta(Z, cm, om), base_eta(Z, cg, og)
            k0, k1 = component_logliks(fm, fg, M, G, eta_m, cm[:, 1], eta_g, cg[:, 1])
            T, _ = e_step(k0, k1, est[:, 0], normaliser(fm, M) + normaliser(fg, G))
        out = np.stack([1.0 - T, T], axis=-1)
        return out[:, 0, :] if out.shape[1] == 1 else out

    def predict(self, X, y, *, grna, offset=None, grna_offset=None):
        """1 for cells more likely perturbed than not (the gRNA assignment), else 0."""
        P = self.predict_proba(X, y, grna=grna, offset=offset, grna_offset=grna_offset)
        return (P[..., 1] > 0.5).astype(int)

