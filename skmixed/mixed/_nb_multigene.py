"""NegativeBinomialGLMM over a count matrix: one NB2 random-intercept GLMM per gene,
each with its own size, fitted by batched Newton over ``(theta, beta, phi)``.

Unlike Poisson, the NB2 likelihood does not reduce to sums of counts per distinct
row, so cells are visited individually, but only where the count is non-zero. Cells
are grouped into *pairs* (grouping level ``l``, distinct row ``k`` of ``X``); within a
pair the linear predictor differs only by the offset. Every quantity of the Laplace
fit is a sum over cells of

* the zero-count formula, summed over *all* cells of the pair: a function of one
  number per gene and pair, tabulated once for every gene
  (:class:`~skmixed.mixed._nb_zeros.ZeroSumTable`, exact to ~1e-13), plus
* for the non-zero counts only, the difference between the true formula and the
  zero-count one (short closed forms, below).

So one evaluation costs ``O(genes x pairs + non-zeros)``. The Laplace deviance, its
gradient and the Newton matrix are those of :class:`~skmixed.mixed._nbglmm.NBLaplaceProblem`
(observed information, glmmTMB's) specialised to one scalar random intercept, so a
gene's answer is that of :class:`~skmixed.NegativeBinomialGLMM` fitted to it alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._families import NegativeBinomial, Poisson
from .._inputs import MatrixReader
from .._parallel import Engine, call_item
from .._progress import progress
from ..glm._newton import fit_glm
from . import _nb_fused as _fused
from ._gene_chunks import check_count_values
from ._laplace import abs_eigen_step
from ._multigene import wald_contrasts
from ._nb_cells import NonZeros, PairDesign
from ._nb_reml import TOL_STEP, NBRemlMixin, quietly

PHI_FLOOR = 1e-12  # as in _nbglmm: phi = 0 is evaluated as size 1e12


@dataclass
class NBBatchResult:
    params: np.ndarray  # (G, p + 2): theta, beta, phi
    cov: np.ndarray  # (G, p + 2, p + 2): twice the inverse Hessian of the deviance
    deviance: np.ndarray  # (G,) -2 Laplace log-likelihood, every constant included
    u: np.ndarray  # (G, L) spherical conditional modes
    M: np.ndarray  # (G, L) 1 + theta^2 W_l at the mode
    converged: np.ndarray  # (G,)


class BatchedNBLaplace(NBRemlMixin):
    """Laplace deviance of ``G`` random-intercept NB2 GLMMs sharing ``design``."""

    def __init__(self, design: PairDesign, nz: NonZeros):
        self.d, self.nz = design, nz
        self.G, self.L, self.p = nz.G, design.L, design.p

    def subset(self, rows):
        sub = BatchedNBLaplace(self.d, self.nz.subset(rows))
        if getattr(self, "_fz", None) is not None:
            sub._fz = self._fz[rows]
        return sub

    # -- sums over cells per gene and pair ---------------------------------------------
    def _pair_sums(self, c, phi, full):
        """Per (gene, pair): score s and weight W (and, if ``full``, the log-likelihood,
        dW/deta and the phi derivatives of loglik, s and W), zeros through the table
        and the non-zero counts' corrections added."""
        d, nz = self.d, self.nz
        G, P = c.shape
        pe = np.maximum(phi, PHI_FLOOR)
        r = 1.0 / pe
        which = range(5) if full else (1, 2)
        A = d.zeros(c, which)
        rc = r[:, None]
        if full:
            A0, A1, A2, A3, AG = (A[..., j] for j in range(5))
            out = {
                "ll": -rc * A0, "s": -rc * A1, "W": rc * (A1 - A2), "Wd": rc * (A1 - 3.0 * A2 + 2.0 * A3),
                "dl": rc * rc * AG, "ds": rc * rc * A2, "dW": -2.0 * rc * rc * (A2 - A3),
            }
        else:
            A1, A2 = A[..., 0], A[..., 1]
            out = {"s": -rc * A1, "W": rc * (A1 - A2)}
        if nz.nnz == 0:
            return out
        if _fused.AVAILABLE:
            return self._pair_sums_fused(c, pe, full, out)
        g = nz.gene
        ce = c[g, nz.pair] + nz.o  # log(phi mu) of each non-zero cell
        y, w = nz.y, nz.w
        ec = np.exp(np.minimum(ce, 700.0))
        q = 1.0 + ec
        flat = g * P + nz.pair
        add = {"s": w * y / q, "W": w * y * ec / (q * q)}
        if full:
            mu = ec * r[g]
            ll, dl = nz.count_terms(pe[g], mu, q)
            # ll carries + y log phi, which y (ce - softplus(ce)) = y log(phi mu / (1 + phi mu)) has too
            add["ll"] = w * (ll + y * (ce - np.log(pe[g]) - np.logaddexp(0.0, ce)))
            add["Wd"] = w * y * ec * (1.0 - ec) / (q * q * q)
            add["dl"] = w * dl
            add["ds"] = -w * y * mu / (q * q)
            add["dW"] = w * y * mu * (1.0 - ec) / (q * q * q)
        for key, val in add.items():
            out[key] = out[key] + np.bincount(flat, weights=val, minlength=G * P).reshape(G, P)
        return out

    def _pair_sums_fused(self, c, pe, full, out):
        """The non-zero corrections of :meth:`_pair_sums` in one compiled pass over the
        block's entries of the view's genes."""
        nz = self.nz
        G, P = c.shape
        sh, b = nz.base_cache(), nz.base
        acc = np.zeros((G * P, len(_fused.KEYS)))
        _fused.entry_pass(np.ascontiguousarray(c).ravel(), P, nz.rows, nz.base_indptr, b["pair"], b["o"], b["y"],
                          b["w"], pe, sh["small"], sh["log_fact"], full, acc)
        big, g = nz.big_entries() if full and sh["big"].size else (sh["big"][:0], None)
        if big.size:  # large or non-integer counts: the family's formulas
            pair = b["pair"][big]
            ce = c[g, pair] + b["o"][big]
            ec = np.exp(np.minimum(ce, 700.0))
            mu = ec / pe[g]
            yb, wb = b["y"][big], b["w"][big]
            fam = NegativeBinomial(1.0 / pe[g])
            flat = g * P + pair
            ll = wb * (fam.log_normaliser(yb) + yb * (ce - np.logaddexp(0.0, ce)))
            dl = -wb * fam.size * (fam.size_score(yb, mu) - fam.size_score(np.zeros_like(yb), mu))
            acc[:, 2] += np.bincount(flat, weights=ll, minlength=G * P)
            acc[:, 4] += np.bincount(flat, weights=dl, minlength=G * P)
        for j, key in enumerate(_fused.KEYS):
            if key in out:
                out[key] = out[key] + acc[:, j].reshape(G, P)
        return out

    def _c(self, theta, beta, phi, u):
        d = self.d
        return (beta @ d.Xp.T) + theta[:, None] * u[:, d.pair_level] + np.log(np.maximum(phi, PHI_FLOOR))[:, None]

    def _level(self, a):
        return (self.d.to_level @ a.T).T

    # -- PIRLS: one concave scalar problem per gene and level ---------------------------
    def mode(self, theta, beta, phi, u, max_iter=60):
        """Root of ``theta S_l(u) - u_l`` per gene and level (the mode of the penalised
        log-likelihood), by Newton steps halved where ``|gradient|`` would grow."""
        t = theta[:, None]

        def grad(v):
            ps = self._pair_sums(self._c(theta, beta, phi, v), phi, False)
            S, W = self._level(ps["s"]), self._level(ps["W"])
            return t * S - v, 1.0 + t * t * W

        g, M = grad(u)
        for _ in range(max_iter):
            step = g / M
            done = np.abs(step) <= TOL_STEP * (1.0 + np.abs(u))  # the last step left ~1e-14
            if np.all(done):
                return u + step
            lam = np.ones_like(u)
            for _ in range(60):
                u_new = u + lam * step
                g_new, M_new = grad(u_new)
                ok = done | (np.abs(g_new) <= np.abs(g)) | (lam < 1e-12)
                if np.all(ok):
                    break
                lam = np.where(ok, lam, 0.5 * lam)
            # done levels took their full step (lam stays 1): the last pass is at u_new
            u, g, M = u_new, g_new, M_new
        return u

    # -- deviance and exact gradient ------------------------------------------------------
    def evaluate(self, params, u0):
        """Deviance (G,), gradient (G, p + 2), state and d u / d params (G, L, p + 2)."""
        d = self.d
        theta, beta, phi = params[:, 0], params[:, 1:-1], np.maximum(params[:, -1], 0.0)
        u = self.mode(theta, beta, phi, u0)
        ps = self._pair_sums(self._c(theta, beta, phi, u), phi, True)
        t = theta[:, None]
        S, W, Wd = (self._level(ps[k]) for k in ("s", "W", "Wd"))
        M = 1.0 + t * t * W
        dev = -2.0 * ps["ll"].sum(axis=1) + (u * u).sum(axis=1) + np.log(M).sum(axis=1)
        G, L, p = self.G, self.L, self.p
        du_t = (S - t * u * W) / M
        g_t = -2.0 * (u * S).sum(axis=1) + ((2.0 * t * W + t * t * Wd * (u + t * du_t)) / M).sum(axis=1)
        XW = (d.to_level_x @ ps["W"].T).T.reshape(G, L, p)
        XWd = (d.to_level_x @ ps["Wd"].T).T.reshape(G, L, p)
        du_b = -(t / M)[:, :, None] * XW
        tm = (t * t / M)[:, :, None]
        g_b = -2.0 * (ps["s"] @ d.Xp) + (tm * (XWd + (Wd * t)[:, :, None] * du_b)).sum(axis=1)
        ds, dW = self._level(ps["ds"]), self._level(ps["dW"])
        du_f = t * ds / M
        g_f = -2.0 * ps["dl"].sum(axis=1) + (t * t / M * (dW + Wd * t * du_f)).sum(axis=1)
        grad = np.concatenate([g_t[:, None], g_b, g_f[:, None]], axis=1)
        du = np.concatenate([du_t[:, :, None], du_b, du_f[:, :, None]], axis=2)
        schur = (ps["W"] @ d.XX).reshape(G, p, p) - np.swapaxes(XW * (tm / 1.0), 1, 2) @ XW
        return dev, grad, (u, M, schur), du

    def _grad_columns(self, params, u, du, g0, h_rel, cols, forward=False):
        """Differences of the gradient along ``cols`` (central; one-sided second order
        where phi would go negative; ``forward``: first order, one evaluation per
        column, enough for a Newton direction), PIRLS started from the first-order mode."""
        G, P = params.shape
        H = np.zeros((G, P, len(cols)))
        for j, c in enumerate(cols):
            h = h_rel * np.maximum(1.0, np.abs(params[:, c]))
            one_sided = (c == P - 1) & (params[:, c] < h)
            e = np.zeros_like(params)
            e[:, c] = h
            shift = h[:, None] * du[:, :, c]
            gp = self.evaluate(params + e, u + shift)[1]
            if forward:
                H[:, :, j] = (gp - g0) / h[:, None]
                continue
            gm_params = np.where(one_sided[:, None], params + 2 * e, params - e)
            gm_u = np.where(one_sided[:, None], u + 2 * shift, u - shift)
            gm = self.evaluate(gm_params, gm_u)[1]
            central = (gp - gm) / (2.0 * h[:, None])
            second = (-3.0 * g0 + 4.0 * gp - gm) / (2.0 * h[:, None])
            H[:, :, j] = np.where(one_sided[:, None], second, central)
        return H

    def _newton_step(self, params, g, du, state, f):
        """Step per gene: theta and phi columns of the Newton matrix by differences,
        the beta block twice the Schur complement; theta and phi held at 0 where the
        deviance rises from there (|eigenvalues| where the matrix is indefinite)."""
        G, P = params.shape
        u, _, schur = state
        cols = [0, P - 1]
        Hc = self._grad_columns(params, u, du, g, 1e-5, cols, forward=True)
        H = np.empty((G, P, P))
        H[:, 1:-1, 1:-1] = 2.0 * schur
        H[:, :, cols] = Hc
        H[:, cols, :] = np.swapaxes(Hc, 1, 2)
        H[:, 0, -1] = H[:, -1, 0] = 0.5 * (Hc[:, 0, 1] + Hc[:, -1, 0])
        at_zero = params[:, cols] <= 1e-12
        curv = np.stack([Hc[:, 0, 0], Hc[:, -1, 1]], axis=1)
        # theta = 0 is a stationary point by symmetry, left where the curvature is
        # negative; phi = 0 is a true boundary, held wherever the deviance rises from it
        escape = at_zero & (curv < 0) & np.array([True, False])
        fixed = at_zero & (g[:, cols] >= 0) & ~escape
        gg = g.copy()
        for j, c in enumerate(cols):
            fx = fixed[:, j]
            H[fx, c, :] = 0.0
            H[fx, :, c] = 0.0
            H[fx, c, c] = 1.0
            gg[fx, c] = 0.0
        step = abs_eigen_step(0.5 * (H + np.swapaxes(H, 1, 2)), gg)
        for j, c in enumerate(cols):
            step[:, c] = np.where(escape[:, j], 0.1, step[:, c])
        dec = -np.sum(gg * step, axis=1)
        return step, (dec < 1e-15 * np.maximum(1.0, np.abs(f))) & ~escape.any(axis=1)

    @staticmethod
    def _project(params):
        out = params.copy()
        out[:, 0] = np.abs(out[:, 0])  # theta and -theta fit alike
        # phi < 0 is no distribution; below 1e-10 it is the Poisson boundary itself (the
        # deviance differs from there by less than round-off)
        out[:, -1] = np.where(out[:, -1] < 1e-10, 0.0, out[:, -1])
        return out

    def fit(self, params0, *, max_iter=200, hessian_cov=True, reml=False):
        """Laplace fits of every gene: maximum likelihood, or under ``reml``
        :meth:`fit_reml` from ``params0``."""
        params = self._project(params0)
        G, P = params.shape
        if reml:
            # the REML optimum does not need the ML one as its start (beta is profiled
            # out): from the moment start it takes as many Newton steps as from the ML fit
            u0 = np.zeros((G, self.L))
            return NBBatchResult(*self.fit_reml(params, u0, max_iter=max_iter, hessian_cov=hessian_cov))
        f, g, state, du = self.evaluate(params, np.zeros((G, self.L)))
        state = list(state)
        done = np.zeros(G, dtype=bool)
        for _, act, eng in self._rounds(done, max_iter):
            pa, fa, ga = params[act], f[act], g[act]
            st = [x[act] for x in state]
            step, small = eng._newton_step(pa, ga, du[act], st, fa)
            # theta moves at most by 1 + its size at first; the line search does the rest
            t = np.minimum(1.0, (1.0 + pa[:, 0]) / np.maximum(np.abs(step[:, 0]), 1e-300))
            trial, outs, ok = eng._line_search(
                lambda t: self._project(pa + t[:, None] * step),  # noqa: B023
                quietly(eng, lambda sub, tp, rows: _flat(sub.evaluate(tp, st[0][rows]))),  # noqa: B023
                fa, lambda r, tp: np.sum(ga[r] * (tp - pa[r]), axis=1), small, t, 60,  # noqa: B023
            )
            # no descent along the Newton direction: at round-off, stop there
            done[act] = small | ~ok
            move = ok & ~small
            rows = act[move]
            if rows.size:
                f_new, g_new, du_new, *st_new = outs
                params[rows], f[rows], g[rows], du[rows] = trial[move], f_new[move], g_new[move], du_new[move]
                for x, x_new in zip(state, st_new):
                    x[rows] = x_new[move]
        bound = np.zeros_like(g, dtype=bool)
        bound[:, [0, -1]] = (params[:, [0, -1]] <= 1e-12) & (g[:, [0, -1]] >= 0)
        converged = done & (np.max(np.abs(np.where(bound, 0.0, g)), axis=1) < 1e-2)
        u, M = state[0], state[1]
        cov = np.full((G, P, P), np.nan)
        if hessian_cov:
            H = self._grad_columns(params, u, du, g, 1e-4, list(range(P)))
            H = 0.5 * (H + np.swapaxes(H, 1, 2))
            # at a boundary (theta or phi = 0) that parameter is held there
            for c in (0, P - 1):
                at = params[:, c] <= 1e-8
                H[at, c, :] = 0.0
                H[at, :, c] = 0.0
                H[at, c, c] = 1.0
            with np.errstate(invalid="ignore"):
                ok = np.all(np.isfinite(H), axis=(1, 2))
                cov[ok] = 2.0 * np.linalg.inv(H[ok])
        else:
            cov[:, 1:-1, 1:-1] = np.linalg.inv(state[2])
        return NBBatchResult(params, cov, f, u, M, converged)


