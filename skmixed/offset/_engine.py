"""The resampling engine: statistics of many (gene, perturbation) pairs over many
resamples of the treatment, as sums over (cell, resample) *elements*.

A resample set is a list of elements ``(cell, resample)`` held in cell-major order
(:class:`Elements`): every resample's treated cells, all resamples at once. Pairs are
processed in *blocks* of columns that share one element set: the pairs of one
perturbation (conditional resampling), pairs whose perturbations were drawn together
with common random numbers, or, for permutations, every pair (a permutation null
depends only on the number of treated cells, so all pairs share one set of ordered
resamples and a pair with ``k`` treated cells uses the first ``k`` cells of each).
An element may carry a *rank*; column ``c`` then uses only the elements whose rank is
below its threshold (the resample position for permutations, the uniform of a common
random number for conditional resampling), so one element set serves columns whose
resamples differ.

Per column the statistic needs, for every resample ``b``, the sums over its treated
cells of ``y``, ``e^{o - shift}`` (the closed form ``t = Sy / Se``) and, for the NB
Wald statistic, ``t * sum 1 / (e^{shift - o} + phi t)`` (the Fisher information at
``t``); the score statistic needs two sums that are linear in the treatment. Linear
sums are one sparse product of the (resample x cell) indicator with the block's
(cell x column) table; the information is one pass over the elements in cache-sized
chunks of cells (rows of the per-cell tables repeated, not gathered at random), reduced
into the (resample x column) table by a sparse product. Everything goes through
:mod:`skmixed._backend`, so the same code runs on CuPy arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import add_rows_at, csc_matmul, get_namespace, to_device

# elements x columns per chunk of the information pass: temporaries near L2 size
_CHUNK = 131072
_DEVICE_CHUNK = 1 << 25  # on a GPU: few, large kernels


@dataclass
class Elements:
    """Treated (cell, resample) pairs in cell-major order.

    Attributes
    ----------
    cols : int array (E,)
        Resample of each element, grouped by cell (cell ``i`` owns
        ``cols[indptr[i]:indptr[i + 1]]``).
    indptr : int array (n + 1,)
    rank : array (E,) or None
        Per-element rank compared with a column's threshold (None: every column uses
        every element).
    n, B : int
        Cells and resamples.
    """

    cols: object
    indptr: object
    rank: object
    n: int
    B: int
    cells: object = None  # cell of every element (for sparse sets: gathers beat repeats)

    @property
    def counts(self):
        return self.indptr[1:] - self.indptr[:-1]

    @classmethod
    def from_rows(cls, rows, cols, n, B, rank=None):
        """From element arrays with ``rows`` (cells) non-decreasing."""
        xp = get_namespace(rows, cols)
        dtype = _index_dtype(xp, cols.size)
        indptr = xp.zeros(n + 1, dtype=dtype)
        xp.cumsum(xp.bincount(rows, minlength=n), out=indptr[1:])
        return cls(cols=cols.astype(dtype, copy=False), indptr=indptr, rank=rank, n=int(n), B=int(B),
                   cells=rows.astype(dtype, copy=False))

    def select(self, keep):
        """The elements where ``keep`` is True (cell-major order kept)."""
        xp = get_namespace(self.cols)
        idx = xp.flatnonzero(keep)  # one scan; the takes below are then cheap
        cells = xp.take(self.cells, idx)
        indptr = xp.zeros_like(self.indptr)
        xp.cumsum(xp.bincount(cells, minlength=self.n), out=indptr[1:])
        rank = None if self.rank is None else xp.take(self.rank, idx)
        return Elements(cols=xp.take(self.cols, idx), indptr=indptr, rank=rank, n=self.n, B=self.B, cells=cells)

    def renumbered(self, order):
        """The same elements with cell ``j`` renamed ``order[j]`` (cell-major again):
        a reordering of the elements, cheaper than reordering per-cell tables."""
        xp = get_namespace(self.cols)
        counts = self.indptr[1:] - self.indptr[:-1]
        inv = xp.empty_like(order)
        inv[order] = xp.arange(order.size, dtype=order.dtype)
        new_counts = counts[inv]  # cell i (natural) owns the elements of renumbered cell inv[i]
        indptr = xp.zeros_like(self.indptr)
        xp.cumsum(new_counts, out=indptr[1:])
        E = int(indptr[-1])
        # source position of every element in natural order
        src = xp.repeat(self.indptr[:-1][inv] - indptr[:-1], new_counts) + xp.arange(E, dtype=indptr.dtype)
        cells = xp.repeat(xp.arange(self.n, dtype=self.cells.dtype), new_counts)
        rank = None if self.rank is None else self.rank[src]
        return Elements(cols=self.cols[src], indptr=indptr, rank=rank, n=self.n, B=self.B, cells=cells)

    def to(self, xp):
        """A copy on namespace ``xp``."""
        rank = None if self.rank is None else to_device(self.rank, xp)
        return Elements(to_device(self.cols, xp), to_device(self.indptr, xp), rank, self.n, self.B,
                        to_device(self.cells, xp))

    def rows(self):
        """The cell of every element."""
        return self.cells


def _index_dtype(xp, size):
    """int32 where it suffices: scipy's sparse products take it without a copy."""
    return xp.int32 if size < 2**31 - 1 else xp.int64


