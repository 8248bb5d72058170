"""Blocks of pairs: which pairs share which resamples (permutation blocks by number of
treated cells; conditional blocks by perturbation, small perturbations packed with
common random numbers), how a block runs on the gene rows it needs, and the observed
statistics of every pair on its treated cells."""

from __future__ import annotations

import functools
import threading

import numpy as np

from .._backend import to_device, to_host
from .._parallel import call_item
from . import _stream
from ._checks import to_namespace
from ._draws import binned_resamples, perturbation_rng
from ._engine import (
    Elements,
    block_statistics,
    column_tables,
    orderings_to_elements,
    permutation_orderings,
)


def compact(Yt):
    return Yt.values if isinstance(Yt, _stream.CompactCounts) else Yt


def run_blocks(pool, run_h, blocks, stats, bar):
    for idx, S in pool.map(call_item, range(len(blocks)), run_h, pool.share(blocks)):
        stats[idx, 1:] = S.T
        bar.update(len(idx))


def run_block(Yt, Ot, gshift, gpos, phi, statistic, xp_dev, block):
    """The resampled statistics (B, columns) of one block of pairs."""
    idx, parts, order, *width = block  # width: see permutation_blocks
    width = width[0] if width else None
    if callable(parts):
        parts, order = parts()
    g = gpos[idx]
    if xp_dev is np:
        size = 2 * Yt.shape[1] * idx.size
        buf = getattr(_TABLES, "buffer", None)
        if buf is None or buf.size < size:
            buf = _TABLES.buffer = np.empty(size)
        cols = column_tables(Yt, Ot, gshift[g], phi[idx], statistic, order=order, rows=g, out=buf)
        return idx, block_statistics(parts, cols, width)
    parts = [(el.to(xp_dev), to_namespace(thr, xp_dev), to_namespace(cthr, xp_dev)) for el, thr, cthr in parts]
    cols = column_tables(*(to_device(a, xp_dev) for a in (Yt[g], Ot[g], gshift[g], phi[idx])), statistic)
    return idx, to_host(block_statistics(parts, cols, width))


# Columns per block: wide enough that the per-element work is shared by many columns,
# narrow enough that the per-cell tables (n x columns) stay moderate.
_MAX_COLUMNS = 32
# Conditional resampling: perturbations with fewer pairs than this are drawn together
# with common random numbers (one union of resamples, masked per perturbation).
_MIN_COLUMNS = 8
_TRANSPOSE_LOCK = threading.Lock()
# per thread: the buffer of the blocks' per-cell tables (see column_tables)
_TABLES = threading.local()


def _transpose_lock():
    # looked up by name where a block runs: a closure shipped to a Dask worker
    # (cloudpickle) cannot carry the lock itself, but can carry this function
    return _TRANSPOSE_LOCK


def permutation_elements(k_max, B, seed, n):
    """The ordered resamples shared by every pair (:func:`permutation_orderings` from the
    generator of ``seed``) as elements ranked by their position: a pair with ``k``
    treated cells uses the elements of rank below ``k``. Drawn up to the upper edge of
    the bucket of ``k_max`` (:func:`k_buckets`), so that every bucket's element sets are
    whole whatever the largest ``k`` (by the prefix property, a pair's draws are the
    same for every ``k_max``)."""
    top = min(int(k_buckets(k_max)[-1]), n) if k_max > 0 else 0
    C = permutation_orderings(n, top, B, perturbation_rng(seed))
    return orderings_to_elements(C, n)


def k_buckets(k_max):
    """Edges ``0 = g_0 < g_1 < ...`` of the buckets of treated-cell counts: bucket ``j``
    holds ``g_j <= k < g_{j+1}``, ``k`` within 3% + 8 cells of ``g_j``."""
    edges = [0]
    while edges[-1] <= k_max:
        edges.append(int(1.03 * edges[-1]) + 9)
    return np.array(edges)


