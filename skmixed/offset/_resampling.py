"""SCEPTRE-style resampling tests of perturbation effects, built on the
mean-plus-offset model.

For a gene ``g`` and a perturbation ``p``:

1. *Distillation*: a Poisson or NB GLM of the gene's counts on the technical
   covariates (no treatment), fitted once per gene with :func:`skmixed.glm._newton.fit_glm`;
   its linear predictor is the offset ``o_i`` and its size the NB size.
2. *Statistic*: the NB (or Poisson) mean-plus-offset fit on the treated cells, that is
   :class:`~skmixed.offset.NegBinOffsetMean` with ``sample_weight`` = the treatment
   indicator: the Wald ``z`` of the closed-form estimate (default), or the score
   statistic at ``beta = 0``.
3. *Resamples*: the treatment indicator is redrawn ``B`` times, by permutation or
   (SCEPTRE) conditionally on the covariates, ``T*_i ~ Bernoulli(pi_i)`` with ``pi_i``
   from a logistic regression of the treatment on the covariates.
4. *p-values*: empirical, ``(1 + #{z* <= z}) / (B + 1)`` (per side), and from a
   skew-normal fitted to the ``B`` resampled statistics (method of moments), which
   resolves p-values below ``1 / (B + 1)``.

Resamples are shared wherever their law allows (see :mod:`skmixed.offset._engine`):

* permutations: the null of a pair depends only on its number ``k`` of treated cells,
  so one set of ``B`` ordered samples of cells serves every pair, a pair using the
  first ``k`` cells of each (SCEPTRE's reuse of resamples across pairs, extended to
  every ``k`` by the prefix property of :func:`~skmixed.offset._engine.permutation_orderings`);
* conditional resampling: the pairs of one perturbation share its resamples; a
  perturbation with fewer than 8 pairs is packed with others of similar treatment
  probabilities, and they share common random numbers ``U[i, b]``
  (``T*_p[i, b] = 1{U[i, b] < pi_p[i]}``): each perturbation's resamples are still
  independent Bernoulli draws, the packed perturbations' resamples are dependent.

The statistics of a block of pairs over all ``B`` resamples are sums over the
(cell, resample) elements, at a cost proportional to the number of treated cells
summed over the resamples, shared by the block's pairs.

Memory (see :mod:`skmixed.offset._stream`): the genes in pairs are read (from a backed
AnnData: a chunk of columns of the file at a time), checked and distilled by chunks, and
kept as int32 counts beside float64 offsets, 12 bytes per cell and gene; the treatment
models are fitted a round of perturbations at a time, whose pairs are tested before the
next round is fitted. From a backed AnnData or a dask array the gene data are not kept
whole (:func:`skmixed.offset._chunked.streamed_test`), with or without a given
distillation: conditional resampling fits the treatment models first, keeping their
coefficients, then distils each chunk of genes and tests the blocks of pairs whose last
gene it holds, carrying the rows of blocks that straddle chunks; permutations block and
test each chunk's pairs in that chunk (a pair's statistics do not depend on its
block-mates). No (cells x perturbations) array of floats is held, and the chunks do not
change the results.

Modules: ``_checks`` (input handling), ``_distill`` (distillation and treatment
models), ``_draws`` (resamples and their seeding), ``_blocks`` (blocks of pairs and
the observed statistics), ``_chunked`` (gene data by chunks, the streamed test),
``_pvalues``; this module ties them together.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pandas as pd

from .._inputs import MatrixReader, count_source
from .._parallel import Engine
from .._progress import check_verbose, logger, progress
from . import _blocks, _chunked, _stream
from ._checks import (
    ALTERNATIVES,
    count_labels,
    design,
    device_namespace,
    entropy,
    host,
    indicator_csc,
    pair_indices,
    treatment_matrix,
)
from ._distill import Distillation, distill, treatment_probabilities
from ._draws import conditional_resamples, permutation_resamples, perturbation_rng
from ._pvalues import resampling_pvalues, skewnorm_moments

__all__ = [
    "Distillation",
    "conditional_resamples",
    "distill",
    "permutation_resamples",
    "perturbation_rng",
    "resampling_pvalues",
    "resampling_test",
    "skewnorm_moments",
    "treatment_probabilities",
]


# -------------------------------------------------------------------------- test
def resampling_test(
    counts,
    treatment,
    covariates=None,
    *,
    pairs=None,
    n_resamples=500,
    resampling="conditional",
    statistic="wald",
    family="negative_binomial",
    size=None,
    alternative="two-sided",
    distillation=None,
    propensity=None,
    n_jobs=1,
    device=None,
    random_state=None,
    return_resampled=False,
    min_treated=7,
    layer=None,
    verbose=0,
):
    """SCEPTRE-style test of every (gene, perturbation) pair.

    Parameters
    ----------
    counts : array-like of shape (n_cells, n_genes)
        Counts (DataFrame, ndarray or sparse).
    treatment : array-like of shape (n_cells, n_perturbations)
        0/1 (or bool) treatment indicators, e.g. thresholded gRNA counts.
    covariates : array-like of shape (n_cells, n_covariates), optional
        Technical covariates (an intercept is added), used by the distillation GLM and
        the treatment model.
    pairs : array-like of shape (n_pairs, 2), optional
        (gene, perturbation) pairs, as column labels of DataFrames or integer
        positions; default every combination.
    n_resamples : int, default=500
    resampling : {"conditional", "permutation"}, default="conditional"
        Conditional resampling from a logistic treatment model (SCEPTRE), or
        permutations (valid when treatment is independent of the covariates).
        Resamples are shared among pairs: permutations by every pair (a pair with
        ``k`` treated cells uses the first ``k`` cells of shared ordered samples);
        conditional resamples by a perturbation's pairs, and through common random
        numbers by perturbations with fewer than 8 pairs (each perturbation's
        resamples keep their law; see the user guide).
    statistic : {"wald", "score"}, default="wald"
        Wald z of the closed-form estimate on the treated cells (where the treated
        counts are all zero the estimate is ``-inf`` and so is the statistic), or the
        score statistic for ``beta = 0`` (linear in the treatment: cheaper, no
        boundary, monotone in the treated counts).
    family : {"negative_binomial", "poisson"}, default="negative_binomial"
    size : None, float or array of shape (n_genes,)
        NB sizes; None estimates them in the distillation.
    alternative : {"two-sided", "less", "greater"}
    distillation : Distillation, optional
        Precomputed :func:`distill` result for all genes (skips that fit). The counts
        are still read (the statistics sum them over treated cells): from a backed
        AnnData or a dask array, a chunk of genes at a time.
    propensity : array-like of shape (n_cells, n_perturbations), optional
        Precomputed treatment probabilities (:func:`treatment_probabilities`) for the
        conditional resamples (skips that fit). Without it the probabilities are fitted
        a round of perturbations at a time and never held whole (a screen of 200,000
        cells and 6,600 perturbations would need 10.6 GB for them).
    n_jobs : int, default=1
        Threads over blocks of pairs (results do not depend on it). Within
        ``skmixed.parallel_config(client=...)`` the blocks run on that Dask cluster
        instead (same results).
    device : {None, "cpu", "gpu"}, default=None
        Where the resampled statistics are computed. ``"gpu"`` runs the block sums on
        CuPy arrays (through :mod:`skmixed._backend`); None follows the counts (CuPy
        counts: GPU). Input checks, the draws (numpy generators: the resamples, hence
        the results, are those of the CPU), the observed statistics and the p-values
        stay on the host; the returned table is on the host.
    random_state : int, numpy Generator or None
    return_resampled : bool
        Also return the resampled statistics, shape (n_pairs, n_resamples) (NaN for
        the pairs not tested).
    min_treated : int, default=7
        Pairs whose perturbation has fewer treated cells, or fewer untreated cells, are
        not tested (SCEPTRE's quality control also asks for 7): their p-values are NaN
        and ``flag`` says why.
    layer : str or None, default=None
        For AnnData counts: the layer with the raw counts (None: ``layers["counts"]``
        when present, else ``.X``). Gene names come from ``var_names``.
    verbose : int, default=0
        ``verbose >= 1`` shows a progress bar of the pairs tested (tqdm, advanced
        block by block, with an ETA); 0 is silent.

    Returns
    -------
    results : DataFrame, one row per pair
        gene, perturbation, n_treated, coef (closed-form ``beta`` on the treated
        cells), statistic, p_empirical, p_skewnorm, pvalue (skew-normal where its fit
        passes a KS check, else empirical), skewnorm_ok, sn_shape, sn_loc, sn_scale,
        size (of the gene), flag (``""`` for a tested pair; ``"no_treated_cells"``,
        ``"too_few_treated_cells"``, ``"no_control_cells"`` or ``"too_few_control_cells"``
        for the perturbation, else ``"all_zero_gene"`` for a gene without a count in any
        cell: p-values NaN; a gene without counts also has NaN coef, statistic and
        size, whatever its flag). A pair whose treated counts are all
        zero has Wald statistic ``-inf``, the most extreme value on the left: its
        empirical p-value counts the resamples that are also ``-inf`` (ties count as
        extreme), and the skew-normal is not used.
    resampled : ndarray of shape (n_pairs, n_resamples)
        Only with ``return_resampled=True``.

    Examples
    --------
    >>> from skmixed.offset import make_perturbation_screen, resampling_test
    >>> counts, treatment, covariates, _ = make_perturbation_screen(800, 3, 2, random_state=0)
    >>> res = resampling_test(counts, treatment, covariates, n_resamples=99, random_state=0)
    >>> res.shape[0]
    6
    """
    if resampling not in ("conditional", "permutation"):
        raise ValueError(f"resampling must be 'conditional' or 'permutation', got {resampling!r}.")
    if statistic not in ("wald", "score"):
        raise ValueError(f"statistic must be 'wald' or 'score', got {statistic!r}.")
    if family not in ("poisson", "negative_binomial"):
        raise ValueError(f"family must be 'poisson' or 'negative_binomial', got {family!r}.")
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {ALTERNATIVES}, got {alternative!r}.")
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an integer >= 2, got {n_resamples!r}.")
    if not isinstance(min_treated, (int, np.integer)) or isinstance(min_treated, bool) or min_treated < 1:
        raise ValueError(f"min_treated must be an integer >= 1, got {min_treated!r}.")
    verbose = check_verbose(verbose)
    src = count_source(counts, layer=layer, arg="counts", stream=True)  # backed: read later, genes in pairs only
    counts = src.values
    xp_dev = device_namespace(device, counts)
    counts, treatment, covariates, propensity = (
        None if a is None else host(a) for a in (counts, treatment, covariates, propensity))
    genes, n = count_labels(counts)
    if src.names is not None:
        genes = list(src.names)
    G = len(genes)
    T, perts = treatment_matrix(treatment, n)
    gi, pj = pair_indices(pairs, genes, perts)
    used, gpos = np.unique(gi, return_inverse=True)  # genes in pairs; pair -> position
    X = design(covariates, n)
    used_p = np.unique(pj)
    if resampling == "conditional" and propensity is not None:
        propensity = propensity.to_numpy() if isinstance(propensity, pd.DataFrame) else np.asarray(propensity)
        propensity = propensity.astype(np.float64, copy=False)
        if propensity.shape != T.shape:
            raise ValueError(f"propensity must be probabilities of shape {T.shape}, got {propensity.shape}.")
        if propensity.size and not (0.0 <= float(np.min(propensity)) and float(np.max(propensity)) <= 1.0):
            raise ValueError(f"propensity must be probabilities of shape {T.shape} (in [0, 1]).")  # NaN fails too

    B = int(n_resamples)
    K = gi.size
    Tcsc = indicator_csc(T)
    n_treated = np.diff(Tcsc.indptr)[pj]
    n_control = n - n_treated
    flag = np.select(
        [n_treated == 0, n_treated < min_treated, n_control == 0, n_control < min_treated],
        ["no_treated_cells", "too_few_treated_cells", "no_control_cells", "too_few_control_cells"],
        default="",
    ).astype(object)
    # the pert's children seed its resamples; the extra last child seeds the permutations
    seeds = np.random.SeedSequence(entropy(random_state)).spawn(T.shape[1] + 1)
    stats = np.empty((K, B + 1))
    full = None
    if resampling == "permutation":
        # drawn for the pairs with a test only (an all-treated perturbation would ask for
        # B orderings of every cell); a pair's draws do not depend on the largest k
        runs = flag == ""
        full = _blocks.permutation_elements(int(n_treated[runs].max()) if runs.any() else 0, B, seeds[-1], n)
        stats[~runs, 1:] = np.nan
    reader = _stream.CountChunks(counts, src)
    logger.info("resampling_test: %d pairs (%d genes, %d perturbations), %d resamples",
                K, used.size, used_p.size, B)
    bar = progress(total=K, desc="resampling_test pairs", unit="pair", verbose=verbose)
    if full is not None:
        bar.update(int(np.sum(~runs)))
    # a backed AnnData (or dask array): the gene data are held a chunk at a time
    if isinstance(reader.A, MatrixReader) and len(_chunked.gene_groups(used.size, n)) > 1:
        logger.info("resampling_test: genes by chunks")
        coef, sizes, zero = _chunked.streamed_test(
            reader, used, gpos, pj, X, T, Tcsc, covariates, family, size, distillation, propensity, seeds, full,
            None if full is None else runs, statistic, xp_dev, n_jobs, stats, bar, G)
    else:
        Yt, Ot, sizes = _chunked.gene_data(reader, used, covariates, family, size, distillation, n_jobs, G, n)
        zero = ~np.any(Yt, axis=1)
        if family == "poisson":
            sizes = np.full(used.size, np.inf)
        phi = np.where(np.isfinite(sizes), 1.0 / sizes, 0.0)[gpos]  # per pair; 0: Poisson
        gshift = np.max(Ot, axis=1) if Ot.shape[1] else np.zeros(Ot.shape[0])
        coef, stats[:, 0] = _blocks.observed_statistics(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic)
        if full is not None:
            rounds = iter([_blocks.permutation_blocks(n_treated[runs], full, np.flatnonzero(runs))])
        else:
            # the treatment models are fitted round by round of perturbations, each round's
            # pairs tested before the next round is fitted (see _stream)
            logger.info("resampling_test: treatment model of %d perturbations", used_p.size)
            rounds = _blocks.conditional_rounds(pj, T, X, propensity, seeds, B, n_jobs)
        run = functools.partial(_blocks.run_block, Yt, Ot, gshift, gpos, phi, statistic, xp_dev)
        # blocks through skmixed._parallel: n_jobs threads, or the Dask client of
        # parallel_config (the GPU path stays in-process); run and the gene data it closes
        # over go to a cluster once, a round's blocks once, the tasks get block numbers
        with Engine(n_jobs=n_jobs, client=None if xp_dev is np else False) as pool:
            run_h = pool.share(run)
            for blocks in rounds:
                _blocks.run_blocks(pool, run_h, blocks, stats, bar)
                del blocks  # this round's probabilities go before the next round is fitted
    bar.close()
    stats[n_treated == 0, 0] = np.nan
    # a gene without a count has no distillation (its offsets run off to -inf) and no
    # statistic: the Wald statistic would be -inf on every resample (p = 1), the score
    # statistic ~0 against resamples of ~0 (p anywhere); not tested, not silently wrong
    no_counts = zero[gpos]
    empty = no_counts & (flag == "")  # a perturbation's flag, if any, comes first
    flag[empty] = "all_zero_gene"
    untested = flag != ""
    stats[untested, 1:] = np.nan
    stats[no_counts, 0] = np.nan
    coef = np.where(no_counts, np.nan, coef)
    sizes = np.where(zero, np.nan, sizes)
    pv = resampling_pvalues(np.where(untested, np.nan, stats[:, 0]), stats[:, 1:], alternative)
    out = pd.DataFrame(
        {"gene": [genes[i] for i in gi], "perturbation": [perts[j] for j in pj], "n_treated": n_treated,
         "coef": coef, "statistic": stats[:, 0]}
    )
    out = pd.concat([out, pv], axis=1)
    out["size"] = sizes[gpos]
    out["flag"] = flag.astype(str)
    if untested.any():
        warnings.warn(
            f"{int(untested.sum())} of {K} pairs were not tested ({int(untested.sum() - empty.sum())} with fewer "
            f"than min_treated={min_treated} treated or untreated cells, {int(np.sum(n_treated == 0))} of them with "
            f"no treated cell and {int(np.sum(n_control == 0))} with no untreated cell; {int(empty.sum())} of a gene "
            "without counts): their p-values are NaN, see the 'flag' column.",
            UserWarning,
            stacklevel=2,
        )
    if return_resampled:
        return out, stats[:, 1:]
    return out