# ---------------------------------------------------------------- permutations
def permutation_orderings(n, k, n_resamples, rng, block=256):
    """``n_resamples`` random ordered samples of ``k`` distinct cells out of ``n``.

    Row ``b`` lists, in order of first appearance, the distinct values of a stream of
    uniform integers in ``[0, n)`` (row ``b`` of successive ``(n_resamples, block)``
    draws). Its first ``j`` entries are a uniform random ``j``-subset for every
    ``j <= k``, and they do not depend on ``k``: a perturbation with ``j`` treated
    cells uses the first ``j`` columns, whichever other perturbations are tested.

    Returns
    -------
    ndarray of shape (n_resamples, k), int64
    """
    B = int(n_resamples)
    if k == 0:
        return np.zeros((B, 0), np.int64)
    if k > n:
        raise ValueError(f"cannot draw {k} distinct cells out of {n}.")
    # expected draws to see k distinct values (coupon collector), with a margin
    if k < n:
        need = -n * np.log1p(-k / n)
    else:
        need = n * (np.log(n) + 1.0)
    need = need + 6.0 * np.sqrt(need) + 16
    stream = np.zeros((B, 0), np.int64)
    n_blocks = max(1, int(np.ceil(need / block)))
    while True:
        draws = rng.integers(0, n, size=(n_blocks, B, block))
        stream = np.concatenate([stream, np.concatenate(list(draws), axis=1)], axis=1)
        first = _first_occurrences(stream)
        if int(first.sum(axis=1).min()) >= k:
            break
        n_blocks = max(1, n_blocks // 4)
    rank = np.cumsum(first, axis=1)
    take = first & (rank <= k)
    return stream[take].reshape(B, k)


def _first_occurrences(a):
    """Mask of the first occurrence of each value within each row of ``a``."""
    order = np.argsort(a, axis=1, kind="stable")
    s = np.take_along_axis(a, order, axis=1)
    new = np.ones(s.shape, bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    out = np.empty_like(new)
    np.put_along_axis(out, order, new, axis=1)
    return out


def orderings_to_elements(C, n):
    """Cell-major :class:`Elements` of ordered samples ``C`` (B, k): element
    ``(C[b, j], b)`` has rank ``j``."""
    B, k = C.shape
    cells = C.ravel()
    order = np.argsort(cells, kind="stable")
    rows = cells[order]
    dtype = _index_dtype(np, order.size)
    order = order.astype(dtype)
    cols = order // k
    rank = order - cols * k
    return Elements.from_rows(rows, cols, n, B, rank=rank)


# ------------------------------------------------------------------ statistics
@dataclass
class Columns:
    """Per-cell tables of one block of columns (pairs), shape (n, Gc), cells in the
    numbering of the block's :class:`Elements`.

    ``Y`` counts, ``M = exp(o - shift)``, ``Q = exp(shift - o)`` (Wald), or ``A``,
    ``I`` (the per-cell score and information at ``beta = 0``); ``shift`` (Gc,) and
    ``phi`` (Gc,) the overdispersion ``1 / size`` (0: Poisson).
    """

    statistic: str
    X: object  # (n, 2 Gc): [Y | M] (wald) or [A | I] (score)
    Q: object  # (n, Gc) or None
    shift: object
    phi: object


# cells per tile of column_tables
_TILE = 2048


def column_tables(Yt, Ot, shift, phi, statistic, order=None, rows=None, out=None):
    """:class:`Columns` from gene-major counts ``Yt`` and offsets ``Ot`` (Gc, n) of the
    block's columns, ``shift`` (Gc,) at least the largest offset of each; ``order``
    renumbers the cells (None: as given). With ``rows``, the block's columns are the
    rows ``rows`` of ``Yt`` and ``Ot`` (read tile by tile: no (Gc, n) copies). ``out``:
    a flat float64 host buffer of at least ``2 n Gc`` values for the table (reused from
    block to block, a fresh tens-of-MB array costs page faults on every block)."""
    xp = get_namespace(Yt, Ot)
    if rows is not None and (order is not None or xp is not np):
        Yt, Ot, rows = Yt[rows], Ot[rows], None
    if order is not None:
        Yt, Ot = xp.take(Yt, order, axis=1), xp.take(Ot, order, axis=1)
    Gc = Yt.shape[0] if rows is None else len(rows)
    n = Yt.shape[1]
    if rows is None:
        rows = slice(None)
    if out is not None and xp is np and out.size >= 2 * n * Gc:
        X = out[: 2 * n * Gc].reshape(n, 2 * Gc)
    else:
        X = xp.empty((n, 2 * Gc))
    # on the CPU the (Gc, n) inputs are read and the cell-major table written by tiles of
    # cells: the arithmetic runs on cache-resident gene-major rows and each tile is
    # transposed once (about half the time of whole-array passes through strided views)
    step = _TILE if xp is np else n
    for s in range(0, n, step):
        e = min(s + step, n)
        if statistic == "wald":
            X[s:e, :Gc] = Yt[rows, s:e].T
            m = Ot[rows, s:e] - shift[:, None]  # <= 0: exp never overflows
            xp.exp(m, out=m)
            X[s:e, Gc:] = m.T
        else:
            mu0 = xp.exp(Ot[rows, s:e])
            d = phi[:, None] * mu0
            d += 1.0
            xp.reciprocal(d, out=d)
            a = Yt[rows, s:e] - mu0
            a *= d
            mu0 *= d
            X[s:e, :Gc] = a.T
            X[s:e, Gc:] = mu0.T
    if statistic == "score":
        return Columns("score", X, None, shift, phi)
    Q = None
    if bool(xp.any(phi > 0)):
        with np.errstate(divide="ignore"):
            Q = 1.0 / X[:, Gc:]  # inf where M underflows: those cells then add 0 to the sums
    return Columns("wald", X, Q, shift, phi)


def block_statistics(parts, cols, width=None):
    """Statistics of every column over every resample: array (B, Gc).

    Parameters
    ----------
    parts : list of (Elements, thresholds, cell_thresholds)
        Element sets whose sums add up. ``thresholds`` (Gc,): column ``c`` uses the
        elements with ``rank < thresholds[c]``; ``cell_thresholds`` (n, Gc): the
        elements of cell ``i`` with ``rank < cell_thresholds[i, c]``; both None: every
        column uses every element.
    cols : Columns
    width : int or None
        Chunk the element passes as for a block of this many columns (None: the
        block's own). A column's sums are then grouped the same way whichever columns
        share its block, so its statistics do not depend on its block-mates to the
        last digit (the permutation blocks of :func:`~skmixed.offset.resampling_test`
        are formed by chunk of genes when they are streamed).

    Wald: ``(log t - shift) * sqrt(I(t))``, ``-inf`` where the treated counts are all
    zero; score: ``U / sqrt(I)``. NaN where a resample has no treated cell.
    """
    xp = get_namespace(cols.X)
    Gc = cols.X.shape[1] // 2
    w = Gc if width is None else int(width)
    el0 = parts[0][0]
    S = xp.zeros((el0.B, 2 * Gc))
    masked = []  # chunks of the masked parts, with their masks, for the second pass
    for el, thr, cell_thr in parts:
        if thr is None and cell_thr is None:
            S += csc_matmul(None, el.cols, el.indptr, (el.B, el.n), cols.X)
            continue
        for c0, c1, e0, e1, mask in _chunks(el, 2 * w, thr, cell_thr):
            V = _expand(cols.X, c0, c1, el, e0, e1)
            V[:, :Gc] *= mask
            V[:, Gc:] *= mask
            add_rows_at(S, el.cols[e0:e1], V)
            masked.append((el, c0, c1, e0, e1, mask))
    A, D = S[:, :Gc], S[:, Gc:]
    with np.errstate(divide="ignore", invalid="ignore"):
        if cols.statistic == "score":
            return A / xp.sqrt(D)
        t = A / D
        if cols.Q is None:
            info = A  # Poisson (phi = 0): I = t * sum e^(o - shift) = sum y
        else:
            st = t * cols.phi[None, :]
            acc = xp.zeros((el0.B, Gc))
            chunks = [(el, c0, c1, e0, e1, None) for el, thr, cell_thr in parts if thr is None and cell_thr is None
                      for c0, c1, e0, e1, _ in _chunks(el, w)]
            for el, c0, c1, e0, e1, mask in chunks + masked:
                V = _expand(cols.Q, c0, c1, el, e0, e1)
                V += st[el.cols[e0:e1]]
                xp.reciprocal(V, out=V)
                if mask is not None:
                    V *= mask
                add_rows_at(acc, el.cols[e0:e1], V)
            info = xp.where(cols.phi[None, :] > 0, t * acc, A)  # a column's own formula, whatever its block-mates
        z = (xp.log(t) - cols.shift[None, :]) * xp.sqrt(info)
    # no treated cell in a resample (D = 0): undefined; treated counts all zero: -inf
    return xp.where(D <= 0, xp.nan, xp.where(A <= 0, -xp.inf, z))


def _expand(T, c0, c1, el, e0, e1):
    """Rows of the per-cell table ``T`` for the elements ``e0:e1`` (cells ``c0:c1``):
    the rows of consecutive cells repeated where the cells are dense in elements (a
    streaming copy), gathered where they are sparse."""
    xp = get_namespace(T)
    if xp is np and (c1 - c0) <= 2 * (e1 - e0):
        return np.repeat(T[c0:c1], el.indptr[c0 + 1 : c1 + 1] - el.indptr[c0:c1], axis=0)
    return T[el.cells[e0:e1]]


def _chunks(el, width, thresholds=None, cell_thresholds=None):
    """Cell ranges of about ``_CHUNK / width`` elements, with the mask of which column
    uses which element (None when every column uses every element)."""
    xp = get_namespace(el.cols)
    E = int(el.indptr[-1])
    step = max(1024, (_CHUNK if xp is np else _DEVICE_CHUNK) // max(width, 1))
    indptr_h = el.indptr if xp is np else el.indptr.get()
    cuts = np.searchsorted(indptr_h, np.arange(step, E, step))
    bounds = np.unique(np.concatenate([[0], cuts, [el.n]]))
    for c0, c1 in zip(bounds[:-1], bounds[1:]):
        e0, e1 = int(indptr_h[c0]), int(indptr_h[c1])
        if e1 == e0:
            continue
        mask = None
        if thresholds is not None:
            mask = _less(el.rank[e0:e1, None], thresholds[None, :])
        elif cell_thresholds is not None:
            mask = _less(el.rank[e0:e1, None], _expand(cell_thresholds, c0, c1, el, e0, e1))
        yield int(c0), int(c1), e0, e1, mask


def _less(a, b):
    """``a < b`` as float64 0/1 (multiplying by it needs no casting)."""
    xp = get_namespace(a, b)
    if xp is not np:
        return (a < b).astype(xp.float64)
    out = np.empty(np.broadcast_shapes(a.shape, b.shape))
    return np.less(a, b, out=out, casting="unsafe")
