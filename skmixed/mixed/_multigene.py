"""PoissonGLMM over a count matrix: one model per column (gene), vectorised.

Genes share ``X``, the grouping factor and the offset. The rows are first reduced
to the distinct rows of the design (exact for Poisson: sums of counts per distinct
row, and ``log(sum(exp(offset)))``), then genes are fitted in chunks by
:class:`~skmixed.mixed._batched.BatchedScalarLaplace`, so that memory does not grow
with the number of genes and sparse matrices are only ever densified one chunk of
reduced rows at a time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import scipy.special
import scipy.stats

from .._backend import to_device, to_host
from .._families import Poisson
from .._inputs import MatrixReader, count_source, require_counts
from .._parallel import Engine, call_item
from .._progress import logger, progress
from ..glm._newton import fit_glm
from ._batched import BatchedScalarLaplace, LevelDesign
from ._design import distinct_rows
from ._gene_chunks import check_count_values, gene_sums
from ._inference import inference_columns

CHUNK_GENES = 2_000  # genes fitted at once: the working arrays stay in cache


def as_count_matrix(Y, layer=None, arg="y"):
    """(n, G) counts as CSC sparse or a 2-D float array, with gene names.

    AnnData and DataFrames are read by :func:`skmixed._inputs.count_source` (the
    ``layer`` rule; unique gene names; non-integer values from AnnData an error);
    ``arg`` names the argument in messages. A backed AnnData or a ``dask.array`` comes
    back as a :class:`~skmixed._inputs.MatrixReader` (read by chunks of genes in
    :func:`fit_many`, its values checked there, ``integer`` True: not known yet).
    """
    src = count_source(Y, layer=layer, arg=arg, stream=True)
    Y, names = src.values, src.names
    if isinstance(Y, MatrixReader):
        if len(Y.shape) != 2:
            raise ValueError(f"{src.where} must be 2-D (cells x genes), got shape {Y.shape}.")
        return Y, list(names if names is not None else [f"gene{j}" for j in range(Y.shape[1])]), True
    if isinstance(Y, pd.DataFrame):
        Y = Y.to_numpy(dtype=float)
    if hasattr(Y, "get") and not sp.issparse(Y):  # a CuPy array or cupyx sparse matrix
        Y = Y.get()
    if sp.issparse(Y):
        Y = sp.csc_matrix(Y, dtype=float)
        values = Y.data
    else:
        Y = _numeric(Y, src.where)
        values = Y
    if Y.ndim != 2:
        raise ValueError(f"y must be 1-D or 2-D (cells x genes), got shape {Y.shape}.")
    integer = check_count_values(values, src.where)
    require_counts(src, integer)
    if names is None:
        names = np.asarray([f"gene{j}" for j in range(Y.shape[1])], dtype=object)
    return Y, list(names), integer


def _numeric(Y, where):
    try:
        return np.asarray(Y, dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must hold numeric counts; could not convert it to numbers ({exc}).") from exc


def fit_many(
    fixed, Y, codes, levels, offset, weights, *, names, fixed_names, group_name, vcov, xp=np, integer=None, verbose=0,
    n_jobs=None, client=None,
    reml=False, term_df=None,
):
    """Fit one random-intercept Poisson GLMM per column of ``Y`` (n x G).

    The reduction to distinct rows runs on the host; the batched fits run in the
    array namespace ``xp`` (numpy, or cupy to fit on a GPU). ``verbose``: a progress
    bar of the genes fitted, advanced once per chunk of genes. ``Y`` may be a
    :class:`~skmixed._inputs.MatrixReader` (backed AnnData, dask array): it is read once,
    by chunks of genes. The chunks run in-process (``n_jobs`` threads) or on a Dask
    ``client`` (default: :func:`skmixed.parallel_config`'s); the results do not depend
    on which.

    ``reml``: the REML criterion (see :meth:`BatchedScalarLaplace.fit_reml`);
    ``term_df``: the reference df of each fixed effect (p,), inf for the Wald z.

    Returns a dict of per-gene arrays and tidy DataFrames.
    """
    n, G = Y.shape
    L = len(levels)
    off = np.zeros(n) if offset is None else offset
    w = np.ones(n) if weights is None else weights
    # distinct rows of (X, group): exact reduction shared by every gene
    keys, first = distinct_rows([fixed, codes[:, None].astype(float)])
    n_c = first.size
    S = sp.csr_matrix((w, (keys, np.arange(n))), shape=(n_c, n))  # weighted row sums
    shift = float(np.max(off))
    off_c = np.log(S @ np.exp(off - shift)) + shift
    Xc, codes_c = fixed[first], codes[first]
    p = Xc.shape[1]

    # the GPU path runs in-process; the host paths on parallel_config's engine
    pool = Engine(n_jobs=n_jobs, client=client) if xp is np else Engine(n_jobs=1, client=False)
    # one pass over the counts by chunks of genes (read where they are): the
    # parameter-free part of each gene's log-likelihood sum w (y o - lgamma(y + 1)), the
    # saturated one, and the counts summed within distinct rows (n_c, G): small
    sums = gene_sums(Y, S, off, weights, integer, pool=pool, chunk=CHUNK_GENES,
                     anndata=getattr(Y, "anndata", False))
    const, saturated, Yc_all = sums.const, sums.saturated, sums.Yc
    # the sufficient statistics of each gene: X'y and the counts per level
    XtY_all = Xc.T @ Yc_all  # (p, G)
    ylev_all = sp.csr_matrix((np.ones(n_c), (codes_c, np.arange(n_c))), shape=(L, n_c)) @ Yc_all  # (L, G)
    design = LevelDesign(Xc, codes_c, L, off_c, np.ones(n_c), xp=xp)
    # start: the Poisson GLM (theta = 0), on the distinct rows of X
    Ck = np.bincount(design.keys, weights=np.exp(off_c - design.shift), minlength=design.K)
    Yk_all = sp.csr_matrix((np.ones(n_c), (design.keys, np.arange(n_c))), shape=(design.K, n_c)) @ Yc_all
    Xk, ok = to_device(Xc[design.first], xp), to_device(np.log(Ck) + design.shift, xp)

    totals = Yc_all.sum(axis=0)
    fit_mask = totals > 0
    out = {
        "beta": np.full((G, p), np.nan), "cov": np.full((G, p, p), np.nan), "theta": np.full(G, np.nan),
        "loglik": np.full(G, np.nan), "converged": np.zeros(G, dtype=bool), "b": np.full((G, L), np.nan),
        "condsd": np.full((G, L), np.nan),
    }
    idx = np.flatnonzero(fit_mask)
    logger.info("PoissonGLMM: %d genes (%d without counts), %d distinct rows of %d cells, %d levels of %r",
                G, G - idx.size, n_c, n, L, group_name)
    bar = progress(total=int(idx.size), desc="PoissonGLMM genes", unit="gene", verbose=verbose)

    def fit_chunk(genes):
        # the small reduced problem runs where the input lives: numpy, or CuPy on a GPU
        XtY, ylev, Yk = (to_device(np.ascontiguousarray(a[:, genes].T), xp) for a in (XtY_all, ylev_all, Yk_all))
        glm = fit_glm(Xk, Yk.T, Poisson, offset=ok, tol=1e-6, max_iter=15)  # a start only
        engine = BatchedScalarLaplace(design, XtY, ylev)
        res = engine.fit(engine.start_theta(glm.coef), glm.coef, hessian_cov=(vcov == "hessian"), reml=reml)
        return genes, res

    chunks = [idx[start : start + CHUNK_GENES] for start in range(0, idx.size, CHUNK_GENES)]
    # the fitting function, with the per-gene statistics it closes over, goes to a
    # cluster once (shared); the tasks get chunk numbers
    fitted = pool.map(call_item, range(len(chunks)), pool.share(fit_chunk), pool.share(chunks))
    for genes, res in fitted:
        theta, u, M = to_host(res.theta), to_host(res.u), to_host(res.M)
        out["beta"][genes] = to_host(res.beta)
        out["cov"][genes] = to_host(res.cov)
        out["theta"][genes] = theta
        # REML: glmmTMB's restricted log-likelihood, with the flat prior's 2 pi terms
        out["loglik"][genes] = -0.5 * to_host(res.deviance) + const[genes] + (0.5 * p * np.log(2 * np.pi) if reml else 0.0)
        out["converged"][genes] = to_host(res.converged)
        out["b"][genes] = theta[:, None] * u
        out["condsd"][genes] = np.abs(theta)[:, None] / np.sqrt(M)
        bar.update(genes.size)
    bar.close()
    pool.close()
    out["saturated"] = saturated
    # a non-negative (indicator-like) fixed-effect column without any count: its
    # coefficient's MLE is -inf, and the number reported is only where the optimiser stopped
    indicator = np.all(Xc >= 0, axis=0)
    empty_group = np.any(((Xc[:, indicator].T @ Yc_all) == 0), axis=0) if indicator.any() else np.zeros(G, bool)
    flag = np.where(out["converged"], "", "not_converged")
    flag = np.where(empty_group, "zero_count_group", flag)
    flag = np.where(~fit_mask, "all_zero", flag)
    flag = np.where((flag == "") & (np.abs(out["theta"]) < 1e-4), "singular", flag)
    out["flag"] = flag

    se = np.sqrt(np.diagonal(out["cov"], axis1=1, axis2=2))
    df = np.broadcast_to(np.full(p, np.inf) if term_df is None else np.asarray(term_df, dtype=float), (G, p))
    inf = inference_columns(out["beta"], se, df)
    out["table"] = pd.DataFrame(
        {
            "gene": np.repeat(names, p),
            "term": np.tile(fixed_names, G),
            "estimate": out["beta"].ravel(),
            "std_error": se.ravel(),
            **{k: np.ravel(v) for k, v in inf.items() if k != "distribution"},
            "q_value": bh_columns(inf["p_value"]).ravel(),  # over genes, within each term
            "distribution": inf["distribution"].ravel(),
        }
    )
    out["genes"] = pd.DataFrame(
        {
            "gene": names,
            "grp": group_name,
            "sdcor": np.abs(out["theta"]),
            "vcov": out["theta"] ** 2,
            "loglik": out["loglik"],
            "converged": out["converged"],
            "flag": flag,
            "total_count": totals if weights is None else sums.totals,
        }
    )
    return out


def _row_blocks(A, entries=1 << 22):
    """Views of consecutive rows of ``A`` with about ``entries`` elements each (a 1-D
    array is one block): temporaries of a pass over a large dense matrix stay small."""
    if A.ndim < 2:
        return [A]
    step = max(1, entries // max(A.shape[1], 1))
    return [A[r:r + step] for r in range(0, A.shape[0], step)]


def _column_sums_lgamma_saturated(Y, w=None, integer=None):
    """Per gene: sum of w lgamma(y + 1), and the saturated log-likelihood; see
    :func:`_column_sums_block`. Dense counts go by blocks of rows (a 68,627 x 5,000
    matrix in one piece made several full-size temporaries: 4.9 s)."""
    if sp.issparse(Y):
        return _column_sums_block(Y, w, integer)
    lg, sat = np.zeros(Y.shape[1]), np.zeros(Y.shape[1])
    start = 0
    for block in _row_blocks(Y):
        wb = None if w is None else w[start:start + block.shape[0]]
        a, b = _column_sums_block(block, wb, integer)
        lg += a
        sat += b
        start += block.shape[0]
    return lg, sat


def _column_sums_block(Y, w=None, integer=None):
    """Per gene: sum of w lgamma(y + 1), and the saturated log-likelihood
    sum of w (y log y - y - lgamma(y + 1)); zeros contribute nothing to either.

    ``w=None`` means unit weights; ``integer`` (whether every count is an integer)
    is checked here when not given. Counts are looked up in tables of lgamma(y + 1)
    and y log y rather than evaluated: one pass per table over the stored values."""
    if sp.issparse(Y):
        Y = Y.tocsc()
        y = Y.data
        wy = None if w is None else w[Y.indices]
        # per-column sums of the stored values: reduceat over the non-empty columns
        # (their segments end where the next non-empty one starts); empty ones sum to 0
        filled = np.diff(Y.indptr) > 0
        starts = Y.indptr[:-1][filled]

        def per_gene(v):
            out = np.zeros(filled.size)
            if starts.size:
                out[filled] = np.add.reduceat(v, starts)
            return out

    else:
        y = Y
        wy = None if w is None else w[:, None]
        per_gene = lambda v: v.sum(axis=0)  # noqa: E731
    if integer is None:
        integer = bool(np.all(y == np.round(y)))
    top = y.max() if y.size else 0.0
    if integer and top < 1e6:
        values = np.arange(int(top) + 1, dtype=float)
        idx = y.astype(np.int64)
        lg_y = scipy.special.gammaln(values + 1.0)[idx]
        ylogy = scipy.special.xlogy(values, values)[idx]
    else:
        lg_y, ylogy = scipy.special.gammaln(y + 1.0), scipy.special.xlogy(y, y)
    if wy is None:
        lg = per_gene(lg_y)
        return lg, per_gene(ylogy) - per_gene(y) - lg
    lg_y *= wy
    return per_gene(lg_y), per_gene((ylogy - y) * wy - lg_y)


def poisson_d2_by_column(Y, mu, w=None):
    """Poisson D^2 of each column: ``1 - D(y, mu) / D(y, weighted mean of y)``.

    ``Y`` (n, G) dense or sparse counts, ``mu`` (n, G) predictions; NaN for columns
    that are constant (all zero included: no deviance to explain). The ``y log y`` terms are summed over
    the non-zero counts only, so sparse ``Y`` is never densified.
    """
    Y = sp.csc_matrix(Y, dtype=float)
    Y.eliminate_zeros()
    n, G = Y.shape
    w = np.ones(n) if w is None else np.asarray(w, dtype=float)
    cols = np.repeat(np.arange(G), np.diff(Y.indptr))
    rows, y = Y.indices, Y.data
    wy = w[rows] * y
    sum_wy = np.bincount(cols, weights=wy, minlength=G)
    ybar = sum_wy / np.sum(w)
    with np.errstate(divide="ignore", invalid="ignore"):
        ylogy = np.bincount(cols, weights=wy * np.log(y), minlength=G)
        dev = 2 * (ylogy - np.bincount(cols, weights=wy * np.log(mu[rows, cols]), minlength=G) - sum_wy + w @ mu)
        dev0 = 2 * (ylogy - sum_wy * np.log(ybar))  # sum w (ybar - y) = 0
        # a constant column has dev0 = 0 up to the rounding of its two terms
        explained = (sum_wy > 0) & (dev0 > 1e-12 * (np.abs(ylogy) + sum_wy))
        return np.where(explained, 1.0 - dev / dev0, np.nan)


def bh_columns(p):
    """Benjamini-Hochberg q-values of each column of ``p`` (genes x tests), NaN kept."""
    q = np.full_like(p, np.nan)
    for m in range(p.shape[1]):
        ok = np.isfinite(p[:, m])
        if ok.any():
            q[ok, m] = scipy.stats.false_discovery_control(p[ok, m], method="bh")
    return q


def wald_contrasts(beta, cov, contrasts, names, *, contrast_names=None, df=None):
    """Wald tests of ``C beta`` for every gene, with Benjamini-Hochberg q-values.

    Parameters
    ----------
    beta : (G, p); cov : (G, p, p); contrasts : (m, p) or (p,)
    names : gene names
    df : (m,) reference degrees of freedom of each contrast (t); None or inf: normal

    Returns
    -------
    DataFrame with gene, contrast, estimate, std_error, statistic, df, p_value,
    q_value (BH within each contrast, over the genes with a finite p-value) and
    distribution ("t" or "normal").
    """
    C = np.atleast_2d(np.asarray(contrasts, dtype=float))
    if C.shape[1] != beta.shape[1]:
        raise ValueError(f"contrasts must have {beta.shape[1]} columns (one per fixed effect), got {C.shape[1]}.")
    est = np.nan_to_num(beta, nan=0.0) @ C.T  # aliased columns enter with weight 0
    var = np.einsum("mp,gpq,mq->gm", C, np.nan_to_num(cov), C)
    bad = np.isnan(beta).all(axis=1)
    est[bad], var[bad] = np.nan, np.nan
    se = np.sqrt(var)
    dfs = np.broadcast_to(np.full(C.shape[0], np.inf) if df is None else np.asarray(df, dtype=float), est.shape)
    inf = inference_columns(est, se, dfs)
    q = bh_columns(inf["p_value"])
    labels = contrast_names or [f"contrast{m}" for m in range(C.shape[0])]
    G = beta.shape[0]
    return pd.DataFrame(
        {
            "gene": np.tile(np.asarray(names, dtype=object), C.shape[0]),
            "contrast": np.repeat(labels, G),
            "estimate": est.T.ravel(),
            "std_error": se.T.ravel(),
            **{k: np.ravel(v.T) for k, v in inf.items() if k != "distribution"},
            "q_value": q.T.ravel(),
            "distribution": inf["distribution"].T.ravel(),
        }
    )
