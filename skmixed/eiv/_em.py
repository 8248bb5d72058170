"""The full GLM-EIV EM, vectorised over pairs.

E-step: posterior perturbation probabilities ``T``. M-step: ``pi = mean(T)`` and, for each
modality, the weighted GLM of glmeiv's stacked 2n data (every cell once as unperturbed with
weight ``1 - T`` and once as perturbed with weight ``T``). The stacked design never exists:
its gradient and Gram matrix collapse to ``Z``-sums of the two halves
(:meth:`Design.stacked_gram`), so a Newton step over B pairs costs a few (n, B) passes and
one ``(n, q^2)`` matrix product. Each M-step takes Newton steps with a backtracking line
search on the expected complete-data log-likelihood: a (generalised) EM, hence coordinate
ascent on the ELBO and a monotone log-likelihood.

Near the maximum the EM is accelerated as Louis (1982) proposed: after each E-step, Louis's
observed information ``I`` and the observed score ``S`` (the posterior mean of the
complete-data score) give the Newton step ``I^{-1} S`` on the observed log-likelihood and
its decrement ``S' I^{-1} S / 2``, the gain still to come. The decrement is the stopping
rule; the Newton step replaces the next M-step where it increases the log-likelihood (the
path stays monotone) and converges quadratically where the EM converges at the rate of the
fraction of missing information (0.19 per iteration for NB mRNA and a weak gRNA).

With numba (the ``fast`` extra) and numpy arrays, the E-step is one compiled pass
(:func:`skmixed.eiv._fused.em_sums`) that returns, besides the posteriors and the
log-likelihood, the M-step's first Newton step and Louis's information as per-pair sums
(:class:`~skmixed.eiv._fused.EMSums`, :class:`StepPieces`) instead of per-cell arrays; the
pilot GLMs' Newton steps likewise (:func:`skmixed.eiv._fused.glm_sums`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._backend import get_namespace
from .._families import NegativeBinomial, Poisson
from . import _fused
from ._inference import louis_information, observed_pieces
from ._model import base_eta, e_step, glm_pieces, kernel, modality_estep, _shifted


def subset_family(family, idx):
    if isinstance(family, NegativeBinomial):
        return NegativeBinomial(family.size[idx] if family.size.ndim else family.size)
    return family


def _cols(a, idx):
    return a if a.shape[1] == 1 else a[:, idx]


@dataclass
class StepPieces:
    """A modality's first Newton step at the E-step's coefficients, as sums over the cells
    (the compiled E-step, :func:`skmixed.eiv._fused.em_sums`): the stacked gradient (B, p1),
    Gram matrix of the expected information (B, p1, p1) and the M-step's objective (B,)."""

    grad: np.ndarray
    H: np.ndarray
    q: np.ndarray