def _flat(evaluated):
    """``evaluate``'s answer as one tuple of per-gene arrays (deviance first)."""
    f, g, state, du = evaluated
    return (f, g, du, *state)


# -- the many-gene fit ------------------------------------------------------------------
CHUNK_GENES = 500  # genes fitted at once: (genes x pairs) working arrays stay small


def _start(design: PairDesign, nz: NonZeros):
    """Starting ``(theta, beta, phi)`` per gene: a Poisson GLM on the distinct rows of X,
    the spread of the level totals around it (theta) and the moment estimate of the
    overdispersion left after the level effects (phi)."""
    d = design
    G, P = nz.G, d.P
    flat = nz.gene * P + nz.pair
    Ypair = np.bincount(flat, weights=nz.w * nz.y, minlength=G * P).reshape(G, P)
    to_row = sp.csr_matrix((np.ones(P), (d.pair_row, np.arange(P))), shape=(d.K, P))
    Yk = (to_row @ Ypair.T)  # (K, G)
    ok = np.log(to_row @ d.C1) + d.shift
    beta = fit_glm(d.Xd, Yk, Poisson, offset=ok, tol=1e-6, max_iter=25).coef  # (G, p)
    e = np.exp(np.clip(beta @ d.Xp.T + d.shift, -700, 700))  # (G, P): rate per unit e^o
    ylev = (d.to_level @ Ypair.T).T
    slev = (d.to_level @ (e * d.C1).T).T
    ratio = (ylev + 0.5) / (slev + 0.5)
    lr = np.log(ratio)
    theta = np.sqrt(np.maximum(np.var(lr, axis=1) - np.mean(1.0 / (ylev + 0.5), axis=1), 0.01))
    rp = ratio[:, d.pair_level] * e  # (G, P)
    mu_e = rp[nz.gene, nz.pair] * np.exp(nz.o - d.shift)
    wy = nz.w * nz.y
    sum_y2 = np.bincount(nz.gene, weights=wy * nz.y, minlength=G)
    sum_ymu = np.bincount(nz.gene, weights=wy * mu_e, minlength=G)
    sum_y = np.bincount(nz.gene, weights=wy, minlength=G)
    sum_mu2 = (rp * rp * d.C2[None, :]).sum(axis=1)
    phi = (sum_y2 - 2.0 * sum_ymu + sum_mu2 - sum_y) / np.maximum(sum_mu2, 1e-300)
    return np.concatenate([theta[:, None], beta, np.clip(phi, 0.05, 20.0)[:, None]], axis=1)


