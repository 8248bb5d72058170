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
    read, checked and distilled a chunk of genes at a time (:func:`gene_groups`)."""
    m = used.size
    whole = reader.view is not None and m == reader.G
    Yt = reader.view if whole else _stream.CompactCounts(m, n)
    if distillation is not None:
        if distillation.offsets.shape != (n, G):
            raise ValueError(f"distillation.offsets has shape {distillation.offsets.shape}, expected {(n, G)}.")
        if not whole:
            for sl in gene_groups(m, n):
                Yt.put(sl, reader.block(used[sl]))
        Ot = distillation.offsets.T if m == G else distillation.offsets.T[used]
        return _blocks.compact(Yt), np.ascontiguousarray(Ot), np.asarray(distillation.size)[used]
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


def distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G):
    """Counts and offsets (gene-major), sizes and number of unconverged fits of the
    genes ``used[sl]``, a chunk of :func:`gene_groups`."""
    Yc = reader.block(used[sl])
    fixed = None if size is None else np.broadcast_to(size, (G,))[used[sl]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # one warning for all chunks
        sub = _distill.distill(Yc.T, covariates, family=family, size=fixed, n_jobs=n_jobs)
    return Yc, sub.offsets.T, sub.size, int((~sub.converged).sum())


def warn_distillation(bad):
    if bad:
        warnings.warn(f"the distillation GLM did not converge for {bad} gene(s).", ConvergenceWarning, stacklevel=4)



def streamed_test(reader, used, gpos, pj, X, T, Tcsc, covariates, family, size, propensity, seeds, statistic,
                   xp_dev, n_jobs, stats, bar, G):
    """Conditional resampling with the gene data held a chunk of genes at a time.

    The treatment models are fitted first, by the rounds of :func:`conditional_rounds`,
    keeping their coefficients (:class:`~skmixed.offset._stream.Propensities`). Then the
    genes are read and distilled chunk by chunk (:func:`distill_chunk`); a block of pairs
    runs, whole, in the chunk of its last gene, its perturbation's probabilities
    recomputed from the coefficients; the rows of genes whose blocks are still to run are
    carried to the next chunk, the others dropped. Every number is computed by the
    arithmetic of the resident path (same blocks, same fits): the results are the same
    to the last digit. Fills ``stats``; returns the pairs' estimates and genes' sizes."""
    m, n, K = used.size, X.shape[0], gpos.size
    chunk_of = np.empty(m, np.int64)
    for c, sl in enumerate(gene_groups(m, n)):
        chunk_of[sl] = c
    store = _stream.Propensities(X)
    logger.info("resampling_test: treatment model of %d perturbations", np.unique(pj).size)
    blocks = [b for r in _blocks.conditional_rounds(pj, T, X, propensity, seeds, stats.shape[1] - 1, n_jobs, store)
              for b in r]
    run_at = np.array([int(chunk_of[gpos[idx]].max()) for idx, _, _ in blocks], np.int64)
    last_use = np.full(m, -1)  # the last chunk whose blocks read a gene's row
    for (idx, _, _), c in zip(blocks, run_at):
        np.maximum.at(last_use, gpos[idx], c)
    sizes, phi, coef = np.empty(m), np.zeros(K), np.empty(K)
    obs, obs_poisson = np.empty(K), np.empty(K)
    rows, Y, O, shift = np.zeros(0, np.int64), np.zeros((0, n), np.int32), np.zeros((0, n)), np.zeros(0)
    bad = 0
    logger.info("resampling_test: distillation (%s GLM) of %d genes on %d cells", family, m, n)
    with Engine(n_jobs=n_jobs, client=None if xp_dev is np else False) as pool:
        for c, sl in enumerate(gene_groups(m, n)):
            Yc, Oc, sc, b = distill_chunk(reader, used, sl, covariates, family, size, n_jobs, G)
            bad += b
            sizes[sl] = np.inf if family == "poisson" else sc
            compact = _stream.CompactCounts(*Yc.shape)
            compact.put(slice(None), Yc)
            del Yc  # the float64 block: only the compact counts stay
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
            args = (Y, O, shift, gloc[here], pj[here], phi[here], Tcsc, statistic)
            coef[here], obs[here] = _blocks.observed_statistics(*args, nb=family != "poisson")
            if family != "poisson" and not np.any(phi[here] > 0):
                # the Wald formula of the resident path is that of all pairs: Poisson's if
                # no gene is overdispersed, known once every chunk is distilled
                obs_poisson[here] = _blocks.observed_statistics(*args, nb=False)[1]
            _blocks.run_blocks(pool, pool.share(functools.partial(_blocks.run_block, Y, O, shift, gloc, phi, statistic, xp_dev)),
                        [b for b, r in zip(blocks, run_at) if r == c], stats, bar)
            later = [b for b, r in zip(blocks, run_at) if r > c]
            store.release({int(pj[idx[0]]) for idx, _, _ in later})
            keep = last_use[rows] > c
            rows, Y, O, shift = rows[keep], Y[keep], O[keep], shift[keep]
    warn_distillation(bad)
    stats[:, 0] = obs if family == "poisson" or np.any(phi > 0) else obs_poisson
    return coef, sizes
