"""One chunk of cells of a ZINBWaVE iteration, and where the chunks run.

Every pass of an iteration over the cells (the cells' Newton steps with their
per-gene sums, the trial pass of the gene step, the log-likelihood of a line search)
is a map of one of :class:`ChunkWork`'s methods over the chunks of cells followed by a
reduction of per-gene sums in chunk order. :class:`Chunks` runs the map in the calling
thread, or, when :func:`skmixed.parallel_config` holds a ``dask.distributed.Client``,
as tasks on the cluster: each chunk's counts and covariates are sent once per fit and
stay on a worker; a task carries only its cells' parameters and the gene parameters,
and returns its per-gene sums and its cells' new parameters. A worker lost mid-fit is
replaced by Dask (its chunks are rebuilt from the tasks that made them). Both engines run the same functions on the same chunks and
reduce in the same order, so the fits agree to rounding.
"""

from __future__ import annotations

from ._blocks import assemble_sym, newton_direction, upper
from ._data import Counts
from ._evaluate import evaluate
from ._model import Design

MAX_HALVINGS = 12


def finite_ge(new, old, xp):
    """``new >= old`` with NaN counted as a decrease, allowing round-off."""
    tol = 1e-12 * xp.maximum(xp.abs(old), 1.0)
    return xp.isfinite(new) & (new >= old - tol)


def backtrack(bad, step, retry, f, f0, xp):
    """Step halving for the units (cells or genes) marked ``bad``, each on its own.

    ``retry(idx)`` moves the units ``idx`` to their current ``step`` and returns their
    new objective, written into ``f``; a unit is done once ``f >= f0`` (``finite_ge``).
    After ``MAX_HALVINGS`` halvings the step of the units still failing is 0 (their
    start): the objective never goes down."""
    for it in range(MAX_HALVINGS + 1):
        idx = xp.flatnonzero(bad)
        if idx.size == 0:
            break
        last = it == MAX_HALVINGS
        step[idx] = 0.0 if last else step[idx] * 0.5
        f[idx] = retry(idx)
        bad[idx] = False if last else ~finite_ge(f[idx], f0[idx], xp)


def _rows_of(a, rows):
    return None if a is None else a[rows]


def row_problem(counts, design, rows, penalty=None):
    """The counts and design of the cells ``rows`` alone (``penalty``: replaces the design's).

    Counts left on disk (:class:`~skmixed.zinb._stream.StreamedCounts`) are read here,
    the cells ``rows`` only."""
    xp = design.xp
    Y = counts.read(rows) if getattr(counts, "streamed", False) else counts.Y[rows]
    sub = Counts(Y, xp, counts.batch_size)
    sub.n_threads = counts.n_threads
    return sub, _row_design(design, rows, penalty)


def _row_design(design, rows, penalty=None):
    return Design(design.X[rows], design.V, _rows_of(design.off_mu, rows), _rows_of(design.off_pi, rows),
                  design.penalty if penalty is None else penalty, design.K)


def local_chunks(counts, design):
    """``(rows, chunk)`` for every chunk of cells, each chunk its own problem
    (``chunk.rows == slice(0, m)``) made, or read from its file, when it is reached:
    in memory, one chunk at a time."""
    for rows in counts.chunks:
        sub, sub_design = row_problem(counts, design, rows)
        yield rows, Chunk(sub, sub_design, slice(0, rows.stop - rows.start))


def _read_chunk(reader, rows, design, batch_size, n_threads):
    """A chunk's problem with its counts read from ``reader`` (on the worker that runs it)."""
    from ._stream import csr_block  # noqa: PLC0415

    sub = Counts(csr_block(reader.rows(rows)), design.xp, batch_size)
    sub.n_threads = n_threads
    return Chunk(sub, design, slice(0, rows.stop - rows.start))


class Chunk:
    """Cells ``rows`` of ``counts`` / ``design`` (in-process: the whole problem and a
    slice; on a worker: the chunk's own problem and ``slice(0, m)``)."""

    def __init__(self, counts, design, rows):
        self.counts, self.design, self.rows = counts, design, rows


