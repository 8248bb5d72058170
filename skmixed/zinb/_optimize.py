"""Penalised maximum likelihood for zinbwave's model: alternating blockwise Newton.

One iteration is

1. a pass over cell chunks: for the cells of a chunk, a Newton step on every cell's
   ``(gamma_mu, gamma_pi, W)`` (gene parameters fixed), with a backtracking line search
   per cell on that cell's penalised log-likelihood (the objective is a sum over cells
   once the gene parameters are fixed); at the accepted cell parameters the chunk's
   contributions to every gene's gradient and information are accumulated;
2. a Newton step on every gene's ``(beta_mu, alpha_mu, beta_pi, alpha_pi)`` from those
   exact full-data sums, together with a Newton step on the dispersion, and one pass to
   evaluate it, with a backtracking line search per gene;
3. zinbwave's rebalancing of ``W`` and ``alpha`` (same product ``W alpha``, smallest
   penalty), which leaves the likelihood unchanged.

Every step is accepted only if it does not decrease the penalised log-likelihood, so
the objective increases monotonically. The gene step is full-batch Newton (sums over all
cells, accumulated chunk by chunk), not a stochastic approximation; the cell steps are
exact per cell. Memory: one chunk of dense (cells x genes) arrays at a time.
"""

from __future__ import annotations

import numpy as np

from ._blocks import BlockPlan, newton_direction
from ._chunks import Chunks, ChunkWork, backtrack
from ._chunks import finite_ge as _finite_ge

ZETA_BOUNDS = (-30.0, 30.0)


#: in-memory bound of the cells' Newton statistics kept between passes, in bytes per
#: (cell x gene) entry of a chunk: 8 float64 derivative arrays, the size of one chunk's
#: evaluation (see :func:`keep_cell_stats`)
STATS_PER_CHUNK_ENTRY = 8 * 8