def permutation_blocks(k, full, pairs=None):
    """Blocks of pairs for permutation resamples: every pair uses the first ``k`` cells
    of the same ordered resamples (``full``, :func:`permutation_elements`), so pairs are
    grouped by bucket of ``k`` (:func:`k_buckets`), at most ``_MAX_COLUMNS`` a block.
    The elements of rank below the bucket's lower edge need no mask; those up to its
    upper edge are masked per column. The element sets, and the chunks of their passes
    (as for ``_MAX_COLUMNS`` columns), depend on the bucket only: a pair's statistics
    do not depend on the pairs that share its block, so the streamed path, which blocks
    the pairs of one chunk of genes at a time, gives the numbers of the resident path
    to the last digit. ``pairs``: the pairs' indices (default ``arange(k.size)``)."""
    k = np.asarray(k)
    pairs = np.arange(k.size) if pairs is None else np.asarray(pairs)
    edges = k_buckets(int(k.max()) if k.size else 0)
    bucket = np.searchsorted(edges, k, side="right") - 1
    order = np.lexsort((k, bucket))
    blocks = []
    for j in np.unique(bucket):
        members = order[bucket[order] == j]
        for s in range(0, members.size, _MAX_COLUMNS):
            idx = members[s : s + _MAX_COLUMNS]

            def parts(lo=int(edges[j]), hi=int(edges[j + 1]), kb=k[idx]):
                r = full.rank
                main = r < lo
                return [(full.select(main), None, None), (full.select((r < hi) ^ main), kb, None)], None

            blocks.append((pairs[idx], parts, None, _MAX_COLUMNS))
    return blocks


def conditional_rounds(pj, T, X, propensity, seeds, B, n_jobs, store=None):
    """Blocks of pairs for conditional resamples, yielded round by round of
    perturbations. A perturbation with at least ``_MIN_COLUMNS`` pairs is a block (its
    exact Bernoulli resamples, from its own seed), yielded with its round; smaller
    ones, in order of mean propensity, are packed together at the end and share common
    random numbers: one union of resamples drawn at the largest of their
    probabilities, each uniform ``U`` kept with the probability of the perturbation it
    is compared with (``U < pi``). Only a round's probabilities and those of the small
    perturbations are held (``propensity`` None: fitted by rounds of whole chunks of
    :func:`treatment_probabilities`, so they are its values). With a ``store``
    (:class:`~skmixed.offset._stream.Propensities`) the blocks hold no probabilities:
    a perturbation's are recomputed from its stored coefficients when its block runs."""
    n = T.shape[0]
    order = np.argsort(pj, kind="stable")
    used_p, starts = np.unique(pj[order], return_index=True)
    pair_sets = np.split(order, starts[1:]) if order.size else []
    small = np.array([i.size < _MIN_COLUMNS for i in pair_sets], bool)
    pi_small = np.empty((n, int(small.sum())), order="F")
    bad = 0
    for sl in _stream.grouped(_stream.column_chunks(used_p.size, n, budget=2**24), n, _stream.ROUND_BUDGET):
        cols = used_p[sl]
        if propensity is None:
            pi, b = _stream.treatment_chunks(T, X, cols, n_jobs=n_jobs, store=store)
            bad += b
        else:
            pi = propensity[:, cols]
        pos = np.flatnonzero(small[: sl.start])
        pi_small[:, pos.size : pos.size + int(small[sl].sum())] = pi[:, small[sl]]
        if store is None:
            yield [(pair_sets[j], functools.partial(exact_parts, pi[:, j - sl.start], seeds[used_p[j]], n, B), None)
                   for j in range(sl.start, sl.stop) if not small[j]]
        else:
            source = store.column if propensity is None else functools.partial(_column, propensity)
            yield [(pair_sets[j], functools.partial(stored_parts, source, int(used_p[j]), seeds[used_p[j]], n, B),
                    None) for j in range(sl.start, sl.stop) if not small[j]]
        del pi
    _stream.warn_treatment(bad)
    if not small.any():
        return
    groups = [(int(p), i) for p, i, s in zip(used_p, pair_sets, small) if s]
    # the order of the means of the whole matrix (a column mean per perturbation is strided)
    if propensity is None:
        # as the column means of a C-ordered (cells x perturbations) matrix: the order
        # of near-equal means, hence the packs, is that of treatment_probabilities's
        mean_pi = np.concatenate([np.ascontiguousarray(pi_small[:, s : s + 64]).mean(axis=0)
                                  for s in range(0, pi_small.shape[1], 64)])
    else:
        mean_pi = propensity.mean(axis=0)[used_p[small]]
    column = {p: j for j, (p, _) in enumerate(groups)}
    groups.sort(key=lambda gr: float(mean_pi[column[gr[0]]]))
    packs, cur, width = [], [], 0
    for gr in groups:
        if cur and width + gr[1].size > _MAX_COLUMNS:
            packs.append(cur)
            cur, width = [], 0
        cur.append(gr)
        width += gr[1].size
    if cur:
        packs.append(cur)
    blocks = []
    cache = []

    def pi_t():
        """The probabilities perturbation-major, transposed once for all packs (a
        perturbation's column of the (cells x perturbations) matrix is strided)."""
        if not cache:
            with _transpose_lock():
                if not cache:
                    cache.append(_stream.tiled_transpose(pi_small))
        return cache[0]

    for pack in packs:
        perts = [p for p, _ in pack]
        idx = np.concatenate([i for _, i in pack])
        if len(perts) == 1:
            blocks.append((idx, functools.partial(exact_parts, pi_small[:, column[perts[0]]], seeds[perts[0]], n, B),
                           None))
            continue
        col_pert = np.concatenate([np.full(i.size, column[p]) for p, i in pack])

        def union(perts=perts, col_pert=col_pert):
            thr_t = pi_t()[col_pert]  # (columns, n): each column's probabilities
            lo, hi = thr_t.min(axis=0), thr_t.max(axis=0)
            thr = thr_t.T
            order, rows, cols, u = binned_resamples(hi, B, perturbation_rng(seeds[perts[0]]), uniforms=True)
            el = Elements.from_rows(rows, cols, n, B, rank=u).renumbered(order)
            # below every column's probability: no mask (most elements, the perturbations
            # of a pack having similar probabilities)
            core = el.rank < lo[el.cells]
            return [(el.select(core), None, None), (el.select(~core), None, thr)], None

        blocks.append((idx, union, None))
    yield blocks