def fit_many_nb(fixed, Y, codes, levels, offset, weights, *, names, fixed_names, group_name, vcov,
                verbose=0, term_df=None, exact_zeros=False, reml=False, **_engine):
    """Fit one random-intercept NB2 GLMM per column of ``Y`` (n x G): the dict of
    per-gene arrays and tables of :func:`skmixed.mixed._multigene.fit_many`, with the
    per-gene ``size`` and ``size_se`` and the flag ``"poisson_limit"``."""
    n, G = Y.shape
    L, p = len(levels), fixed.shape[1]
    off = np.zeros(n) if offset is None else offset
    w = np.ones(n) if weights is None else weights
    design = PairDesign(fixed, codes, L, off, w, exact_zeros=exact_zeros)
    out = {
        "beta": np.full((G, p), np.nan), "cov": np.full((G, p, p), np.nan), "theta": np.full(G, np.nan),
        "phi": np.full(G, np.nan), "phi_var": np.full(G, np.nan), "loglik": np.full(G, np.nan),
        "converged": np.zeros(G, dtype=bool), "b": np.full((G, L), np.nan), "condsd": np.full((G, L), np.nan),
        "totals": np.zeros(G), "saturated": np.full(G, np.nan),
    }
    empty_group = np.zeros(G, dtype=bool)
    indicator = np.all(design.Xd >= 0, axis=0)

    def fit_chunk(genes):
        block = Y.columns(genes) if isinstance(Y, MatrixReader) else Y[:, genes]
        if isinstance(Y, MatrixReader):
            check_count_values(block.data if sp.issparse(block) else block, "y")
        nz = NonZeros.from_columns(block, w, design)
        totals = np.bincount(nz.gene, weights=nz.w * nz.y, minlength=genes.size)
        ypair = np.bincount(nz.gene * design.P + nz.pair, weights=nz.y, minlength=genes.size * design.P)
        ypair = ypair.reshape(genes.size, design.P)
        empty = np.any((ypair @ design.Xp[:, indicator]) == 0, axis=1) if indicator.any() else None
        live = np.flatnonzero(totals > 0)
        res = None
        if live.size:
            eng = BatchedNBLaplace(design, nz.subset(live))
            res = eng.fit(_start(design, eng.nz), hessian_cov=(vcov == "hessian"), reml=reml)
        return genes, totals, empty, live, res

    chunks = [np.arange(a, min(a + CHUNK_GENES, G)) for a in range(0, G, CHUNK_GENES)]
    bar = progress(total=G, desc="NegativeBinomialGLMM genes", unit="gene", verbose=verbose)
    with Engine(n_jobs=_engine.get("n_jobs"), client=_engine.get("client")) as pool:
        for genes, totals, empty, live, res in pool.map(call_item, range(len(chunks)), pool.share(fit_chunk),
                                                        pool.share(chunks)):
            out["totals"][genes] = totals
            if empty is not None:
                empty_group[genes] = empty
            if res is not None:
                rows = genes[live]
                th = res.params[:, 0]
                out["theta"][rows], out["beta"][rows], out["phi"][rows] = th, res.params[:, 1:-1], res.params[:, -1]
                out["cov"][rows] = res.cov[:, 1:-1, 1:-1]
                out["phi_var"][rows] = res.cov[:, -1, -1]
                # REML: glmmTMB's restricted log-likelihood, with the flat prior's 2 pi terms
                out["loglik"][rows] = -0.5 * res.deviance + (0.5 * p * np.log(2 * np.pi) if reml else 0.0)
                out["converged"][rows] = res.converged
                out["b"][rows] = th[:, None] * res.u
                out["condsd"][rows] = np.abs(th)[:, None] / np.sqrt(res.M)
            bar.update(genes.size)
    bar.close()
    return _tables(out, names, fixed_names, group_name, empty_group, term_df)