class ChunkWork:
    """The per-chunk computations of :class:`~skmixed.zinb._optimize.Optimizer`.

    Methods take a :class:`Chunk` and parameters ``P`` whose cell arrays are indexed by
    the chunk's ``rows`` (the full parameters in-process, the chunk's cells on a worker).
    """

    def __init__(self, cell_plan, gene_plan, info_dtype, fit_genes):
        self.cell_plan, self.gene_plan = cell_plan, gene_plan
        self.info_dtype = info_dtype
        self.fit_genes = fit_genes

    # -- design vectors --------------------------------------------------------------
    @staticmethod
    def cell_designs(design, P, cols=None):
        xp = design.xp
        V = design.V if cols is None else design.V[cols]
        am = P.alpha_mu.T if cols is None else P.alpha_mu[:, cols].T
        ap = P.alpha_pi.T if cols is None else P.alpha_pi[:, cols].T
        Z = xp.zeros_like(V)
        return xp.concatenate([V, Z, am], axis=1), xp.concatenate([Z, V, ap], axis=1)

    @staticmethod
    def gene_designs(design, P, rows):
        xp = design.xp
        A = xp.concatenate([design.X[rows], P.W[rows]], axis=1)
        Z = xp.zeros_like(A)
        return xp.concatenate([A, Z], axis=1), xp.concatenate([Z, A], axis=1)

    def cell_stats(self, design, P, E, cols=None):
        """Per-cell gradient, information (without the penalty; its upper triangle, what
        a pass keeps for the next) and log-likelihood sums of the per-entry arrays ``E``
        (over the genes ``cols``)."""
        Umu, Upi = self.cell_designs(design, P, cols)
        plan = self.cell_plan
        g = plan.gradient(Umu, Upi, E[1], E[2], units_are_rows=True)
        H = plan.assemble(*plan.pair_sums(Umu, Upi, *E[3:6], units_are_rows=True, dtype=self.info_dtype))
        return g, upper(H), E[0].sum(axis=1)

    # -- passes --------------------------------------------------------------------------
    def loglik(self, chunk, P, cols=None):
        """Per-gene log-likelihood sums of the chunk (over the genes ``cols``)."""
        (ll,) = evaluate(chunk.design, chunk.counts, P, chunk.rows, cols, derivs=False)
        return ll.sum(axis=0)

    def trial(self, chunk, P):
        """Per-gene log-likelihood sums and the cells' Newton statistics at ``P``."""
        E = evaluate(chunk.design, chunk.counts, P, chunk.rows, derivs=True, zeta=False)
        return E[0].sum(axis=0), self.cell_stats(chunk.design, P, E)

    def moved(self, chunk, P, trial, moved):
        """The change of the cells' statistics when the genes ``moved`` go from their
        ``trial`` values to those of ``P``."""
        d, rows = chunk.design, chunk.rows
        Et = evaluate(d, chunk.counts, trial, rows, moved, derivs=True, zeta=False)
        Ef = evaluate(d, chunk.counts, P, rows, moved, derivs=True, zeta=False)
        st, sf = self.cell_stats(d, trial, Et, moved), self.cell_stats(d, P, Ef, moved)
        return tuple(b - a for a, b in zip(st, sf))

    def cell_pass(self, chunk, P, update_cells, cached, keep):
        """The chunk's part of a cell pass: the cells' Newton steps (``update_cells``), then
        the per-gene sums at the accepted values. Returns ``(cells, sums, stats)``: the
        cells' new parameter block (None when not updated), a dict of per-gene sums and,
        with ``keep``, the cells' statistics for the next pass."""
        design, rows = chunk.design, chunk.rows
        if update_cells:
            E = self._cell_newton(chunk, P, cached)
            cells = P.cell_block(rows)
        else:
            E = evaluate(design, chunk.counts, P, rows, derivs=True, zeta=True)
            cells = None
        sums = {"ll": E[0].sum(axis=0), "gz": E[6].sum(axis=0), "izz": E[7].sum(axis=0)}
        if self.fit_genes:
            plan = self.gene_plan
            Umu, Upi = self.gene_designs(design, P, rows)
            sums["grad"] = plan.gradient(Umu, Upi, E[1], E[2], units_are_rows=False)
            sums["S"] = plan.pair_sums(Umu, Upi, *E[3:6], units_are_rows=False, dtype=self.info_dtype)
        stats = self.cell_stats(design, P, E) if keep else None
        return cells, sums, stats

    def _cell_newton(self, chunk, P, cached=None):
        """Newton step with per-cell backtracking for the chunk's cells; returns the
        derivative arrays at the accepted parameters (with dispersion derivatives).
        ``cached``: the cells' ``(gradient, information, loglik)`` at the current
        parameters, computed during the previous gene pass (saves one evaluation)."""
        design, counts, rows = chunk.design, chunk.counts, chunk.rows
        xp = design.xp
        start = rows.start
        if cached is None:
            E0 = evaluate(design, counts, P, rows, derivs=True, zeta=False)
            cached = self.cell_stats(design, P, E0)
            del E0
        g, H, ll0 = cached
        H = assemble_sym(H, g.shape[1])
        C0 = P.cell_block(rows)
        f0 = ll0 - design.cell_penalty(C0)
        d = newton_direction(H + xp.diag(design.pen_cell), g - design.pen_cell * C0)
        step = xp.ones(C0.shape[0])
        C = C0 + d
        P.set_cell_block(C, rows)
        E = list(evaluate(design, counts, P, rows, derivs=True, zeta=True))
        f = E[0].sum(axis=1) - design.cell_penalty(C)

        def retry(idx):
            C[idx] = C0[idx] + step[idx, None] * d[idx]
            P.set_cell_block(C[idx], idx + start)
            Es = evaluate(design, counts, P, idx + start, derivs=True, zeta=True)
            for full, part in zip(E, Es):
                full[idx] = part
            return Es[0].sum(axis=1) - design.cell_penalty(C[idx])

        backtrack(~finite_ge(f, f0, xp), step, retry, f, f0, xp)
        return E


