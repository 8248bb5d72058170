"""One vectorised GLM-EIV fit of a block of pairs: initialisation, full EM, inference.

Arrays may be numpy or cupy (the namespace follows ``M``); the results come back on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._backend import get_namespace, to_host
from ._em import run_full_em
from ._inference import wald_table
from ._init import (
    COV_RANGE, G_INT_RANGE, G_PERT_RANGE, M_INT_RANGE, M_PERT_RANGE, PI_RANGE, reduced_em, select_best,
)
from ._model import as_design, join_coef, make_family, normaliser

# a pair whose fit puts fewer perturbed cells than this (n * pi) is flagged
MIN_PERTURBED_CELLS = 10.0
# the reduced EM holds (n, pairs, restarts) arrays: at most this many elements at once
_REDUCED_ELEMENTS = 2**23


@dataclass
class BlockResult:
    estimate: np.ndarray  # (B, k)
    se: np.ndarray
    z: np.ndarray
    p: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    loglik: np.ndarray
    loglik_path: list
    n_iter: np.ndarray
    converged: np.ndarray
    pilot_loglik: np.ndarray
    posteriors: np.ndarray | None = None
    extra: dict = field(default_factory=dict)


def draw_guesses(rng, K, init, q):
    """Random starts shared by every pair (as glmeiv's ``set.seed`` per pair), so that a pair's
    fit does not depend on the other pairs of the batch."""
    g = {
        "pi": rng.uniform(*PI_RANGE, size=K),
        "m_pert": rng.uniform(*M_PERT_RANGE, size=K),
        "g_pert": rng.uniform(*G_PERT_RANGE, size=K),
    }
    if init == "random":
        g["m_int"] = rng.uniform(*M_INT_RANGE, size=K)
        g["g_int"] = rng.uniform(*G_INT_RANGE, size=K)
        g["m_cov"] = rng.uniform(*COV_RANGE, size=K)
        g["g_cov"] = rng.uniform(*COV_RANGE, size=K)
    return g


def fit_block(Z, M, G, om, og, *, mrna_family, grna_family, mrna_size, grna_size, pilot_m, pilot_g,
              guesses, init, tol, max_iter, keep_posteriors=False):
    """Fit B pairs. ``M``, ``G`` (n, B) counts; ``om``, ``og`` (n, 1) or (n, B) offsets;
    ``mrna_size``/``grna_size`` (B,) or None; ``pilot_m``/``pilot_g`` = (coef (B, q), eta (n, B))
    from the covariates-only fits (None for ``init="random"``)."""
    xp = get_namespace(M)
    design = as_design(Z)
    Z = design.Z
    n, B = M.shape
    q = design.q
    fm = make_family(mrna_family, mrna_size)
    fg = make_family(grna_family, grna_size)
    const = normaliser(fm, M) + normaliser(fg, G)
    K = len(guesses["pi"])
    if init == "accelerated":
        pis, bms, bgs, lls = [], [], [], []
        step = max(1, _REDUCED_ELEMENTS // max(n * K, 1))
        for s in range(0, B, step):
            sl = slice(s, min(s + step, B))
            bk = sl.stop - sl.start
            fms = make_family(mrna_family, None if mrna_size is None else mrna_size[sl])
            fgs = make_family(grna_family, None if grna_size is None else grna_size[sl])
            gs = tuple(np.broadcast_to(guesses[k][None, :], (bk, K)) for k in ("pi", "m_pert", "g_pert"))
            r = reduced_em(fms, fgs, M[:, sl], G[:, sl], pilot_m[1][:, sl], pilot_g[1][:, sl], gs)
            best = select_best(*r)
            for lst, v in zip((pis, bms, bgs, lls), best):
                lst.append(v)
        pi0, bm0, bg0, pilot_ll = (np.concatenate(v) for v in (pis, bms, bgs, lls))
        coef_m0 = join_coef(pilot_m[0], xp.asarray(bm0))
        coef_g0 = join_coef(pilot_g[0], xp.asarray(bg0))
        # the pilot coefficients are the covariates-only MLE and the reduced EM's effects its
        # fixed point: two Newton steps of the first M-step leave the EM no further from the
        # MLE than a converged M-step would (same iteration counts on the reference pairs,
        # estimates within 1e-9 SE), where a random start needs the converged M-step
        em = run_full_em(design, fm, fg, M, G, om, og, const, xp.asarray(pi0), coef_m0, coef_g0, tol=tol,
                         max_iter=max_iter, first_newton=2, newton=True)
        extra = {"init_em_iter": np.zeros(B, dtype=int)}
    else:
        # glmeiv's random restarts of the full EM (15 iterations, tol 1e-5), pairs x restarts as columns
        rep = np.repeat(np.arange(B), K)
        tile = np.tile(np.arange(K), B)
        repx = rep if xp is np else xp.asarray(rep)

        def coefs(int_key, pert_key, cov_key):
            c = np.empty((B * K, q + 1))
            c[:, 0] = guesses[int_key][tile]
            c[:, 1] = guesses[pert_key][tile]
            c[:, 2:] = guesses[cov_key][tile][:, None]
            return xp.asarray(c)

        cols = lambda a: a if a.shape[1] == 1 else a[:, repx]  # noqa: E731
        size_r = lambda s: None if s is None else s[repx]  # noqa: E731
        fmr, fgr = make_family(mrna_family, size_r(mrna_size)), make_family(grna_family, size_r(grna_size))
        Mr, Gr = M[:, repx], G[:, repx]
        r = run_full_em(design, fmr, fgr, Mr, Gr, cols(om), cols(og), const[repx], xp.asarray(guesses["pi"][tile]),
                        coefs("m_int", "m_pert", "m_cov"), coefs("g_int", "g_pert", "g_cov"), tol=1e-5, max_iter=15)
        ll = to_host(r.loglik).reshape(B, K)
        ll = np.where(np.isfinite(ll), ll, -np.inf)
        j = np.argmax(ll, axis=1)
        sel = np.arange(B) * K + j
        selx = sel if xp is np else xp.asarray(sel)
        em = run_full_em(design, fm, fg, M, G, om, og, const, r.pi[selx], r.coef_m[selx], r.coef_g[selx],
                         tol=tol, max_iter=max_iter, newton=True)
        pilot_ll = ll[np.arange(B), j]
        extra = {"init_em_iter": r.n_iter.reshape(B, K).sum(axis=1)}
    # Louis's information at the final parameters: computed by the EM's convergence check
    info = em.info
    extra["n_newton"] = em.n_newton
    est = np.concatenate([to_host(em.pi)[:, None], to_host(em.coef_m), to_host(em.coef_g)], axis=1)
    se, z, p, lo, hi = wald_table(est, info)
    return BlockResult(
        estimate=est, se=se, z=z, p=p, lo=lo, hi=hi, loglik=to_host(em.loglik), loglik_path=em.loglik_path,
        n_iter=em.n_iter, converged=em.converged, pilot_loglik=to_host(pilot_ll),
        posteriors=to_host(em.T) if keep_posteriors else None, extra=extra,
    )