def m_step_modality(design, family, y, offset, T, coef, *, max_newton=50, tol=1e-10, first=None):
    """Maximise ``sum_i (1 - T_i) l(y_i, eta0_i) + T_i l(y_i, eta0_i + b)`` for every pair.

    Newton (Fisher scoring for NB, as ``glm``) with a per-pair backtracking line search,
    started at ``coef`` (B, q + 1). With ``T=None`` the plain GLM of ``y`` on the design (the
    covariates-only pilot fit; ``coef`` of shape (B, q)). Returns the new coefficients and
    whether every pair reached the tolerance. ``first``: the score and information at
    ``coef`` and the kernels there, ``(s0, i0, s1, i1, k0, k1)``, when the E-step has
    computed them already (:func:`modality_estep`): the first Newton step and the line
    search's starting value then need no pass of their own; or those as sums
    (:class:`StepPieces`).
    """
    xp = get_namespace(y)
    plain = T is None
    # the plain GLM's Newton pieces (and its line search's values) from one compiled pass
    fused = plain and _fused.usable(xp) and isinstance(family, (Poisson, NegativeBinomial))
    if fused:
        Yt, Ot = np.ascontiguousarray(y.T), np.ascontiguousarray(offset.T)
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
        if fused:
            q_old, grad, H = _fused.glm_sums(design, family, Yt, Ot, coef) if first is None else first
            first = None
        elif plain:
            if first is None:
                _, first = glm_pieces(family, y, design.Z @ coef.T + offset, kernels=False)
            (s0, i0), first = first, None
            grad = s0.T @ design.Z
            H = design.gram(i0)
        elif isinstance(first, StepPieces):
            grad, H, q_old = first.grad, first.H, first.q
            first = kernels = None
        else:
            if first is None:
                # one exponential for both halves (mu1 = mu0 e^b); no kernels
                k0, k1, si = modality_estep(family, y, base_eta(design.Z, coef, offset), coef[:, 1], kernels=False)
                first = (*si, k0, k1)
            s0, i0, s1, i1, k0, k1 = first
            kernels = None if k0 is None else (k0, k1)
            first = None
            grad = design.stacked_grad(w0 * s0, w1 * s1)
            H = design.stacked_gram(w0 * i0, w1 * i1)
        scale = xp.maximum(xp.max(xp.abs(xp.diagonal(H, axis1=1, axis2=2)), axis=1), 1.0)
        step = xp.linalg.solve(H + 1e-12 * scale[:, None, None] * eye, grad[:, :, None])[:, :, 0]
        dec = 0.5 * xp.sum(step * grad, axis=1)
        if bool(xp.all(dec < tol)):
            return coef + step, True
        if bool(xp.all(dec < 0.1)):
            # inside the region of quadratic convergence of a concave objective: the full
            # step increases it (the EM's monotone path is checked in the tests). The
            # decrement is the gain the quadratic model predicts; at 0.1 the step is 0.45
            # in the metric of the information, where the cubic term of a GLM likelihood
            # over thousands of cells is negligible, and a line search would cost a pass
            coef = coef + step
            q_old = kernels = None
            continue
        if q_old is None:
            q_old = q_value(coef) if kernels is None else xp.sum(w0 * kernels[0] + w1 * kernels[1], axis=0)
        kernels = None
        t = xp.ones(coef.shape[0])
        for _ in range(40):
            trial = coef + t[:, None] * step
            if fused:
                si = _fused.glm_sums(design, family, Yt, Ot, trial)
                q_new = si[0]
            elif plain:
                # the kernel at the trial and, from the same means, the next step's pieces
                k0, si = glm_pieces(family, y, design.Z @ trial.T + offset)
                q_new = xp.sum(k0, axis=0)
            else:
                # the kernels at the trial and, from the same means, the next Newton
                # step's score and information there
                k0, k1, si = modality_estep(family, y, base_eta(design.Z, trial, offset), trial[:, 1])
                q_new = xp.sum(w0 * k0 + w1 * k1, axis=0)
            ok = (q_new >= q_old - 1e-12 * xp.abs(q_old)) | (dec < tol)
            if bool(xp.all(ok)):
                break
            t = xp.where(ok, t, 0.5 * t)
        coef, q_old = trial, q_new
        first = si if plain else (*si, k0, k1)
    return coef, False


@dataclass
class EMResult:
    pi: np.ndarray  # (B,)
    coef_m: np.ndarray  # (B, q + 1)
    coef_g: np.ndarray
    T: np.ndarray  # (n, B) posteriors at the final parameters
    loglik: np.ndarray  # (B,)
    loglik_path: list  # one 1-D array per pair
    n_iter: np.ndarray  # (B,) int: steps run (M-steps and Newton steps)
    converged: np.ndarray  # (B,) bool
    n_flips: np.ndarray  # (B,) int: label switches done to keep pi <= 1/2
    info: np.ndarray | None = None  # (B, k, k) host: Louis's information at the final parameters
    n_newton: np.ndarray | None = None  # (B,) int: Newton steps accepted


def _firsts(stats):
    """Each modality's first-Newton-step pieces for :func:`m_step_modality` from an E-step's
    stats: the numpy E-step's per-cell tuples, or :class:`StepPieces` from the compiled one's sums."""
    if isinstance(stats, _fused.EMSums):
        out = []
        for j in range(2):
            q, grad, Gi, _ = stats.modality(j)
            out.append(StepPieces(grad=grad, H=Gi, q=q))
        return tuple(out)
    return stats[0], stats[1]


