"""The draws of the resampling test: conditional Bernoulli resamples at a cost
proportional to the treated cells, permutations, and the generator that seeds them."""

from __future__ import annotations

import numpy as np

from ._engine import orderings_to_elements, permutation_orderings


# ---------------------------------------------------------------------- resamples
def conditional_resamples(pi, n_resamples, rng):
    """Cells and resample indices of ``T*[i, b] ~ Bernoulli(pi_i)``, all independent.

    Cost proportional to the number of treated cells: cells are grouped by ``pi``
    into bins ``(2^-(j+1)/4, 2^-j/4]``; within a bin the successes of a Bernoulli process
    at the bin's upper bound ``p`` over the (cell, resample) grid are reached by
    geometric skips, then thinned with probability ``pi_i / p`` (accepting at least
    84% of them). The grid has a power-of-two number of columns, so that a position
    splits into (cell, resample) by a shift and a mask.

    Returns
    -------
    rows, cols : int arrays
        Treated (cell, resample) pairs, grouped by bin, by cell within a bin.
    """
    order, rows, cols = binned_resamples(pi, n_resamples, rng)
    return order[rows], cols


def binned_resamples(pi, n_resamples, rng, uniforms=False):
    """:func:`conditional_resamples` with cells renumbered in bin order: returns the
    cell order and the treated pairs' positions in it, non-decreasing; with
    ``uniforms=True`` also each treated pair's uniform ``U < pi_i`` (the common random
    number of :func:`resampling_test`: ``T*[i, b] = 1{U[i, b] < pi_i}``, so a probability
    below ``pi_i`` treats a subset)."""
    pi = np.asarray(pi, dtype=np.float64)
    B = int(n_resamples)
    bits = max(int(np.ceil(np.log2(B))), 0)
    mask = (1 << bits) - 1
    level = np.minimum(np.floor(-4.0 * np.log2(np.maximum(pi, 2.0**-40))), 160).astype(np.int16)
    level[pi <= 0] = -1
    order = np.argsort(level, kind="stable")  # radix sort: by bin, by cell within a bin
    sorted_level = level[order]
    starts = np.flatnonzero(np.r_[True, sorted_level[1:] != sorted_level[:-1]])
    levels = sorted_level[starts]
    bounds = np.append(starts, order.size)
    pi_sorted = pi[order]
    rows, cols, us = [], [], []
    for lev, s, e in zip(levels, bounds[:-1], bounds[1:]):
        if lev < 0:
            continue
        p = min(2.0 ** (-float(lev) / 4.0), 1.0)
        N = (e - s) << bits
        pos = np.arange(N, dtype=np.int64) if p >= 1.0 else _bernoulli_positions(N, p, rng)
        idx = pos >> bits
        u = rng.random(pos.size)
        u *= p
        keep = u < pi_sorted[s:e][idx]
        b = pos & mask
        if mask + 1 != B:
            keep &= b < B
        sel = np.flatnonzero(keep)
        idx = idx[sel]
        idx += s
        rows.append(idx)
        cols.append(b[sel])
        if uniforms:
            us.append(u[sel])
    if not rows:
        out = (order, np.zeros(0, np.int64), np.zeros(0, np.int64))
        return out + (np.zeros(0),) if uniforms else out
    out = (order, np.concatenate(rows), np.concatenate(cols))
    return out + (np.concatenate(us),) if uniforms else out


def _bernoulli_positions(N, p, rng):
    """Sorted positions of the successes of N Bernoulli(p) trials (geometric gaps)."""
    scale = -1.0 / np.log1p(-p)
    out = []
    last = -1
    while True:
        expected = (N - 1 - last) * p
        m = int(expected + 6.0 * np.sqrt(expected) + 32)
        e = rng.standard_exponential(m)
        e *= scale
        pos = e.astype(np.int64)  # floor of a geometric(p) gap minus one
        pos += 1
        np.cumsum(pos, out=pos)
        pos += last
        if pos[-1] >= N:
            out.append(pos[: np.searchsorted(pos, N)])
            break
        out.append(pos)
        last = int(pos[-1])
    return out[0] if len(out) == 1 else np.concatenate(out)


def permutation_resamples(treated, n_resamples, rng):
    """Cells and resample indices of ``B`` random permutations of the treatment: each
    resample treats ``k = sum(treated)`` cells drawn without replacement (the first
    ``k`` cells of :func:`~skmixed.offset._engine.permutation_orderings`).

    Returns
    -------
    rows, cols : int arrays, sorted by cell
    """
    n = treated.size
    k = int(np.sum(treated))
    B = int(n_resamples)
    el = orderings_to_elements(permutation_orderings(n, k, B, rng), n)
    return el.rows(), el.cols


def perturbation_rng(seed_sequence):
    """A generator of resamples, driving SFC64 (a fast bit generator). Child ``p`` of
    ``SeedSequence(random_state).spawn(n_perturbations + 1)`` draws perturbation
    ``p``'s conditional resamples (a pack of small perturbations: its first
    perturbation's child), the last child the shared permutations. The resamples do
    not depend on ``n_jobs``; those of a perturbation with at least 8 pairs, and the
    permutations of a pair, do not depend on the other pairs either."""
    return np.random.Generator(np.random.SFC64(seed_sequence))