class Chunks:
    """The chunks of cells of a fit and the engine that runs a pass over them.

    Counts in memory: in-process, every chunk is the whole problem and a slice. Counts
    left on disk (``counts.streamed``): in-process, every pass reads each chunk from the
    file when it is reached (one chunk in memory at a time); on a cluster, each chunk
    is read once by the worker that keeps it.
    """

    def __init__(self, counts, design, engine=None):
        self.counts, self.design = counts, design
        self.rows = list(counts.chunks)
        self.engine = engine if engine is not None and engine.distributed else None
        self.streamed = getattr(counts, "streamed", False)
        if self.engine is None:
            self.handles = None if self.streamed else [Chunk(counts, design, rows) for rows in self.rows]
            return
        # each chunk's data go to the cluster once, as a task that returns them (not
        # scattered): should its worker die, Dask rebuilds them from the task
        client = self.engine.client
        self.handles = []
        for rows in self.rows:
            if self.streamed:  # the task carries the file's reader, and the worker reads the cells
                task = (_read_chunk, counts.reader, rows, _row_design(design, rows), counts.batch_size,
                        counts.n_threads)
            else:
                sub, sub_design = row_problem(counts, design, rows)
                task = (Chunk, sub, sub_design, slice(0, rows.stop - rows.start))
            self.handles.append(client.submit(*task, pure=False))

    def __len__(self):
        return len(self.rows)

    def cells_of(self, P, rows):
        """What a chunk's task needs of ``P``: all of it when the chunk is a slice of the
        whole problem, else its cells."""
        return P if self.handles is not None and self.engine is None else P.take_cells(rows)

    def map(self, work, method, P, per_chunk=None, args=()):
        """``work.method(chunk, P, *per_chunk[k], *args)`` for every chunk ``k``: an
        iterator of the results in chunk order, to be consumed as it goes.

        In-process, chunk ``k + 1`` is computed only when chunk ``k``'s result has been
        taken, so a pass holds one chunk's data and one result, never a list of every
        chunk's per-gene sums or per-cell statistics (at 200,000 cells x 1,000 genes,
        K = 10, those lists were 0.1-0.25 GiB each). ``per_chunk`` may be a generator
        (read one item per chunk). A chunk's task reads only its own cells of ``P``, so
        the caller may write a chunk's new cells into ``P`` before the next is computed.
        """
        per_chunk = per_chunk if per_chunk is not None else ((),) * len(self.rows)
        if self.engine is None:
            fn = getattr(work, method)
            if self.streamed:
                return (fn(chunk, P.take_cells(rows), *extra, *args)
                        for (rows, chunk), extra in zip(local_chunks(self.counts, self.design), per_chunk))
            return (fn(h, P, *extra, *args) for h, extra in zip(self.handles, per_chunk))
        tasks = [(h, self.cells_of(P, rows), extra) for h, rows, extra in zip(self.handles, self.rows, per_chunk)]
        return self.engine.map(_run_task, tasks, work, method, args)


def _run_task(task, work, method, args):
    chunk, P, extra = task
    return getattr(work, method)(chunk, P, *extra, *args)
