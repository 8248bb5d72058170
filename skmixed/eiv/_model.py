"""The GLM-EIV model for a batch of (mRNA, gRNA) pairs: likelihood pieces shared by the EM,
the initialisation and the inference.

Layout: ``n`` cells, ``B`` pairs. ``Z`` (n, q) is the covariate design with the intercept in
column 0. Each modality's coefficients are stored per pair in glmeiv's order
``[intercept, perturbation, covariates...]`` (shape (B, q + 1)). ``eta0 = Z @ coef_z + offset``
is the linear predictor of an unperturbed cell and ``eta1 = eta0 + perturbation``.
"""

from __future__ import annotations

import numpy as np

from .._backend import get_namespace, safe_exp, softplus, to_host
from .._families import NegativeBinomial, Poisson


def make_family(name, size=None):
    """A family object of :mod:`skmixed._families`: Poisson, or NB with ``size`` of shape (B,)."""
    if name == "poisson":
        return Poisson()
    return NegativeBinomial(size)


def z_index(q):
    """Positions of the design's columns (intercept, covariates) in ``[intercept, pert, covs]``."""
    return np.r_[0, np.arange(2, q + 1)]


def split_coef(coef):
    """``coef_z`` (B, q) and ``pert`` (B,) from glmeiv-ordered coefficients (B, q + 1)."""
    q = coef.shape[1] - 1
    xp = get_namespace(coef)
    zi = z_index(q)
    return coef[:, zi if xp is np else xp.asarray(zi)], coef[:, 1]


def join_coef(coef_z, pert):
    xp = get_namespace(coef_z)
    return xp.concatenate([coef_z[:, :1], pert[:, None], coef_z[:, 1:]], axis=1)


def base_eta(Z, coef, offset):
    """``eta0`` (n, B) for glmeiv-ordered ``coef`` (B, q + 1); ``offset`` (n, B) or (n, 1)."""
    coef_z, _ = split_coef(coef)
    return Z @ coef_z.T + offset


def kernel(family, y, eta):
    """The parameter-dependent part of the log-likelihood (elementwise).

    NB: ``family.loglik_kernel`` rewritten with one softplus,
    ``y t - (y + r) softplus(t)`` with ``t = eta - log r`` (the E-step's hot loop).
    """
    if isinstance(family, Poisson):
        return family.loglik_kernel(y, eta)
    xp = get_namespace(y, eta)
    r = family.size
    t = eta - xp.log(r)
    return y * t - (y + r) * softplus(t)


def normaliser(family, y):
    """Sum over cells of the parameter-free part of the log-likelihood, per column: (B,).

    For integer counts the per-value terms are summed over a count table (the normaliser of a
    value is computed once, not once per cell)."""
    xp = get_namespace(y)
    yh = to_host(y)
    if yh.size and np.all(yh == np.round(yh)) and yh.max() < 1e5 and yh.min() >= 0:
        V = int(yh.max()) + 1
        C = yh.shape[1]
        flat = (yh.astype(np.int64) + V * np.arange(C)[None, :]).ravel()
        table = xp.asarray(np.bincount(flat, minlength=V * C).reshape(C, V).astype(float))
        v = xp.arange(V, dtype=float)[:, None]
        if isinstance(family, Poisson):
            per = family.log_normaliser(v)[None, :, 0]
        else:
            per = NegativeBinomial(family.size if family.size.ndim else family.size[None]).log_normaliser(v).T
        return xp.sum(table * per, axis=1)
    return xp.sum(family.log_normaliser(y), axis=0)


def component_logliks(fm, fg, m, g, eta0_m, pert_m, eta0_g, pert_g):
    """Log-likelihood kernels of each cell under p = 0 and p = 1, both modalities summed.

    The Poisson difference ``k1 - k0 = y b - mu0 (e^b - 1)`` needs no second exp/log pass.
    """
    a0, a1 = _pair(fm, m, eta0_m, pert_m)
    b0, b1 = _pair(fg, g, eta0_g, pert_g)
    a0 += b0
    a1 += b1
    return a0, a1


def _pair(family, y, eta0, pert):
    """``kernel`` at ``eta0`` and at ``eta0 + pert``; for Poisson one exp pass serves both."""
    if isinstance(family, Poisson):
        xp = get_namespace(y)
        mu0 = safe_exp(eta0)
        return y * eta0 - mu0, y * (eta0 + pert[None, :]) - mu0 * xp.exp(xp.minimum(pert, 700.0))[None, :]
    return kernel(family, y, eta0), _shifted(family, y, eta0, pert)


def _shifted(family, y, eta0, pert):
    xp = get_namespace(y)
    if isinstance(family, Poisson):
        # y (eta0 + b) - mu0 e^b, with e^b per pair
        return y * (eta0 + pert[None, :]) - safe_exp(eta0) * xp.exp(xp.minimum(pert, 700.0))[None, :]
    return kernel(family, y, eta0 + pert[None, :])