def keep_cell_stats(counts, n_cell_params: int) -> bool:
    """Whether a fit keeps every cell's Newton statistics from one pass to the next.

    Kept, they save a pass one evaluation (the cell pass starts from the statistics of
    the gene step's trial pass) at ``P (P + 3) / 2 + 1`` floats per cell for ``P`` cell
    parameters (``2L + K``; 91 for ``K = 10``: 145 MB at 200,000 cells). Counts in
    memory always keep them (the matrix is larger). Counts read from a file keep them
    only while they are no larger than one chunk's evaluation, so that a streamed fit's
    memory is bounded by the chunk and the parameters however many cells there are; past
    that, each cell pass recomputes them (more arithmetic; the same fit to rounding).
    """
    if not getattr(counts, "streamed", False):
        return True
    P = n_cell_params
    per_cell = (P * (P + 1) // 2 + P + 1) * 8
    return counts.n * per_cell <= STATS_PER_CHUNK_ENTRY * counts.batch_size * counts.J


class Optimizer:
    """Fits (or refits parts of) a :class:`~skmixed.zinb._model.Params` by blockwise Newton."""

    def __init__(self, counts, design, *, common_dispersion: bool, fit_genes: bool = True, fit_zeta: bool = True,
                 info_dtype=None, engine=None):
        self.counts, self.design = counts, design
        # precision of the information products (None: float64); they only steer the
        # Newton directions, and every step is accepted on the float64 objective
        self.info_dtype = info_dtype
        self.xp = design.xp
        self.common = common_dispersion
        self.fit_genes = fit_genes
        self.fit_zeta = fit_zeta
        M, L, K = design.X.shape[1], design.V.shape[1], design.K
        # cell block (gamma_mu (L), gamma_pi (L), W (K)); gene block (beta_mu, alpha_mu, beta_pi, alpha_pi)
        self.cell_plan = BlockPlan([True] * L + [False] * L + [True] * K, [False] * L + [True] * L + [True] * K)
        self.gene_plan = BlockPlan([True] * (M + K) + [False] * (M + K), [False] * (M + K) + [True] * (M + K))
        self.M, self.L, self.K = M, L, K
        self.work = ChunkWork(self.cell_plan, self.gene_plan, info_dtype, fit_genes)
        # the passes over the cells: in-process, or tasks on a Dask client (engine)
        self.chunks = Chunks(counts, design, engine)
        self.keep_stats = keep_cell_stats(counts, 2 * L + K)
        self._cache = None  # per chunk: the cells' Newton statistics at the current parameters
        self._omega = 1.0  # extrapolation factor
        self._wait = 0  # iterations before the next extrapolation attempt

    # -- objective pieces --------------------------------------------------------------
    def zeta_surrogate(self, zeta, center):
        """Per-gene share of the dispersion penalty, ``eps (zeta_j - c)^2 / (2 (J - 1))``:
        with ``c`` the current mean it majorises zinbwave's ``eps var(zeta) / 2``, so a
        per-gene increase of the surrogate objective increases the true one."""
        J = zeta.shape[0]
        if self.common or J < 2:
            return 0.0 * zeta
        return 0.5 * self.design.penalty.zeta * (zeta - center) ** 2 / (J - 1)

    def loglik_by_gene(self, P, cols=None):
        xp = self.xp
        width = self.counts.J if cols is None else int(cols.shape[0])
        total = xp.zeros(width)
        for part in self.chunks.map(self.work, "loglik", P, args=(cols,)):
            total += part
        return total

    def objective(self, P, ll_gene=None):
        if ll_gene is None:
            ll_gene = self.loglik_by_gene(P)
        ll = float(ll_gene.sum())
        return ll, ll - self.design.total_penalty(P, self.common)

    # -- 2. genes and dispersion --------------------------------------------------------------
    def cell_pass(self, P, *, update_cells: bool = True):
        """Cell steps chunk by chunk; returns the per-gene sums at the new cell parameters."""
        xp = self.xp
        J, plan = self.counts.J, self.gene_plan
        npairs = [plan.aa[0].size, plan.ab[0].size, plan.bb[0].size]
        acc = {
            "grad": xp.zeros((J, plan.P)), "S": [xp.zeros((J, k)) for k in npairs],
            "ll": xp.zeros(J), "gz": xp.zeros(J), "izz": xp.zeros(J),
        }
        cache = self._cache if update_cells else None
        self._cache = None
        # with the genes and the dispersion fixed, the cells' statistics at the accepted
        # values are the next pass's starting statistics (one evaluation per pass saved)
        keep = update_cells and not self.fit_genes and not self.fit_zeta and self.keep_stats
        self.work.fit_genes = self.fit_genes
        per_chunk = self._hand_over(cache, len(self.chunks), lambda c: (update_cells, c, keep))
        new_cache = []
        for rows, (cells, sums, stats) in zip(self.chunks.rows, self.chunks.map(self.work, "cell_pass", P, per_chunk)):
            if cells is not None:
                P.set_cell_block(cells, rows)
            new_cache.append(stats)
            for key in ("ll", "gz", "izz"):
                acc[key] += sums[key]
            if self.fit_genes:
                acc["grad"] += sums["grad"]
                for S, part in zip(acc["S"], sums["S"]):
                    S += part
        acc["H"] = plan.assemble(*acc.pop("S"))
        if keep:
            self._cache = new_cache
        return acc

    @staticmethod
    def _hand_over(cache, n_chunks, make):
        """``make(cache[k])`` for chunk after chunk, each entry dropped from ``cache`` once
        handed over: the pass then holds the statistics of the chunks not yet reached,
        not those of every chunk beside the new ones."""
        for k in range(n_chunks):
            entry = None
            if cache is not None:
                entry, cache[k] = cache[k], None
            yield make(entry)

    def _zeta_step(self, P, acc):
        xp = self.xp
        if not self.fit_zeta:
            return xp.zeros_like(P.zeta)
        J = P.zeta.shape[0]
        if self.common:
            g, h = float(acc["gz"].sum()), float(acc["izz"].sum())
            dz = g / h if h > 0 else float(np.sign(g)) * 0.5
            dz = float(np.clip(dz, -2.0, 2.0))
            return xp.full(J, dz)
        c = self.design.penalty.zeta / (J - 1) if J > 1 else 0.0
        g = acc["gz"] - c * (P.zeta - P.zeta.mean())
        h = acc["izz"] + c
        dz = xp.where(h > 0, g / xp.where(h > 0, h, 1.0), xp.sign(g) * 0.5)
        return xp.clip(dz, -2.0, 2.0)

    def gene_step(self, P, acc):
        """Newton step on every gene block with per-gene backtracking (with a per-gene
        dispersion, that gene's dispersion moves with it). Returns the per-gene
        log-likelihood at the accepted parameters."""
        xp, design = self.xp, self.design
        J = self.counts.J
        G0 = P.gene_block()
        zeta0 = P.zeta.copy()
        center = zeta0.mean()
        joint_zeta = self.fit_zeta and not self.common
        f0 = acc["ll"] - design.gene_penalty(G0) - self.zeta_surrogate(zeta0, center)
        if self.fit_genes:
            g = acc["grad"] - design.pen_gene * G0
            H = acc["H"] + xp.diag(design.pen_gene)
            d = newton_direction(H, g)
        else:
            d = xp.zeros_like(G0)
        dz = self._zeta_step(P, acc) if joint_zeta else xp.zeros(J)
        lo, hi = ZETA_BOUNDS
        step = xp.ones(J)
        G = G0 + d
        zt = xp.clip(zeta0 + dz, lo, hi)
        P.set_gene_block(G)
        P.zeta[...] = zt
        ll, cache = self._trial_pass(P)
        f = ll - design.gene_penalty(G) - self.zeta_surrogate(zt, center)

        def retry(cols):
            G[cols] = G0[cols] + step[cols, None] * d[cols]
            P.set_gene_block(G[cols], cols)
            zt[cols] = xp.clip(zeta0[cols] + step[cols] * dz[cols], lo, hi)
            P.zeta[cols] = zt[cols]
            ll[cols] = self.loglik_by_gene(P, cols)
            return ll[cols] - design.gene_penalty(G[cols]) - self.zeta_surrogate(zt, center)[cols]

        backtrack(~_finite_ge(f, f0, xp), step, retry, f, f0, xp)
        # the cells' statistics of the trial pass hold where every gene took its full step;
        # for the others, swap their trial contributions for those at the accepted values
        moved = xp.flatnonzero(step != 1.0)
        if moved.size and cache is not None:
            trial = P.copy()
            trial.set_gene_block((G0 + d)[moved], moved)
            trial.zeta[moved] = xp.clip(zeta0[moved] + dz[moved], lo, hi)
            # the trial values travel with each task, the accepted ones as its parameters
            per_chunk = ((self.chunks.cells_of(trial, rows),) for rows in self.chunks.rows)
            for k, delta in enumerate(self.chunks.map(self.work, "moved", P, per_chunk, args=(moved,))):
                cache[k] = tuple(c + dd for c, dd in zip(cache[k], delta))
        self._cache = cache
        return ll

    def _trial_pass(self, P):
        """Per-gene log-likelihood at ``P`` and, per chunk, the cells' Newton statistics
        (None when they are not kept: the pass is then a log-likelihood pass)."""
        if not self.keep_stats:
            return self.loglik_by_gene(P), None
        xp = self.xp
        ll = xp.zeros(self.counts.J)
        cache = []
        for part, stats in self.chunks.map(self.work, "trial", P):
            ll += part
            cache.append(stats)
        return ll, cache

    def common_zeta_step(self, P, acc, ll_gene, min_gain=0.0):
        """Newton step on the common dispersion (derivatives from ``acc``), with
        backtracking on the total log-likelihood, skipped when its predicted gain is
        below ``min_gain``. Returns the per-gene log-likelihood."""
        if not (self.fit_zeta and self.common):
            return ll_gene
        g, h = float(acc["gz"].sum()), float(acc["izz"].sum())
        dz = float(self._zeta_step(P, acc)[0])
        if abs(dz) < 1e-12 or (h > 0 and 0.5 * g * g / h < min_gain):
            return ll_gene
        self._cache = None
        z0 = float(P.zeta[0])
        old = float(ll_gene.sum())
        for _ in range(6):
            P.zeta[...] = float(np.clip(z0 + dz, *ZETA_BOUNDS))
            ll = self.loglik_by_gene(P)
            new = float(ll.sum())
            if np.isfinite(new) and new >= old - 1e-12 * abs(old):
                return ll
            dz *= 0.25
        P.zeta[...] = z0
        return ll_gene

    # -- 3. rebalancing ------------------------------------------------------------------------
    def orthogonalize(self, P, acc=None):
        """zinbwave's ``orthogonalizeTraceNorm``: same ``W alpha``, minimal ridge penalty.

        With ``acc``, the accumulated gene gradients and information are carried over to
        the new coordinates (``alpha_new = T^-1 alpha`` for ``W_new = W T``)."""
        if self.K == 0:
            return
        xp = self.xp
        eps_W, eps_a = self.design.penalty.W, self.design.penalty.alpha
        if eps_W <= 0 or eps_a <= 0:
            return
        A = xp.concatenate([P.alpha_mu, P.alpha_pi], axis=1)  # (K, 2J)
        Qw, Rw = xp.linalg.qr(P.W)
        dg = xp.abs(xp.diagonal(Rw))
        if not bool(xp.all(dg > 1e-10 * xp.max(dg))):
            return  # W is rank deficient: the rebalancing is not a change of coordinates
        Qa, Ra = xp.linalg.qr(A.T)
        U, s, Vt = xp.linalg.svd(Rw @ Ra.T)
        sc = (eps_W / eps_a) ** 0.25
        rs = xp.sqrt(s)
        # signs as close as possible to the current W, so that iterates can be extrapolated
        sign = xp.where(xp.sum((Qw @ U) * P.W, axis=0) < 0, -1.0, 1.0)
        U = U * sign
        Vt = Vt * sign[:, None]
        W = (Qw @ U) * rs / sc
        A2 = ((Qa @ Vt.T) * rs * sc).T
        J = P.alpha_mu.shape[1]
        if acc is not None and self.fit_genes:
            T = xp.linalg.solve(Rw, U * rs / sc)  # W_new = W_old T
            M, K = self.M, self.K
            R = xp.eye(2 * (M + K))
            R[M:M + K, M:M + K] = T
            R[2 * M + K:, 2 * M + K:] = T
            acc["grad"] = acc["grad"] @ R
            acc["H"] = R.T @ acc["H"] @ R
        P.W[...] = W
        P.alpha_mu[...] = A2[:, :J]
        P.alpha_pi[...] = A2[:, J:]

    # -- acceleration --------------------------------------------------------------------------
    def _extrapolate(self, P, prev, ll_gene, ll, pen_ll):
        """Try ``P + omega (P - prev)``: alternating block updates creep along the
        valley that couples ``W`` and ``alpha``; a step along the last move, accepted
        only if it raises the penalised log-likelihood, shortens the creep. ``omega``
        grows after a success and shrinks after a failure."""
        xp = self.xp
        omega = self._omega
        Q = P.copy()
        for name in ("beta_mu", "beta_pi", "gamma_mu", "gamma_pi", "W", "alpha_mu", "alpha_pi", "zeta"):
            cur = getattr(P, name)
            setattr(Q, name, cur + omega * (cur - getattr(prev, name)))
        Q.zeta = xp.clip(Q.zeta, *ZETA_BOUNDS)
        ll_q, cache = self._trial_pass(Q)
        ll_tot, pen_q = self.objective(Q, ll_q)
        if np.isfinite(pen_q) and pen_q > pen_ll:
            for name in ("beta_mu", "beta_pi", "gamma_mu", "gamma_pi", "W", "alpha_mu", "alpha_pi", "zeta"):
                getattr(P, name)[...] = getattr(Q, name)
            self._cache = cache
            self._omega = min(2.0 * omega, 8.0)
            return ll_q, ll_tot, pen_q
        self._omega = max(0.5 * omega, 0.5)
        return ll_gene, ll, pen_ll

    # -- driver ------------------------------------------------------------------------------
    def zeta_only(self, P, n_steps: int = 4, tol: float = 1e-3):
        """Newton on the dispersion alone (zinbwave optimises it first, from zeta = 0)."""
        saved = (self.fit_genes,)
        self.fit_genes = False
        try:
            for _ in range(n_steps):
                acc = self.cell_pass(P, update_cells=False)
                before = P.zeta.copy()
                if self.common:
                    self.common_zeta_step(P, acc, acc["ll"])
                else:
                    self.gene_step(P, acc)
                if float(self.xp.max(self.xp.abs(P.zeta - before))) < tol:
                    break
        finally:
            (self.fit_genes,) = saved

    def run(self, P, *, max_iter: int, tol: float, callback=None):
        """Iterate until the relative gain of the penalised log-likelihood is below ``tol``.

        Returns ``(history, converged)`` with the penalised log-likelihood after each
        iteration (``history[0]``: at the start).
        """
        ll, pen_ll = self.objective(P)
        history = [pen_ll]
        converged = False
        prev = None
        for _ in range(max_iter):
            acc = self.cell_pass(P)
            if self.fit_genes:
                self.orthogonalize(P, acc)
            ll_gene = acc["ll"]
            if self.fit_genes or (self.fit_zeta and not self.common):
                ll_gene = self.gene_step(P, acc)
            # the common dispersion's step costs a pass and the cells' cached statistics:
            # take it when its predicted gain is not negligible beside the last iteration's
            last_gain = history[-1] - history[-2] if len(history) > 1 else np.inf
            min_gain = max(1e-3 * tol * abs(history[-1]), 0.05 * last_gain if np.isfinite(last_gain) else 0.0)
            ll_gene = self.common_zeta_step(P, acc, ll_gene, min_gain=min_gain)
            ll, pen_ll = self.objective(P, ll_gene)
            # extrapolate once the iterations creep (relative gain < 1e-4), and wait two
            # iterations after a failed attempt: each attempt costs a pass
            self._wait = max(self._wait - 1, 0)
            creeping = abs(pen_ll - history[-1]) < 1e-4 * abs(history[-1])
            if self.fit_genes and prev is not None and creeping and self._wait == 0:
                before = pen_ll
                ll_gene, ll, pen_ll = self._extrapolate(P, prev, ll_gene, ll, pen_ll)
                if pen_ll == before:
                    self._wait = 2
            prev = P.copy() if self.fit_genes else None
            history.append(pen_ll)
            if callback is not None:
                callback(len(history) - 1, ll, pen_ll)
            if abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
                converged = True
                break
        if self.fit_genes and len(history) > 1:
            self.orthogonalize(P)
            history[-1] = self.objective(P, ll_gene)[1]
        return history, converged
