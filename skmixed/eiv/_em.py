"""The full GLM-EIV EM, vectorised over pairs.

E-step: posterior perturbation probabilities ``T``. M-step: ``pi = mean(T)`` and, for each
modality, the weighted GLM of glmeiv's stacked 2n data (every cell once as unperturbed with
weight ``1 - T`` and once as perturbed with weight ``T``). The stacked design never exists:
its gradient and Gram matrix collapse to ``Z``-sums of the two halves
(:meth:`Design.stacked_gram`), so a Newton step over B pairs costs a few (n, B) passes and
one ``(n, q^2)`` matrix product. Each M-step runs Newton with a backtracking line search on
the expected complete-data log-likelihood until the Newton decrement is below ``1e-10``:
a (generalised) EM, hence coordinate ascent on the ELBO and a monotone log-likelihood.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import get_namespace
from .._families import NegativeBinomial
from ._model import base_eta, e_step, kernel, modality_estep, score_info, _shifted


def subset_family(family, idx):
    if isinstance(family, NegativeBinomial):
        return NegativeBinomial(family.size[idx] if family.size.ndim else family.size)
    return family


def _cols(a, idx):
    return a if a.shape[1] == 1 else a[:, idx]


def m_step_modality(design, family, y, offset, T, coef, *, max_newton=50, tol=1e-10, first=None):
    """Maximise ``sum_i (1 - T_i) l(y_i, eta0_i) + T_i l(y_i, eta0_i + b)`` for every pair.

    Newton (Fisher scoring for NB, as ``glm``) with a per-pair backtracking line search,
    started at ``coef`` (B, q + 1). With ``T=None`` the plain GLM of ``y`` on the design (the
    covariates-only pilot fit; ``coef`` of shape (B, q)). Returns the new coefficients and
    whether every pair reached the tolerance. ``first``: the score and information at
    ``coef`` and the kernels there, ``(s0, i0, s1, i1, k0, k1)``, when the E-step has
    computed them already (:func:`modality_estep`): the first Newton step and the line
    search's starting value then need no pass of their own.
    """
    xp = get_namespace(y)
    plain = T is None
    if plain:
        def q_value(c):
            return xp.sum(kernel(family, y, design.Z @ c.T + offset), axis=0)
    else:
        w0, w1 = 1.0 - T, T

        def q_value(c):
            eta0 = base_eta(design.Z, c, offset)
            return xp.sum(w0 * kernel(family, y, eta0) + w1 * _shifted(family, y, eta0, c[:, 1]), axis=0)

    q_old = kernels = None  # kernels: the E-step's, at coef until the first step moves it
    eye = xp.eye(coef.shape[1])[None]
    for _ in range(max_newton):
        if plain:
            s0, i0 = score_info(family, y, design.Z @ coef.T + offset)
            grad = s0.T @ design.Z
            H = design.gram(i0)
        else:
            if first is not None:
                s0, i0, s1, i1, *kernels = first
                first = None
            else:
                eta0 = base_eta(design.Z, coef, offset)
                s0, i0 = score_info(family, y, eta0)
                s1, i1 = score_info(family, y, eta0 + coef[:, 1][None, :])
            grad = design.stacked_grad(w0 * s0, w1 * s1)
            H = design.stacked_gram(w0 * i0, w1 * i1)
        scale = xp.maximum(xp.max(xp.abs(xp.diagonal(H, axis1=1, axis2=2)), axis=1), 1.0)
        step = xp.linalg.solve(H + 1e-12 * scale[:, None, None] * eye, grad[:, :, None])[:, :, 0]
        dec = 0.5 * xp.sum(step * grad, axis=1)
        if bool(xp.all(dec < tol)):
            return coef + step, True
        if bool(xp.all(dec < 1e-3)):
            # inside the region of quadratic convergence of a concave objective: the full
            # step increases it (the EM's monotone path is checked in the tests)
            coef = coef + step
            q_old = kernels = None
            continue
        if q_old is None:
            q_old = q_value(coef) if kernels is None else xp.sum(w0 * kernels[0] + w1 * kernels[1], axis=0)
        kernels = None
        t = xp.ones(coef.shape[0])
        for _ in range(40):
            trial = coef + t[:, None] * step
            q_new = q_value(trial)
            ok = (q_new >= q_old - 1e-12 * xp.abs(q_old)) | (dec < tol)
            if bool(xp.all(ok)):
                break
            t = xp.where(ok, t, 0.5 * t)
        coef, q_old = trial, q_new
    return coef, False


@dataclass
class EMResult:
    pi: np.ndarray  # (B,)
    coef_m: np.ndarray  # (B, q + 1)
    coef_g: np.ndarray
    T: np.ndarray  # (n, B) posteriors at the final parameters
    loglik: np.ndarray  # (B,)
    loglik_path: list  # one 1-D array per pair
    n_iter: np.ndarray  # (B,) int: M-steps run
    converged: np.ndarray  # (B,) bool
    n_flips: np.ndarray  # (B,) int: label switches done to keep pi <= 1/2


def _flip(T, xp):
    """glmeiv's guard: if the posteriors average above 1/2, swap the labels (pi <= 1/2)."""
    flip = xp.mean(T, axis=0) > 0.5
    T = xp.where(flip[None, :], 1.0 - T, T)
    return T, flip


