"""ZINBWaVE: zinbwave's zero-inflated negative binomial factor model as a transformer."""

from __future__ import annotations

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from .._backend import get_namespace, to_host
from .._families import ZINB
from .._inputs import check_obsm_key, write_obsm
from .._parallel import Engine
from .._progress import logger, progress
from ._data import Counts
from ._init import initialize, initialize_cells
from ._input import check_count_matrix, check_design, check_nonempty, check_offset, fingerprint
from ._stream import Scan, StreamedCounts
from ._model import Design, Params, Penalty
from ._optimize import Optimizer
from ._schedule import prefit_dispersion

_PARAM_NAMES = ("beta_mu", "beta_pi", "gamma_mu", "gamma_pi", "W", "alpha_mu", "alpha_pi", "zeta")
_GENE_PARAMS = ("beta_mu", "beta_pi", "alpha_mu", "alpha_pi", "zeta")  # last axis: genes


class ZINBWaVE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """zinbwave's zero-inflated negative binomial model, as a scikit-learn transformer.

    For counts ``Y`` (cells x genes), zinbwave's model (Risso et al., 2018) is

    ``Y_ij ~ pi_ij delta_0 + (1 - pi_ij) NB(mu_ij, theta_j)`` with

    - ``log mu = X beta_mu + (V gamma_mu)' + W alpha_mu + O_mu``,
    - ``logit pi = X beta_pi + (V gamma_pi)' + W alpha_pi + O_pi``,
    - ``log theta_j = zeta_j`` (one common value by default),

    ``X`` the cell covariates (default: an intercept), ``V`` the gene covariates (default:
    an intercept) and ``W`` (cells x K) the latent factors returned by :meth:`transform`.
    The parameters maximise zinbwave's penalised log-likelihood: ridge penalties
    ``eps * par**2 / 2`` with zinbwave's defaults (``epsilon = J`` genes gives 1 for
    ``beta`` and ``alpha``, ``J / n`` for ``gamma`` and ``W``, ``J * var(zeta) / 2`` for the
    dispersions; intercepts unpenalised in the mean model and penalised by 1e-3 in the
    zero-inflation model), so ``penalized_loglik_`` is the number zinbwave maximises.

    Fitting: zinbwave's initialisation (ridge regressions on the log positive counts,
    a trace-norm-penalised low-rank fit of their residuals, logistic regressions of the
    zero indicator), then alternating blockwise Newton steps over all cells and all genes
    at once with per-cell and per-gene line searches (the objective never decreases) and
    zinbwave's rebalancing of ``W`` and ``alpha``. Cells are processed in chunks of
    ``batch_size``: only one chunk of the dense cells x genes intermediates is in memory,
    the count matrix stays sparse, and the per-gene Newton steps use exact sums over all
    chunks. See the user guide, "ZINB-WaVE".

    Parameters
    ----------
    n_components : int, default=2
        Number of latent factors ``K`` (zinbwave's ``K``), at most the number of cells and
        of genes. 0 fits the model without ``W``.
    common_dispersion : bool, default=True
        One dispersion for all genes (zinbwave's default) or one per gene, shrunk
        towards their mean by the ``epsilon_zeta * var(zeta) / 2`` penalty.
    epsilon : float, dict or None, default=None
        zinbwave's regularisation. ``None``: ``epsilon = J`` and zinbwave's derived
        values; a number sets ``epsilon``; a dict may set ``"epsilon"`` and any of
        ``"beta_mu", "gamma_mu", "beta_pi", "gamma_pi", "W", "alpha", "zeta", "min_logit"``
        (zinbwave's ``epsilon_*`` arguments).
    max_iter : int, default=100
        Maximum number of outer iterations (one pass of cell steps, one of gene steps).
    tol : float, default=1e-5
        Stop when the relative gain in penalised log-likelihood over an iteration is
        below ``tol`` (zinbwave's ``stop.epsilon.optimize`` is 1e-4). The alternation
        between cells and genes converges linearly: a smaller ``tol`` keeps improving the
        objective slowly (on pbmc500, K = 10: -2034753 after 20 iterations, -2034274
        after 96, zinbwave -2112223).
    batch_size : int or None, default=None
        Cells per chunk; None picks about 2 million matrix entries per chunk.
    n_jobs : int or None, default=None
        Threads for the elementwise likelihood work on the CPU (None: 1). Matrix
        products use the BLAS threads regardless.
    random_state : int, RandomState instance or None, default=None
        Seeds the randomised SVD of the initialisation.
    verbose : int, default=0
        ``verbose >= 1`` shows a progress bar of the iterations (tqdm) with the
        penalised log-likelihood, its relative gain and an ETA against ``max_iter``, and
        logs each iteration to the ``"skmixed"`` logger; 0 is silent.
    layer : str or None, default=None
        For AnnData input: the layer holding the raw counts. None reads
        ``layers["counts"]`` when present, else ``.X`` (as zinbwave reads the
        ``"counts"`` assay). Non-integer values read from AnnData are an error.
    precision : {"mixed", "double"}, default="mixed"
        ``"mixed"``: the per-cell and per-gene information matrices, the products that
        are most of a fit's arithmetic, are accumulated from float32 products; they only
        steer the Newton directions, while the log-likelihood, the gradients and every
        line search stay float64, so the objective reached is the float64 one (to
        about 1e-7 relative on the benchmarks). ``"double"``: float64 throughout.

    Attributes
    ----------
    W_ : ndarray of shape (n_cells, n_components)
        Latent factors of the training cells (also ``embedding_``).
    alpha_mu_, alpha_pi_ : ndarray of shape (n_components, n_genes)
    beta_mu_, beta_pi_ : ndarray of shape (n_cell_covariates, n_genes)
    gamma_mu_, gamma_pi_ : ndarray of shape (n_gene_covariates, n_cells)
    zeta_ : ndarray of shape (n_genes,)
        Log inverse dispersions ``log theta`` (all equal with a common dispersion).
    dispersion_ : ndarray of shape (n_genes,)
        ``phi = exp(-zeta)``: variance ``mu + phi mu^2``.
    loglik_ : float
        Log-likelihood at the fit (zinbwave's ``loglik``).
    penalty_ : float
        zinbwave's ``penalty`` at the fit.
    penalized_loglik_ : float
        ``loglik_ - penalty_``, the objective maximised.
    objective_history_ : list of float
        Penalised log-likelihood after the initialisation and after each iteration.
    epsilon_ : dict
        The regularisation used (zinbwave's ``epsilon_*`` slots).
    n_iter_ : int
    converged_ : bool
    integer_counts_ : bool
        Whether ``Y`` held integers (non-integer values are fitted, with a warning).
    gene_names_ : ndarray of str or None
        Gene names of an AnnData (``var_names``) or DataFrame (columns) input.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Gene names of a DataFrame or AnnData input. Later AnnData inputs are matched
        by ``var_names`` (reordered when they hold the same genes in another order, an
        error when the genes differ); DataFrames follow scikit-learn's check (same
        columns in the same order).

    See Also
    --------
    skmixed.datasets.make_zinb_counts : simulated counts with known cell types and batches.

    Notes
    -----
    Bad input: NaN or infinite counts, negative counts, cells or genes whose counts are
    all zero (zinbwave stops on them too), covariates or offsets of the wrong shape and
    ``n_components`` above the number of cells or genes raise ``ValueError``;
    non-integer counts are fitted with a ``UserWarning`` and ``integer_counts_ = False``.
    A fit that reaches ``max_iter`` warns (``ConvergenceWarning``) and has
    ``converged_ = False``.

    Examples
    --------
    >>> from skmixed import ZINBWaVE
    >>> from skmixed.datasets import make_zinb_counts
    >>> sim = make_zinb_counts(300, 100, n_clusters=3, random_state=0)
    >>> model = ZINBWaVE(n_components=2, random_state=0).fit(sim.counts)
    >>> model.W_.shape, model.get_feature_names_out().tolist()
    ((300, 2), ['zinbwave0', 'zinbwave1'])
    >>> bool(model.penalized_loglik_ <= model.loglik_)
    True
    """

    _parameter_constraints: dict = {
        "n_components": [Interval(Integral, 0, None, closed="left")],
        "common_dispersion": ["boolean"],
        "epsilon": [None, Interval(Real, 0, None, closed="left"), dict],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "batch_size": [None, Interval(Integral, 1, None, closed="left")],
        "n_jobs": [None, Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "layer": [None, str],
        "precision": [StrOptions({"mixed", "double"})],
    }

    def __init__(
        self,
        n_components=2,
        *,
        common_dispersion=True,
        epsilon=None,
        max_iter=100,
        tol=1e-5,
        batch_size=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
        layer=None,
        precision="mixed",
    ):
        self.n_components = n_components
        self.common_dispersion = common_dispersion
        self.epsilon = epsilon
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.layer = layer
        self.precision = precision

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.sparse = True
        return tags

    @property
    def _n_features_out(self):
        return self.n_components

    @property
    def embedding_(self):
        return self.W_

    # ------------------------------------------------------------------ fitting
    def _info_dtype(self, xp):
        return xp.float32 if self.precision == "mixed" else None

    def _counts(self, Ycsr, xp):
        if isinstance(Ycsr, Scan):  # left on disk: read by chunks of cells in every pass
            return StreamedCounts(Ycsr.reader, self.batch_size, self.n_jobs or 1)
        c = Counts(Ycsr, xp, self.batch_size)
        c.n_threads = self.n_jobs or 1
        return c

    def fit(self, Y, y=None, *, cell_covariates=None, gene_covariates=None, offset=None, offset_pi=None):
        """Fit zinbwave's model to the counts ``Y``.

        Parameters
        ----------
        Y : array-like, sparse matrix or AnnData of shape (n_cells, n_genes)
            Raw counts: a numpy array, DataFrame, ``scipy.sparse`` matrix, CuPy array or
            ``cupyx`` sparse matrix (the fit then runs on the GPU and the fitted
            attributes are CuPy arrays), or an AnnData object (the ``layer``
            parameter's layer; by default ``"counts"`` if present, else ``.X``;
            duck-typed, anndata need not be installed). An AnnData opened with
            ``backed="r"`` or a ``dask.array`` is not loaded: it is read by chunks of
            ``batch_size`` cells in every pass (the initialisation's too), so memory
            holds one chunk and the parameters; the fit is the same (store the file
            CSR, whose rows are contiguous).
        y : None
            Ignored (scikit-learn's signature).
        cell_covariates : array-like of shape (n_cells, M), default=None
            zinbwave's ``X``; ``None`` is an intercept. Covariates replace the default,
            so include the intercept column yourself (as in zinbwave; a first column of
            ones is treated as the intercept of the penalty).
        gene_covariates : array-like of shape (n_genes, L), default=None
            zinbwave's ``V``; ``None`` is an intercept (a per-cell term such as the log
            library size).
        offset : array-like of shape (n_cells,) or (n_cells, n_genes), default=None
            Known term of ``log mu`` (zinbwave's ``O_mu``).
        offset_pi : array-like of shape (n_cells,) or (n_cells, n_genes), default=None
            Known term of ``logit pi`` (zinbwave's ``O_pi``).

        Returns
        -------
        self : ZINBWaVE
        """
        self._validate_params()
        Ycsr, xp, integer, names = check_count_matrix(self, Y, reset=True, stream=True)
        n, J = Ycsr.shape
        K = self.n_components
        if n < 2:
            raise ValueError(f"ZINBWaVE needs at least 2 cells; got n_samples = {n}.")
        if J < 2:
            raise ValueError(f"ZINBWaVE needs at least 2 genes; got n_features = {J}.")
        if K > J:
            raise ValueError(f"n_components={K} must be <= the number of genes, n_features = {J}.")
        if K > n:
            raise ValueError(f"n_components={K} must be <= the number of cells, n_samples = {n}.")
        check_nonempty(Ycsr, xp, names)
        X = check_design(cell_covariates, n, "cell_covariates", xp)
        V = check_design(gene_covariates, J, "gene_covariates", xp)
        off_mu = check_offset(offset, n, J, "offset", xp)
        off_pi = check_offset(offset_pi, n, J, "offset_pi", xp)
        penalty = Penalty.zinbwave(X, V, n, J, self.epsilon)
        design = Design(X, V, off_mu, off_pi, penalty, K)
        counts = self._counts(Ycsr, xp)
        rng = check_random_state(self.random_state)
        gen = np.random.default_rng(rng.randint(2**31 - 1))
        logger.info("ZINBWaVE: %d cells x %d genes, K = %d: initialisation", n, J, K)
        P = initialize(counts, design, K, gen)
        prefit_dispersion(counts, design, P, common=self.common_dispersion, rng=gen)
        # a Dask client of skmixed.parallel_config runs the iterations' passes over the
        # cells on the cluster (CPU arrays only: a GPU fit stays on its device)
        engine = Engine(client=None if xp is np else False)
        opt = Optimizer(counts, design, common_dispersion=self.common_dispersion, info_dtype=self._info_dtype(xp),
                        engine=engine)
        bar = progress(total=self.max_iter, desc="ZINBWaVE iterations", unit="iter", verbose=self.verbose)
        last = [opt.objective(P)[1] if self.verbose else None]

        def callback(it, ll, pll):
            gain = abs(pll - last[0]) / abs(last[0]) if last[0] else float("nan")
            last[0] = pll
            bar.update(1)
            bar.set_postfix_str(f"penalized loglik {pll:.6g}, relative gain {gain:.1e} (tol {self.tol:g})")
            logger.info("ZINBWaVE iteration %d: loglik %.6f, penalized loglik %.6f", it, ll, pll)

        with bar, engine:
            history, converged = opt.run(P, max_iter=self.max_iter, tol=self.tol, callback=callback)
            if converged:  # the bar ends full: max_iter was only the bound of its ETA
                bar.total = bar.n
                bar.refresh()
            ll, pll = opt.objective(P)
        self._store(P, penalty, X, V, ll, pll)
        self.objective_history_ = [float(h) for h in history]
        self.n_iter_ = len(history) - 1
        self.converged_ = bool(converged)
        self.integer_counts_ = integer
        self.gene_names_ = names
        self._train_key = fingerprint(Ycsr, X, off_mu, off_pi)
        if not converged:
            warnings.warn(
                f"ZINBWaVE did not converge in max_iter={self.max_iter} iterations (relative gain "
                f"{abs(history[-1] - history[-2]) / abs(history[-2]):.2e} > tol={self.tol}); "
                "increase max_iter.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _store(self, P, penalty, X, V, ll, pll):
        for name in _PARAM_NAMES:
            setattr(self, name + "_" if name != "W" else "W_", getattr(P, name))
        self.dispersion_ = get_namespace(P.zeta).exp(-P.zeta)
        self.loglik_ = float(ll)
        self.penalized_loglik_ = float(pll)
        self.penalty_ = float(ll - pll)
        self.epsilon_ = dict(penalty.scalars)
        self._penalty = penalty
        self._V = V
        self._n_cell_covariates = X.shape[1]

    def _params(self, W=None, gamma_mu=None, gamma_pi=None):
        return Params(
            beta_mu=self.beta_mu_, beta_pi=self.beta_pi_,
            gamma_mu=self.gamma_mu_ if gamma_mu is None else gamma_mu,
            gamma_pi=self.gamma_pi_ if gamma_pi is None else gamma_pi,
            W=self.W_ if W is None else W,
            alpha_mu=self.alpha_mu_, alpha_pi=self.alpha_pi_, zeta=self.zeta_,
        )

    def _cell_inputs(self, Y, cell_covariates, offset, offset_pi, stream=False):
        """Validated counts (CSR; with ``stream``, the :class:`Scan` of counts left on
        disk), namespace, covariates and offsets of new cells."""
        check_is_fitted(self)
        Ycsr, xp, _, _ = check_count_matrix(self, Y, reset=False, stream=stream)
        n, J = Ycsr.shape
        X = check_design(cell_covariates, n, "cell_covariates", xp)
        if X.shape[1] != self._n_cell_covariates:
            raise ValueError(
                f"cell_covariates has {X.shape[1]} columns but the model was fitted with {self._n_cell_covariates}."
            )
        off_mu = check_offset(offset, n, J, "offset", xp)
        off_pi = check_offset(offset_pi, n, J, "offset_pi", xp)
        return Ycsr, xp, X, off_mu, off_pi

    def _gene_part(self, Ycsr, xp, X, off_mu, off_pi, genes=None):
        """Design, counts and fitted parameters restricted to the columns ``genes``."""
        V, fitted = self._V, self._params()
        if genes is not None:
            cols = genes

            def sub(off):
                return off if off is None or off.ndim == 1 else off[:, cols]

            Ycsr, V, off_mu, off_pi = Ycsr[:, cols], V[cols], sub(off_mu), sub(off_pi)
            fitted = Params(**{
                k: (getattr(fitted, k)[..., cols] if k in _GENE_PARAMS else getattr(fitted, k)) for k in _PARAM_NAMES
            })
        design = Design(X, V, off_mu, off_pi, self._penalty, self.n_components)
        return design, self._counts(Ycsr, xp), fitted

    def _fit_cells(self, design, counts, fitted):
        """Cell parameters fitted by penalised ML with every gene parameter fixed."""
        P = initialize_cells(counts, design, fitted)
        opt = Optimizer(counts, design, common_dispersion=self.common_dispersion, fit_genes=False, fit_zeta=False,
                        info_dtype=self._info_dtype(design.xp))
        opt.run(P, max_iter=self.max_iter, tol=min(self.tol, 1e-8))
        return P

    def _cells(self, Y, cell_covariates, offset, offset_pi, stream=False):
        """Parameters of the cells of ``Y``: the fitted ones for the training cells,
        otherwise fitted with the gene parameters fixed. Returns ``(P, design, counts)``."""
        Ycsr, xp, X, off_mu, off_pi = self._cell_inputs(Y, cell_covariates, offset, offset_pi, stream)
        design, counts, fitted = self._gene_part(Ycsr, xp, X, off_mu, off_pi)
        if fingerprint(Ycsr, X, off_mu, off_pi) == self._train_key:
            return fitted, design, counts
        check_nonempty(Ycsr, xp, genes=False)
        return self._fit_cells(design, counts, fitted), design, counts

    def transform(self, Y, *, cell_covariates=None, offset=None, offset_pi=None, key_added=None):
        """Latent factors ``W`` of the cells of ``Y``.

        For the training data (same counts, covariates and offsets) this is ``W_``; other
        cells get their ``W`` and cell parameters (``gamma_mu``, ``gamma_pi``) fitted by
        penalised maximum likelihood with every gene parameter fixed at the fit.

        Parameters
        ----------
        Y : array-like, sparse matrix or AnnData of shape (n_cells, n_genes)
        cell_covariates, offset, offset_pi : as in :meth:`fit`, for these cells.
        key_added : str or None, default=None
            For an AnnData ``Y``: also store ``W`` in ``Y.obsm[key_added]``, as scanpy
            stores embeddings (``"X_zinbwave"`` is the usual key: ``sc.pp.neighbors(adata,
            use_rep="X_zinbwave")``). None stores nothing.

        Returns
        -------
        W : ndarray of shape (n_cells, n_components)
        """
        P, _, _ = self._cells(Y, cell_covariates, offset, offset_pi, stream=True)
        W = P.W.copy()
        if key_added is not None:
            write_obsm(Y, key_added, W, arg="Y")
        return W

    def fit_transform(self, Y, y=None, *, key_added=None, **fit_params):
        """Fit and return ``W_``; with ``key_added``, also store it in ``Y.obsm[key_added]``.

        Parameters
        ----------
        Y : array-like, sparse matrix or AnnData of shape (n_cells, n_genes)
        y : None
            Ignored.
        key_added : str or None, default=None
            As in :meth:`transform`: ``Y.obsm[key_added] = W`` for an AnnData ``Y``.
        **fit_params
            The keyword arguments of :meth:`fit`.

        Returns
        -------
        W : ndarray of shape (n_cells, n_components)

        Examples
        --------
        >>> import anndata
        >>> from skmixed import ZINBWaVE
        >>> from skmixed.datasets import make_zinb_counts
        >>> sim = make_zinb_counts(200, 60, random_state=0)
        >>> adata = anndata.AnnData(sim.counts)
        >>> W = ZINBWaVE(n_components=2, random_state=0).fit_transform(adata, key_added="X_zinbwave")
        >>> adata.obsm["X_zinbwave"].shape
        (200, 2)
        """
        if key_added is not None:
            check_obsm_key(Y, key_added, arg="Y")  # before the fit, not after it
        W = self.fit(Y, y, **fit_params).W_.copy()
        if key_added is not None:
            write_obsm(Y, key_added, W, arg="Y")
        return W

    # --------------------------------------------------------------- predictions
    def _dense(self, Y, cell_covariates, offset, offset_pi, fn, *, ignore_W=False, with_counts=False):
        P, design, counts = self._cells(Y, cell_covariates, offset, offset_pi)
        if ignore_W:
            P = Params(**{**{k: getattr(P, k) for k in _PARAM_NAMES}, "W": 0.0 * P.W})
        xp = design.xp
        out = xp.empty((counts.n, counts.J))
        for rows in counts.chunks:
            a, b = design.predictors(P, rows)
            if with_counts:
                ri, ci, yv = counts.entries(rows)
                y = xp.zeros(a.shape)
                y.reshape(-1)[ri * a.shape[1] + ci] = yv
                out[rows] = fn(y, a, b, P.zeta[None, :])
            else:
                out[rows] = fn(a, b, P.zeta[None, :])
        return out

    def mu(self, Y, *, cell_covariates=None, offset=None, offset_pi=None):
        """NB means ``mu`` (zinbwave's ``getMu``): the fitted means of the cells of ``Y``
        (imputed expression, free of dropouts).

        Returns
        -------
        ndarray of shape (n_cells, n_genes)
        """
        return self._dense(Y, cell_covariates, offset, offset_pi, lambda a, b, z: get_namespace(a).exp(a))

    def pi(self, Y, *, cell_covariates=None, offset=None, offset_pi=None):
        """Zero-inflation (dropout) probabilities ``pi`` (zinbwave's ``getPi``)."""
        from .._backend import expit  # noqa: PLC0415

        return self._dense(Y, cell_covariates, offset, offset_pi, lambda a, b, z: expit(b))

    def impute(self, Y, *, cell_covariates=None, offset=None, offset_pi=None):
        """zinbwave's ``imputeZeros``: ``Y`` with every zero replaced by
        ``E[NB count | observed zero] = mu * P(dropout | y = 0)``; positive counts unchanged."""

        def fn(y, a, b, z):
            xp = get_namespace(a)
            r = 1.0 - ZINB.nb_posterior_zero(a, b, z)
            return xp.where(y > 0, y, xp.exp(a) * r)

        return self._dense(Y, cell_covariates, offset, offset_pi, fn, with_counts=True)

    def observational_weights(self, Y, *, cell_covariates=None, offset=None, offset_pi=None):
        """zinbwave's ``computeObservationalWeights``: the posterior probability that a
        count comes from the NB component (1 for positive counts), floored at 1e-15.
        Use them as weights for differential expression (e.g. edgeR, DESeq2)."""

        def fn(y, a, b, z):
            xp = get_namespace(a)
            w = xp.where(y > 0, 1.0, ZINB.nb_posterior_zero(a, b, z))
            return xp.maximum(w, 1e-15)

        return self._dense(Y, cell_covariates, offset, offset_pi, fn, with_counts=True)

    def deviance_residuals(self, Y, *, ignore_W=True, cell_covariates=None, offset=None, offset_pi=None):
        """zinbwave's ``computeDevianceResiduals``: ``sign(y - (1 - pi) mu) sqrt(-2 log p(y))``.

        With ``ignore_W=True`` (zinbwave's ``normalizedValues``) ``W`` is set to zero, so
        the values are normalised for the covariates only; ``ignore_W=False`` gives
        zinbwave's ``residuals``. As in zinbwave, a probability that underflows to zero
        is replaced by the smallest positive one of the matrix.
        """

        def fn(y, a, b, z):
            xp = get_namespace(a)
            ll = ZINB.loglik(y, a, b, z)
            sign = xp.where(y - ZINB.mean(a, b) > 0, 1.0, -1.0)
            return -sign * ll  # sign times |log p|, so that one array carries both

        signed = self._dense(Y, cell_covariates, offset, offset_pi, fn, ignore_W=ignore_W, with_counts=True)
        xp = get_namespace(signed)
        ll = -xp.abs(signed)
        finite = xp.isfinite(ll)
        if not bool(xp.all(finite)):
            ll = xp.where(finite, ll, xp.min(ll[finite]))
        return xp.sign(signed) * xp.sqrt(-2.0 * ll)

    def loglik(self, Y, *, cell_covariates=None, offset=None, offset_pi=None):
        """Per-entry log-likelihood ``log p(y_ij)`` (zinbwave's ``zinb.loglik.matrix``)."""
        return self._dense(Y, cell_covariates, offset, offset_pi, ZINB.loglik, with_counts=True)

    def score(self, Y, y=None, *, cell_covariates=None, offset=None, offset_pi=None, n_gene_folds=5):
        """Held-out log-likelihood per matrix entry, by bi-cross-validation over genes.

        The genes are split into ``n_gene_folds`` folds (a fixed random split). For each
        fold, the cell parameters (``W``, ``gamma``) of the cells of ``Y`` are fitted on
        the other genes, with every gene parameter fixed at the fit, and the
        log-likelihood of the fold's entries is evaluated at them. The mean over all
        entries is returned.

        Every entry is thus predicted by parameters that did not see it: the cells'
        own parameters come from other genes and the gene parameters from the training
        cells (the spirit of Owen and Perry's bi-cross-validation). A model with too
        many factors fits the cells' noise on the other genes and predicts the held
        genes worse, so the score peaks near the true number of factors and
        ``GridSearchCV(ZINBWaVE(), {"n_components": [...]})`` selects ``K``. (Fitting a
        cell's parameters on all of its genes and scoring the same entries, as a plain
        held-out-cells likelihood does, rewards every extra factor.) The training data
        are scored the same way, so ``score(Y_train)`` is not ``loglik_ / Y.size``.

        Parameters
        ----------
        Y : array-like, sparse matrix or AnnData of shape (n_cells, n_genes)
        y : None
            Ignored.
        cell_covariates, offset, offset_pi : as in :meth:`fit`, for these cells.
        n_gene_folds : int, default=5
            Number of gene folds (at most the number of genes).

        Returns
        -------
        float
        """
        if not isinstance(n_gene_folds, Integral) or n_gene_folds < 2:
            raise ValueError(f"n_gene_folds must be an integer >= 2, got {n_gene_folds!r}.")
        Ycsr, xp, X, off_mu, off_pi = self._cell_inputs(Y, cell_covariates, offset, offset_pi)
        n, J = Ycsr.shape
        F = min(int(n_gene_folds), J)
        fold = np.random.default_rng(0).permutation(J) % F
        total = 0.0
        for f in range(F):
            held, keep = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
            P = self._fit_cells(*self._gene_part(Ycsr, xp, X, off_mu, off_pi, keep))
            design, counts, fitted = self._gene_part(Ycsr, xp, X, off_mu, off_pi, held)
            fitted.gamma_mu, fitted.gamma_pi, fitted.W = P.gamma_mu, P.gamma_pi, P.W
            opt = Optimizer(counts, design, common_dispersion=self.common_dispersion, fit_genes=False, fit_zeta=False)
            total += float(to_host(opt.loglik_by_gene(fitted).sum()))
        return total / (n * J)