def _take_stats(stats, idx, idx_dev):
    """The stats of the pairs at positions ``idx`` (``idx_dev`` on the arrays' device)."""
    if isinstance(stats, _fused.EMSums):
        return stats.take(idx)
    return tuple(tuple(a[:, idx_dev] for a in st) for st in stats)


def _put_stats(stats, idx, idx_dev, new):
    """Write an E-step's stats of the pairs at positions ``idx`` into ``stats`` (same kind)."""
    if isinstance(stats, _fused.EMSums):
        stats.put(idx, new)
        return
    for a, b in zip(stats, new):
        for x, y in zip(a, b):
            x[:, idx_dev] = y


def _flip(T, xp):
    """glmeiv's guard: if the posteriors average above 1/2, swap the labels (pi <= 1/2)."""
    flip = xp.mean(T, axis=0) > 0.5
    T = xp.where(flip[None, :], 1.0 - T, T)
    return T, flip


def _host(a):
    return np.asarray(a if isinstance(a, np.ndarray) else a.get(), dtype=float)


def newton_check(design, fm, fg, M, G, om, og, pi, cm, cg, T, stats):
    """Louis's information ``I`` (B, k, k), the observed score ``S`` (Fisher's identity:
    the complete-data score averaged over the posteriors) and, where ``I`` is positive
    definite, the Newton step ``I^{-1} S`` and decrement ``S' I^{-1} S / 2``: the
    log-likelihood gain a Newton step predicts, i.e. the distance to the maximum (NaN where
    ``I`` is not positive definite: not in the maximum's concave region). Host arrays."""
    if isinstance(stats, _fused.EMSums):
        info, S = stats.louis()
    else:
        sm, sg = stats[0], stats[1]
        pieces = (observed_pieces(fm, *sm[:4]), observed_pieces(fg, *sg[:4]))
        info, S = louis_information(design, fm, fg, M, G, om, og, pi, cm, cg, T, pieces, score=True)
        info, S = _host(info), _host(S)
    B, k = S.shape
    step = np.full((B, k), np.nan)
    dec = np.full(B, np.nan)
    # the scales of pi (n / pi) and of the coefficients differ by 1e3-1e4: a Jacobi scaling
    # before the eigenvalue test and the solve
    d = np.sqrt(np.abs(np.diagonal(info, axis1=1, axis2=2)))
    ok = np.all(np.isfinite(info), axis=(1, 2)) & np.all(d > 0, axis=1) & np.all(np.isfinite(S), axis=1)
    if ok.any():
        Is = info[ok] / d[ok][:, :, None] / d[ok][:, None, :]
        w, V = np.linalg.eigh(Is)
        pd_ = w[:, 0] > 1e-12 * w[:, -1]
        g = S[ok] / d[ok]
        x = np.einsum("bij,bj->bi", V, np.einsum("bji,bj->bi", V, g) / w)
        st = x / d[ok]
        rows = np.flatnonzero(ok)[pd_]
        step[rows] = st[pd_]
        dec[rows] = 0.5 * np.sum(st[pd_] * S[ok][pd_], axis=1)
    return info, step, dec