def stored_parts(source, p, seed, n, B):
    """:func:`exact_parts` of perturbation ``p``, its probabilities ``source(p)``."""
    return exact_parts(source(p), seed, n, B)


def _column(a, p):
    return a[:, p]


def exact_parts(pi, seed, n, B):
    """The exact Bernoulli resamples of one perturbation, as one element set."""
    order, rows, cols = binned_resamples(pi, B, perturbation_rng(seed))
    return [(Elements.from_rows(rows, cols, n, B).renumbered(order), None, None)], None


def observed_statistics(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic):
    """Closed-form estimate and statistic of every pair on its treated cells, with the
    formulas of :func:`~skmixed.offset._engine.block_statistics` (the Wald information
    of a pair is the NB one where its ``phi`` is positive, else Poisson's), by runs of
    pairs of about ``_stream.OBSERVED_BUDGET`` treated cells (a pair's sums do not
    depend on the runs)."""
    K = gpos.size
    coef, z = np.empty(K), np.empty(K)
    ends = np.cumsum(np.diff(Tcsc.indptr)[pj])
    start = 0
    while start < K:
        stop = max(start + 1, int(np.searchsorted(ends, ends[start] + _stream.OBSERVED_BUDGET, side="right")))
        sl = slice(start, min(stop, K))
        coef[sl], z[sl] = observed_run(Yt, Ot, gshift, gpos[sl], pj[sl], phi[sl], Tcsc, statistic)
        start = sl.stop
    return coef, z


def observed_run(Yt, Ot, gshift, gpos, pj, phi, Tcsc, statistic):
    K = gpos.size
    lens = np.diff(Tcsc.indptr)[pj]
    pair = np.repeat(np.arange(K), lens)
    within = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    cells = Tcsc.indices[np.repeat(Tcsc.indptr[pj], lens) + within]
    g = gpos[pair]
    y = Yt[g, cells]
    d = Ot[g, cells] - gshift[g]
    Sy = np.bincount(pair, weights=y, minlength=K)
    Se = np.bincount(pair, weights=np.exp(d), minlength=K)
    shift = gshift[gpos]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = Sy / Se
        coef = np.log(t) - shift
        if statistic == "score":
            mu0 = np.exp(d + gshift[g])
            dd = 1.0 / (1.0 + phi[pair] * mu0)
            U = np.bincount(pair, weights=(y - mu0) * dd, minlength=K)
            info0 = np.bincount(pair, weights=mu0 * dd, minlength=K)
            return np.where(lens > 0, coef, np.nan), U / np.sqrt(info0)
        info = Sy
        if np.any(phi > 0):
            acc = np.bincount(pair, weights=1.0 / (np.exp(-d) + phi[pair] * t[pair]), minlength=K)
            info = np.where(phi > 0, t * acc, Sy)
        z = coef * np.sqrt(info)
    z = np.where(Sy <= 0, -np.inf, z)
    return np.where(lens > 0, coef, np.nan), z