def run_full_em(design, fm, fg, M, G, om, og, const, pi, coef_m, coef_g, *, tol=1e-10, max_iter=200,
                first_newton=50):
    """EM from starting parameters (glmeiv's ``run_full_glmeiv_given_pilot_params``).

    Convergence per pair when ``|ll_new - ll_old| / min(|ll_new|, |ll_old|) < tol``
    (glmeiv's ``compute_tolerance``); converged pairs are frozen and dropped from the
    work arrays. ``first_newton``: Newton steps of the first M-step (later ones take one).
    """
    xp = get_namespace(M)
    B = M.shape[1]
    pi = xp.asarray(pi, dtype=float).copy()
    coef_m = coef_m.copy()
    coef_g = coef_g.copy()
    T_out = xp.empty(M.shape)
    ll_out = xp.full(B, -xp.inf)
    n_iter = np.zeros(B, dtype=int)
    converged = np.zeros(B, dtype=bool)
    n_flips = np.zeros(B, dtype=int)
    paths = [[] for _ in range(B)]

    def estep(idx, pi_a, cm, cg, Ma, Ga, fma, fga, oma, oga):
        # the M-step's first Newton step needs the score and information at these very
        # coefficients: computed here from the same means (stats), not in a second pass
        m0, m1, sm = modality_estep(fma, Ma, base_eta(design.Z, cm, oma), cm[:, 1])
        g0, g1, sg = modality_estep(fga, Ga, base_eta(design.Z, cg, oga), cg[:, 1])
        T, ll = e_step(m0 + g0, m1 + g1, pi_a, const[idx if xp is np else xp.asarray(idx)])
        return T, ll, ((*sm, m0, m1), (*sg, g0, g1))

    active = np.arange(B)
    Ma, Ga, oma, oga, fma, fga = M, G, om, og, fm, fg
    T, ll, stats = estep(active, pi, coef_m, coef_g, Ma, Ga, fma, fga, oma, oga)
    prev = np.asarray(ll, dtype=float).copy() if xp is np else ll.get()
    for b in range(B):
        paths[b].append(float(prev[b]))
    T, flip = _flip(T, xp)
    n_flips += np.asarray(flip if xp is np else flip.get(), dtype=int)
    for it in range(1, max_iter + 1):
        # M-step on the active pairs
        pi_a = xp.mean(T, axis=0)
        ax = active if xp is np else xp.asarray(active)  # device index
        # after the first M-step the coefficients move little between EM iterations: one
        # Newton step (from the previous M-step's optimum, in its quadratic region) leaves
        # an error of the square of the move, and the EM (a generalised EM: Q still
        # increases) needs no more iterations for it; each further step would cost a pass
        steps = first_newton if it == 1 else 1
        cm, _ = m_step_modality(design, fma, Ma, oma, T, coef_m[ax], max_newton=steps, first=stats[0])
        cg, _ = m_step_modality(design, fga, Ga, oga, T, coef_g[ax], max_newton=steps, first=stats[1])
        pi[ax], coef_m[ax], coef_g[ax] = pi_a, cm, cg
        n_iter[active] = it
        # E-step
        T, ll, stats = estep(active, pi_a, cm, cg, Ma, Ga, fma, fga, oma, oga)
        llh = np.asarray(ll if xp is np else ll.get(), dtype=float)
        for j, b in enumerate(active):
            paths[b].append(float(llh[j]))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(llh - prev[active]) / np.minimum(np.abs(llh), np.abs(prev[active]))
        done = rel < tol
        T_out[:, ax] = T
        ll_out[ax] = ll
        prev[active] = llh
        T, flip = _flip(T, xp)
        n_flips[active] += np.asarray(flip if xp is np else flip.get(), dtype=int)
        if np.any(flip & done if xp is np else flip.get() & done):
            done = done & ~np.asarray(flip if xp is np else flip.get())
        converged[active[done]] = True
        if done.all():
            break
        if done.any():
            keep = np.flatnonzero(~done)
            active = active[keep]
            kx = keep if xp is np else xp.asarray(keep)
            T = T[:, kx]
            stats = tuple(tuple(a[:, kx] for a in st) for st in stats)
            ax = active if xp is np else xp.asarray(active)
            Ma, Ga = M[:, ax], G[:, ax]
            oma, oga = _cols(om, ax), _cols(og, ax)
            fma, fga = subset_family(fm, ax), subset_family(fg, ax)
    return EMResult(
        pi=pi, coef_m=coef_m, coef_g=coef_g, T=T_out, loglik=ll_out,
        loglik_path=[np.asarray(p) for p in paths], n_iter=n_iter, converged=converged, n_flips=n_flips,
    )