def run_full_em(design, fm, fg, M, G, om, og, const, pi, coef_m, coef_g, *, tol=1e-10, max_iter=200,
                first_newton=50, newton=False):
    """EM from starting parameters (glmeiv's ``run_full_glmeiv_given_pilot_params``).

    ``newton=False``: convergence per pair when ``|ll_new - ll_old| / min(|ll_new|, |ll_old|)
    < tol`` (glmeiv's ``compute_tolerance``). ``newton=True``: after every E-step from the
    first M-step on, Louis's information and the observed score at the current parameters
    (:func:`newton_check`); a pair has converged when the Newton decrement, the
    log-likelihood still to gain, is below ``tol * |ll|`` (or, where the information is not
    positive definite, by glmeiv's rule), and otherwise takes a Newton step on the observed
    log-likelihood (Louis 1982) in place of the next M-step, kept only if the log-likelihood
    increases (else the M-step is taken): the path stays monotone. The information at the
    final parameters is returned for the standard errors. Converged pairs are frozen and
    dropped from the work arrays. ``first_newton``: Newton steps of the first M-step (later
    ones take one).
    """
    xp = get_namespace(M)
    B = M.shape[1]
    pi = xp.asarray(pi, dtype=float).copy()
    coef_m = coef_m.copy()
    coef_g = coef_g.copy()
    p1 = coef_m.shape[1]
    T_out = xp.empty(M.shape)
    ll_out = xp.full(B, -xp.inf)
    n_iter = np.zeros(B, dtype=int)
    n_newton = np.zeros(B, dtype=int)
    converged = np.zeros(B, dtype=bool)
    n_flips = np.zeros(B, dtype=int)
    info_out = np.full((B, 1 + 2 * p1, 1 + 2 * p1), np.nan) if newton else None
    paths = [[] for _ in range(B)]
    dev = (lambda a: a) if xp is np else xp.asarray

    fused = _fused.usable(xp)
    if fused:
        # the compiled E-step reads each pair's cells as a contiguous row
        Mt, Gt = np.ascontiguousarray(M.T), np.ascontiguousarray(G.T)
        omt, ogt = np.ascontiguousarray(om.T), np.ascontiguousarray(og.T)
    n = M.shape[0]

    def estep(idx, pi_a, cm, cg, Ma, Ga, fma, fga, oma, oga):
        if fused:
            # the posteriors, the log-likelihood and, as sums over the cells, the M-step's
            # first Newton step and Louis's information, in one pass; where a pair's labels
            # must be swapped (mean posterior above 1/2) the sums are for the other labels,
            # and the numpy E-step below runs instead
            sel = slice(None) if idx.size == B and np.array_equal(idx, np.arange(B)) else idx
            Tt, llk, sums = _fused.em_sums(design, fma, fga, Mt[sel], Gt[sel], omt if omt.shape[0] == 1 else omt[sel],
                                           ogt if ogt.shape[0] == 1 else ogt[sel], pi_a, cm, cg)
            if not np.any(sums.rows[:, 1] > 0.5 * n):
                with np.errstate(divide="ignore"):
                    ll = llk + n * np.log1p(-np.asarray(pi_a, dtype=float)) + const[idx]
                return Tt.T, ll, sums
        # the M-step's first Newton step needs the score and information at these very
        # coefficients: computed here from the same means (stats), not in a second pass
        m0, m1, sm = modality_estep(fma, Ma, base_eta(design.Z, cm, oma), cm[:, 1])
        g0, g1, sg = modality_estep(fga, Ga, base_eta(design.Z, cg, oga), cg[:, 1])
        T, ll = e_step(m0 + g0, m1 + g1, pi_a, const[dev(idx)])
        return T, ll, ((*sm, m0, m1), (*sg, g0, g1))

    active = np.arange(B)
    Ma, Ga, oma, oga, fma, fga = M, G, om, og, fm, fg
    T, ll, stats = estep(active, pi, coef_m, coef_g, Ma, Ga, fma, fga, oma, oga)
    prev = _host(ll).copy()
    for b in range(B):
        paths[b].append(float(prev[b]))
    T, flip = _flip(T, xp)
    n_flips += _host(flip).astype(int)
    step = None  # (active, k) host: the Newton steps proposed at the current parameters
    for it in range(1, max_iter + 1):
        ax = dev(active)
        pi_c, cm_c, cg_c = pi[ax], coef_m[ax], coef_g[ax]
        # the M-step. After the first the coefficients move little between EM iterations:
        # one Newton step (from the previous M-step's optimum, in its quadratic region)
        # leaves an error of the square of the move, and the EM (a generalised EM: Q still
        # increases) needs no more iterations for it; each further step would cost a pass
        steps = first_newton if it == 1 else 1
        use = np.zeros(active.size, dtype=bool) if step is None else np.isfinite(step[:, 0])
        T_c, stats_c = T, stats

        def m_step(cols=None):
            # the (generalised) M-step of the active pairs at positions cols (None: all)
            if cols is None:
                sm, sg = _firsts(stats_c)
                return (xp.mean(T_c, axis=0),
                        m_step_modality(design, fma, Ma, oma, T_c, cm_c, max_newton=steps, first=sm)[0],
                        m_step_modality(design, fga, Ga, oga, T_c, cg_c, max_newton=steps, first=sg)[0])
            cx = dev(cols)
            Tc = T_c[:, cx]
            sm, sg = _firsts(_take_stats(stats_c, cols, cx))
            return (xp.mean(Tc, axis=0),
                    m_step_modality(design, subset_family(fma, cx), Ma[:, cx], _cols(oma, cx), Tc, cm_c[cx],
                                    max_newton=steps, first=sm)[0],
                    m_step_modality(design, subset_family(fga, cx), Ga[:, cx], _cols(oga, cx), Tc, cg_c[cx],
                                    max_newton=steps, first=sg)[0])

        if use.any():
            st = dev(np.nan_to_num(step))
            pi_a, cm, cg = pi_c + st[:, 0], cm_c + st[:, 1:1 + p1], cg_c + st[:, 1 + p1:]
            if not use.all():
                u = dev(use)
                em = m_step()
                pi_a = xp.where(u, pi_a, em[0])
                cm = xp.where(u[:, None], cm, em[1])
                cg = xp.where(u[:, None], cg, em[2])
        else:
            pi_a, cm, cg = m_step()
        T, ll, stats = estep(active, pi_a, cm, cg, Ma, Ga, fma, fga, oma, oga)
        llh = _host(ll)
        back = use & ~(llh >= prev[active])
        if back.any():
            # a Newton step that lost log-likelihood: the M-step from the same point instead
            r = np.flatnonzero(back)
            rx = dev(r)
            pi_a[rx], cm[rx], cg[rx] = m_step(r)
            Tr, llr, str_ = estep(active[r], pi_a[rx], cm[rx], cg[rx], Ma[:, rx], Ga[:, rx],
                                  subset_family(fma, rx), subset_family(fga, rx), _cols(oma, rx), _cols(oga, rx))
            if type(str_) is not type(stats):
                # the compiled and the numpy E-step's pieces differ in kind: all pairs again
                T, ll, stats = estep(active, pi_a, cm, cg, Ma, Ga, fma, fga, oma, oga)
            else:
                T[:, rx], ll[rx] = Tr, llr
                _put_stats(stats, r, rx, str_)
            llh[r] = _host(ll[rx])
        n_newton[active[use & ~back]] += 1
        pi[ax], coef_m[ax], coef_g[ax] = pi_a, cm, cg
        n_iter[active] = it
        for j, b in enumerate(active):
            paths[b].append(float(llh[j]))
        with np.errstate(invalid="ignore", divide="ignore"):
            rel = np.abs(llh - prev[active]) / np.minimum(np.abs(llh), np.abs(prev[active]))
        done = rel < tol
        T_out[:, ax] = T
        ll_out[ax] = ll
        prev[active] = llh
        step = None
        if newton:
            info, step, dec = newton_check(design, fma, fga, Ma, Ga, oma, oga, pi_a, cm, cg, T, stats)
            info_out[active] = info
            pdef = np.isfinite(dec)
            done = np.where(pdef, dec < tol * np.abs(llh), done)
            # a Newton step must keep pi inside (0, 1/2)
            with np.errstate(invalid="ignore"):
                pin = _host(pi_a) + step[:, 0]
                step[~((pin > 0) & (pin < 0.5))] = np.nan
        T, flip = _flip(T, xp)
        fl = _host(flip).astype(bool)
        n_flips[active] += fl
        done &= ~fl
        if step is not None:
            step[fl] = np.nan  # the labels were swapped: the step was for the other labelling
        converged[active[done]] = True
        if done.all():
            break
        if done.any():
            keep = np.flatnonzero(~done)
            active = active[keep]
            kx = dev(keep)
            T = T[:, kx]
            stats = _take_stats(stats, keep, kx)
            if step is not None:
                step = step[keep]
            ax = dev(active)
            Ma, Ga = M[:, ax], G[:, ax]
            oma, oga = _cols(om, ax), _cols(og, ax)
            fma, fga = subset_family(fm, ax), subset_family(fg, ax)
    return EMResult(
        pi=pi, coef_m=coef_m, coef_g=coef_g, T=T_out, loglik=ll_out,
        loglik_path=[np.asarray(p) for p in paths], n_iter=n_iter, converged=converged, n_flips=n_flips,
        info=info_out, n_newton=n_newton,
    )
