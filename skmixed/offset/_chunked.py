"""The gene data of the resampling test, read, checked and distilled a chunk of genes
at a time (see :mod:`skmixed.offset._stream` for the budgets), and the streamed test
that never holds every gene of ``pairs``."""

from __future__ import annotations

import functools
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

from .._parallel import Engine
from .._progress import logger
from . import _blocks, _distill, _stream


def gene_groups(m, n):
    """The chunks of genes read, checked and distilled together: runs of whole
    :func:`distill` chunks, so the fits are those of one call on every gene."""
    return _stream.grouped(_stream.column_chunks(m, n), n, _stream.READ_BUDGET)


def gene_data(reader, used, covariates, family, size, distillation, n_jobs, G, n):
    """Gene-major counts (compact) and offsets of the genes ``used``, and their sizes:
    read, checked and distilled a chunk of genes at a time (:func:`gene_groups`); with
    a ``distillation`` only the counts are read."""
    m = used.size
    whole = reader.view is not None and m == reader.G
    Yt = reader.view if whole else _stream.CompactCounts(m, n)
    if distillation is not None:
        check_distillation(distillation, n, G)
        if not whole:
            for sl in gene_groups(m, n):
                Yt.put(sl, reader.block(used[sl]))
        Ot = distillation.offsets.T if m == G else distillation.offsets.T[used]
        return _blocks.compact(Yt), np.ascontiguousarray(Ot), np.asarray(distillation.size, dtype=float)[used]
    logger.info("resampling_test: distillation (%s GLM) of %d genes on %d cells", family, m, n)
    Ot = np.empty((m, n))
    sizes = np.empty(m)
    bad = 0
    for sl in gene_groups(m, n):
        Yc, Ot[sl], sizes[sl], b = distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G)
        if not whole:
            Yt.put(sl, Yc)
        bad += b
    warn_distillation(bad)
    return _blocks.compact(Yt), Ot, sizes


def check_distillation(distillation, n, G):
    if distillation.offsets.shape != (n, G):
        raise ValueError(f"distillation.offsets has shape {distillation.offsets.shape}, expected {(n, G)}.")


def chunk_data(reader, used, sl, covariates, family, size, distillation, n_jobs, G):
    """:func:`distill_chunk`, or with a ``distillation`` the counts read and the
    offsets and sizes taken from it (the same numbers as :func:`gene_data`'s)."""
    if distillation is None:
        return distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G)
    Oc = np.ascontiguousarray(distillation.offsets.T[used[sl]])
    return reader.block(used[sl]), Oc, np.asarray(distillation.size, dtype=float)[used[sl]], 0


def distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G):
    """Counts and offsets (gene-major), sizes and number of unconverged fits of the
    genes ``used[sl]``, a chunk of :func:`gene_groups`."""
    Yc = reader.block(used[sl])
    fixed = None if size is None else np.broadcast_to(size, (G,))[used[sl]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # one warning for all chunks
        warnings.simplefilter("ignore", _distill.NoCountsWarning)  # the pairs' flag says it
        sub = _distill.distill(Yc.T, covariates, family=family, size=fixed, n_jobs=n_jobs)
    return Yc, sub.offsets.T, sub.size, int((~sub.converged).sum())


def warn_distillation(bad):
    if bad:
        warnings.warn(f"the distillation GLM did not converge for {bad} gene(s).", ConvergenceWarning, stacklevel=4)



def streamed_test(reader, used, gpos, pj, X, T, Tcsc, covariates, family, size, distillation, propensity, seeds,
                  full, tested, statistic, xp_dev, n_jobs, stats, bar, G):
    """The test with the gene data held a chunk of genes at a time.

    Conditional resampling (``full`` None): the treatment models are fitted first, by
    the rounds of :func:`~skmixed.offset._blocks.conditional_rounds`, keeping their
    coefficients (:class:`~skmixed.offset._stream.Propensities`); a block of pairs runs,
    whole, in the chunk of its last gene, its perturbation's probabilities recomputed
    from the coefficients, and the rows of genes whose blocks are still to run are
    carried to the next chunk. Permutations (``full``: the shared ordered resamples,
    drawn once from their own seed): the pairs of a chunk's genes (those ``tested``)
    are blocked and run in that chunk, nothing is carried (a pair's statistics do not
    depend on its block-mates, see :func:`~skmixed.offset._blocks.permutation_blocks`).
    The genes are
    read and distilled chunk by chunk (:func:`chunk_data`; only read, with a given
    ``distillation``). Every number is computed by the arithmetic of the resident path
    (same draws, same fits): the results are the same to the last digit. Fills
    ``stats``; returns the pairs' estimates, the genes' sizes and which genes have no
    counts."""
    m, n, K = used.size, X.shape[0], gpos.size
    chunk_of = np.empty(m, np.int64)
    for c, sl in enumerate(gene_groups(m, n)):
        chunk_of[sl] = c
    last_use = chunk_of.copy()  # the last chunk whose blocks read a gene's row
    if full is None:
        store = _stream.Propensities(X)
        logger.info("resampling_test: treatment model of %d perturbations", np.unique(pj).size)
        blocks = [b for r in _blocks.conditional_rounds(pj, T, X, propensity, seeds, stats.shape[1] - 1, n_jobs, store)
                  for b in r]
        run_at = np.array([int(chunk_of[gpos[b[0]]].max()) for b in blocks], np.int64)
        for b, c in zip(blocks, run_at):
            np.maximum.at(last_use, gpos[b[0]], c)
    k = np.diff(Tcsc.indptr)[pj]
    sizes, phi, coef, zero = np.empty(m), np.zeros(K), np.empty(K), np.empty(m, bool)
    rows, Y, O, shift = np.zeros(0, np.int64), np.zeros((0, n), np.int32), np.zeros((0, n)), np.zeros(0)
    bad = 0
    if distillation is None:
        logger.info("resampling_test: distillation (%s GLM) of %d genes on %d cells", family, m, n)
    else:
        check_distillation(distillation, n, G)
    with Engine(n_jobs=n_jobs, client=None if xp_dev is np else False) as pool:
        for c, sl in enumerate(gene_groups(m, n)):
            Yc, Oc, sc, b = chunk_data(reader, used, sl, covariates, family, size, distillation, n_jobs, G)
            bad += b
            sizes[sl] = np.inf if family == "poisson" else sc
            compact = _stream.CompactCounts(*Yc.shape)
            compact.put(slice(None), Yc)
            del Yc  # the float64 block: only the compact counts stay
            zero[sl] = ~np.any(compact.values, axis=1)
            shift = np.concatenate([shift, np.max(Oc, axis=1) if n else np.zeros(Oc.shape[0])])
            rows = np.concatenate([rows, np.arange(sl.start, sl.stop)])
            if Y.shape[0]:
                Y, O = np.concatenate([Y, compact.values]), np.concatenate([O, Oc])
            else:  # nothing carried: the chunk's arrays, not copies
                Y, O = compact.values, Oc
            del compact, Oc
            local = np.full(m, -1)
            local[rows] = np.arange(rows.size)
            gloc = local[gpos]
            here = np.flatnonzero(chunk_of[gpos] == c)
            s_here = sizes[gpos[here]]
            phi[here] = np.where(np.isfinite(s_here), 1.0 / s_here, 0.0)
            coef[here], stats[here, 0] = _blocks.observed_statistics(Y, O, shift, gloc[here], pj[here], phi[here],
                                                                     Tcsc, statistic)
            if full is None:
                now = [b for b, r in zip(blocks, run_at) if r == c]
            else:
                run = here[tested[here]]
                now = _blocks.permutation_blocks(k[run], full, run)
            block = functools.partial(_blocks.run_block, Y, O, shift, gloc, phi, statistic, xp_dev)
            _blocks.run_blocks(pool, pool.share(block), now, stats, bar)
            if full is None:
                store.release({int(pj[b[0][0]]) for b, r in zip(blocks, run_at) if r > c})
            keep = last_use[rows] > c
            rows, Y, O, shift = rows[keep], Y[keep], O[keep], shift[keep]
    warn_distillation(bad)
    return coef, sizes, zero
