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
from ._evaluate import evaluate

MAX_HALVINGS = 12
ZETA_BOUNDS = (-30.0, 30.0)


def _finite_ge(new, old, xp):
    """``new >= old`` with NaN counted as a decrease, allowing round-off."""
    tol = 1e-12 * xp.maximum(xp.abs(old), 1.0)
    return xp.isfinite(new) & (new >= old - tol)


class Optimizer:
    """Fits (or refits parts of) a :class:`~skmixed.zinb._model.Params` by blockwise Newton."""

    def __init__(self, counts, design, *, common_dispersion: bool, fit_genes: bool = True, fit_zeta: bool = True):
        self.counts, self.design = counts, design
        self.xp = design.xp
        self.common = common_dispersion
        self.fit_genes = fit_genes
        self.fit_zeta = fit_zeta
        M, L, K = design.X.shape[1], design.V.shape[1], design.K
        # cell block (gamma_mu (L), gamma_pi (L), W (K)); gene block (beta_mu, alpha_mu, beta_pi, alpha_pi)
        self.cell_plan = BlockPlan([True] * L + [False] * L + [True] * K, [False] * L + [True] * L + [True] * K)
        self.gene_plan = BlockPlan([True] * (M + K) + [False] * (M + K), [False] * (M + K) + [True] * (M + K))
        self.M, self.L, self.K = M, L, K

    # -- design vectors --------------------------------------------------------------
    def _cell_designs(self, P, cols=None):
        xp = self.xp
        V = self.design.V if cols is None else self.design.V[cols]
        am = P.alpha_mu.T if cols is None else P.alpha_mu[:, cols].T
        ap = P.alpha_pi.T if cols is None else P.alpha_pi[:, cols].T
        Z = xp.zeros_like(V)
        return xp.concatenate([V, Z, am], axis=1), xp.concatenate([Z, V, ap], axis=1)

    def _gene_designs(self, P, rows):
        xp = self.xp
        A = xp.concatenate([self.design.X[rows], P.W[rows]], axis=1)
        Z = xp.zeros_like(A)
        return xp.concatenate([A, Z], axis=1), xp.concatenate([Z, A], axis=1)

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
        for rows in self.counts.chunks:
            (ll,) = evaluate(self.design, self.counts, P, rows, cols, derivs=False)
            total += ll.sum(axis=0)
        return total

    def objective(self, P, ll_gene=None):
        if ll_gene is None:
            ll_gene = self.loglik_by_gene(P)
        ll = float(ll_gene.sum())
        return ll, ll - self.design.total_penalty(P, self.common)

    # -- 1. cells ------------------------------------------------------------------------
    def _cell_newton_chunk(self, P, rows):
        """Newton step with per-cell backtracking for the cells ``rows``; returns the
        derivative arrays at the accepted parameters (with dispersion derivatives)."""
        xp, design = self.xp, self.design
        start = rows.start
        E0 = evaluate(design, self.counts, P, rows, derivs=True, zeta=False)
        C0 = P.cell_block(rows)
        f0 = E0[0].sum(axis=1) - design.cell_penalty(C0)
        Umu, Upi = self._cell_designs(P)
        plan = self.cell_plan
        g = plan.gradient(Umu, Upi, E0[1], E0[2], units_are_rows=True) - design.pen_cell * C0
        H = plan.assemble(*plan.pair_sums(Umu, Upi, *E0[3:6], units_are_rows=True))
        H += xp.diag(design.pen_cell)
        d = newton_direction(H, g)
        del E0, H
        step = xp.ones(C0.shape[0])
        C = C0 + d
        P.set_cell_block(C, rows)
        E = list(evaluate(design, self.counts, P, rows, derivs=True, zeta=True))
        f = E[0].sum(axis=1) - design.cell_penalty(C)
        bad = ~_finite_ge(f, f0, xp)
        for it in range(MAX_HALVINGS + 1):
            idx = xp.flatnonzero(bad)
            if idx.size == 0:
                break
            last = it == MAX_HALVINGS
            step[idx] = 0.0 if last else step[idx] * 0.5
            C[idx] = C0[idx] + step[idx, None] * d[idx]
            P.set_cell_block(C[idx], idx + start)
            Es = evaluate(design, self.counts, P, idx + start, derivs=True, zeta=True)
            for full, part in zip(E, Es):
                full[idx] = part
            f[idx] = Es[0].sum(axis=1) - design.cell_penalty(C[idx])
            bad[idx] = False if last else ~_finite_ge(f[idx], f0[idx], xp)
        return E

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
        for rows in self.counts.chunks:
            if update_cells:
                E = self._cell_newton_chunk(P, rows)
            else:
                E = evaluate(self.design, self.counts, P, rows, derivs=True, zeta=True)
            acc["ll"] += E[0].sum(axis=0)
            acc["gz"] += E[6].sum(axis=0)
            acc["izz"] += E[7].sum(axis=0)
            if self.fit_genes:
                Umu, Upi = self._gene_designs(P, rows)
                acc["grad"] += plan.gradient(Umu, Upi, E[1], E[2], units_are_rows=False)
                for S, part in zip(acc["S"], plan.pair_sums(Umu, Upi, *E[3:6], units_are_rows=False)):
                    S += part
        return acc

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
        """Newton step on every gene block (and the dispersion) with per-gene backtracking.
        Returns the per-gene log-likelihood at the accepted parameters."""
        xp, design = self.xp, self.design
        J = self.counts.J
        G0 = P.gene_block()
        zeta0 = P.zeta.copy()
        center = zeta0.mean()
        f0 = acc["ll"] - design.gene_penalty(G0) - self.zeta_surrogate(zeta0, center)
        if self.fit_genes:
            g = acc["grad"] - design.pen_gene * G0
            H = self.gene_plan.assemble(*acc["S"]) + xp.diag(design.pen_gene)
            d = newton_direction(H, g)
        else:
            d = xp.zeros_like(G0)
        dz = self._zeta_step(P, acc)
        lo, hi = ZETA_BOUNDS
        for attempt in range(4 if self.common else 1):
            step = xp.ones(J)
            G = G0 + d
            zt = xp.clip(zeta0 + dz, lo, hi)
            P.set_gene_block(G)
            P.zeta[...] = zt
            ll = self.loglik_by_gene(P)
            f = ll - design.gene_penalty(G) - self.zeta_surrogate(zt, center)
            bad = ~_finite_ge(f, f0, xp)
            for it in range(MAX_HALVINGS + 1):
                cols = xp.flatnonzero(bad)
                if cols.size == 0:
                    break
                last = it == MAX_HALVINGS
                step[cols] = 0.0 if last else step[cols] * 0.5
                G[cols] = G0[cols] + step[cols, None] * d[cols]
                P.set_gene_block(G[cols], cols)
                if not self.common:
                    zt[cols] = xp.clip(zeta0[cols] + step[cols] * dz[cols], lo, hi)
                    P.zeta[cols] = zt[cols]
                ll[cols] = self.loglik_by_gene(P, cols)
                f[cols] = ll[cols] - design.gene_penalty(G[cols]) - self.zeta_surrogate(zt, center)[cols]
                bad[cols] = False if last else ~_finite_ge(f[cols], f0[cols], xp)
            if not self.common or float(f.sum()) >= float(f0.sum()) - 1e-12 * abs(float(f0.sum())):
                return ll
            dz = dz * (0.0 if attempt == 2 else 0.25)  # the common dispersion overshot: shrink it
        return ll

    # -- 3. rebalancing ------------------------------------------------------------------------
    def orthogonalize(self, P):
        """zinbwave's ``orthogonalizeTraceNorm``: same ``W alpha``, minimal ridge penalty."""
        if self.K == 0:
            return
        xp = self.xp
        eps_W, eps_a = self.design.penalty.W, self.design.penalty.alpha
        if eps_W <= 0 or eps_a <= 0:
            return
        A = xp.concatenate([P.alpha_mu, P.alpha_pi], axis=1)  # (K, 2J)
        Qw, Rw = xp.linalg.qr(P.W)
        Qa, Ra = xp.linalg.qr(A.T)
        U, s, Vt = xp.linalg.svd(Rw @ Ra.T)
        sc = (eps_W / eps_a) ** 0.25
        rs = xp.sqrt(s)
        W = (Qw @ U) * rs / sc
        A2 = ((Qa @ Vt.T) * rs * sc).T
        J = P.alpha_mu.shape[1]
        P.W[...] = W
        P.alpha_mu[...] = A2[:, :J]
        P.alpha_pi[...] = A2[:, J:]

    # -- driver ------------------------------------------------------------------------------
    def zeta_only(self, P, n_steps: int = 6, tol: float = 1e-8):
        """Newton on the dispersion alone (zinbwave optimises it first, from zeta = 0)."""
        saved = (self.fit_genes,)
        self.fit_genes = False
        try:
            for _ in range(n_steps):
                acc = self.cell_pass(P, update_cells=False)
                before = P.zeta.copy()
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
        for _ in range(max_iter):
            acc = self.cell_pass(P)
            if self.fit_genes or self.fit_zeta:
                ll_gene = self.gene_step(P, acc)
            else:
                ll_gene = acc["ll"]
            if self.fit_genes:
                self.orthogonalize(P)
            ll, pen_ll = self.objective(P, ll_gene)
            history.append(pen_ll)
            if callback is not None:
                callback(len(history) - 1, ll, pen_ll)
            if abs(history[-1] - history[-2]) <= tol * abs(history[-2]):
                converged = True
                break
        return history, converged