def _tables(out, names, fixed_names, group_name, empty_group, term_df):
    """Flags, sizes and the tidy tables of the many-gene fit."""
    G, p = out["beta"].shape
    phi = out["phi"]
    limit = phi <= 1e-8
    with np.errstate(divide="ignore", invalid="ignore"):
        out["size"] = np.where(limit, np.inf, 1.0 / phi)
        out["size_se"] = np.where(limit, np.nan, np.sqrt(out["phi_var"]) / phi**2)
    fit_mask = out["totals"] > 0
    flag = np.where(out["converged"], "", "not_converged")
    flag = np.where(empty_group, "zero_count_group", flag)
    flag = np.where(~fit_mask, "all_zero", flag)
    flag = np.where((flag == "") & (np.abs(out["theta"]) < 1e-4), "singular", flag)
    flag = np.where((flag == "") & limit, "poisson_limit", flag)
    out["flag"] = flag
    # the per-term table is the Wald table of the identity contrasts, gene by gene
    wald = wald_contrasts(out["beta"], out["cov"], np.eye(p), names, contrast_names=list(fixed_names), df=term_df)
    order = np.arange(G * p).reshape(p, G).T.ravel()
    out["table"] = wald.iloc[order].rename(columns={"contrast": "term"}).reset_index(drop=True)
    out["genes"] = pd.DataFrame(
        {
            "gene": names, "grp": group_name, "sdcor": np.abs(out["theta"]), "vcov": out["theta"] ** 2,
            "size": out["size"], "size_se": out["size_se"], "loglik": out["loglik"],
            "converged": out["converged"], "flag": flag, "total_count": out["totals"],
        }
    )
    return out