def modality_estep(family, y, eta0, pert, kernels=True):
    """One modality's E-step pieces and, from the same means, the first Newton step's.

    Returns ``(k0, k1, (s0, i0, s1, i1))``: the kernels at ``eta0`` and ``eta0 + pert``
    and the score and expected information at both (:func:`score_info`), which the
    M-step that follows needs at exactly these coefficients; one exponential serves all
    (``mu1 = mu0 e^b``; NB: ``softplus(eta - log r) = log1p(mu / r)``).
    ``kernels=False``: the kernels are None (the Newton pieces alone).
    """
    xp = get_namespace(y)
    mu0 = safe_exp(eta0)
    mu1 = mu0 * xp.exp(xp.minimum(pert, 700.0))[None, :]
    k0, (s0, i0) = _from_mean(family, y, eta0, mu0, kernels)
    k1, (s1, i1) = _from_mean(family, y, eta0 + pert[None, :], mu1, kernels)
    return k0, k1, (s0, i0, s1, i1)


def glm_pieces(family, y, eta, kernels=True):
    """The kernel (None if not ``kernels``) and ``(score, information)`` at ``eta`` from one
    exponential: a line search's trial value and the next Newton step's pieces at once."""
    return _from_mean(family, y, eta, safe_exp(eta), kernels)


def _from_mean(family, y, eta, mu, kernels):
    if isinstance(family, Poisson):
        return (y * eta - mu if kernels else None), (y - mu, mu)
    xp = get_namespace(y)
    r = family.size
    k = y * (eta - xp.log(r)) - (y + r) * xp.log1p(mu / r) if kernels else None
    q = r / (r + mu)
    return k, ((y - mu) * q, mu * q)


def posterior_and_softplus(d):
    """``expit(d)`` and ``softplus(d) = log(1 + e^d)`` from one exponential.

    Beyond ``d = 35`` both are 1 and ``d`` to within 1e-15 relative.
    """
    xp = get_namespace(d)
    x = xp.exp(xp.minimum(d, d.dtype.type(35.0)))
    T = x / (1 + x)
    sp = xp.log1p(x)
    big = d > 35
    if bool(xp.any(big)):
        sp = xp.where(big, d, sp)
    return T, sp


def e_step(k0, k1, pi, const):
    """Posterior probabilities of perturbation ``T`` (n, B) and the marginal log-likelihood (B,).

    ``const`` (B,) is the parameter-free part of the log-likelihood (both modalities).
    """
    xp = get_namespace(k0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lpi0, lpi1 = xp.log1p(-pi), xp.log(pi)
        d = (k1 - k0) + (lpi1 - lpi0)[None, :]
    T, sp = posterior_and_softplus(d)
    ll = xp.sum(k0 + sp, axis=0) + k0.shape[0] * lpi0 + const
    return T, ll


def score_info(family, y, eta):
    """``dl/deta`` and the expected information ``-E d2l/deta2`` (elementwise)."""
    mu = family.mean(eta)
    return family.score(y, mu), family.information(mu)


def observed_info(family, y, eta):
    """``dl/deta`` and the observed information ``-d2l/deta2`` (elementwise)."""
    mu = family.mean(eta)
    if isinstance(family, Poisson):
        return family.score(y, mu), mu
    return family.score(y, mu), family.observed_information(y, mu)


def as_design(Z):
    """``Z`` itself if already a :class:`Design` (built once per fit and shared by every block)."""
    return Z if isinstance(Z, Design) else Design(Z)


class Design:
    """The covariate design with the products every weighted Gram matrix needs.

    ``ZZ`` (n, q*q) holds ``z_i z_i'`` flattened, so ``Z' diag(w) Z`` for B weight columns is
    one matrix product ``w' ZZ`` (B, q*q).
    """

    def __init__(self, Z):
        xp = get_namespace(Z)
        self.Z = Z
        self.n, self.q = Z.shape
        # built column by column from the contiguous rows of Z' and kept as the transpose
        # of a (q*q, n) array: broadcasting over a trailing axis of length q is 6x slower,
        # and BLAS reads the cells of each column contiguously in ``w' ZZ``
        ZT = xp.ascontiguousarray(Z.T)
        self.ZZ = xp.stack([ZT[a] * ZT[b] for a in range(self.q) for b in range(self.q)]).T
        self.ZT = ZT  # Louis's information builds its rows from it
        self.xp = xp
        self.zi = z_index(self.q) if xp is np else xp.asarray(z_index(self.q))

    def gram(self, w):
        """``Z' diag(w[:, b]) Z`` for every column b: (B, q, q)."""
        return (w.T @ self.ZZ).reshape(w.shape[1], self.q, self.q)

    def stacked_gram(self, w0, w1):
        """``X0' diag(w0) X0 + X1' diag(w1) X1`` for every pair: (B, q + 1, q + 1).

        ``X_p = [1, p, z]`` is the stacked design (glmeiv's ``Xtilde_augmented``);
        w0, w1 are (n, B).
        """
        xp = self.xp
        B = w0.shape[1]
        q = self.q
        out = xp.zeros((B, q + 1, q + 1))
        A = ((w0 + w1).T @ self.ZZ).reshape(B, q, q)
        c = w1.T @ self.Z  # (B, q)
        zi = self.zi
        out[:, zi[:, None], zi[None, :]] = A
        out[:, 1, zi] = c
        out[:, zi, 1] = c
        out[:, 1, 1] = xp.sum(w1, axis=0)
        return out

    def stacked_grad(self, a0, a1):
        """``X0' a0 + X1' a1`` for every pair: (B, q + 1)."""
        xp = self.xp
        gz = (a0 + a1).T @ self.Z  # (B, q)
        return join_coef(gz, xp.sum(a1, axis=0))
