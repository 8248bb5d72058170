"""zinbwave's model: parameters, design, penalty and linear predictors.

Shapes follow zinbwave (``Y`` is cells x genes here, as in scikit-learn; zinbwave's
internals use the same orientation): ``X`` (n, M) cell covariates, ``V`` (J, L) gene
covariates, ``beta_mu, beta_pi`` (M, J), ``gamma_mu, gamma_pi`` (L, n), ``W`` (n, K),
``alpha_mu, alpha_pi`` (K, J), ``zeta`` (J,) = log inverse dispersion.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from .._backend import get_namespace, to_host

EPSILON_KEYS = ("beta_mu", "gamma_mu", "beta_pi", "gamma_pi", "W", "alpha", "zeta", "min_logit")


def _has_intercept(D) -> bool:
    """zinbwave's rule: the first column is an intercept when it is all ones."""
    return D.shape[1] > 0 and bool(np.all(to_host(D[:, 0]) == 1.0))


@dataclass
class Penalty:
    """Ridge weights of zinbwave's penalised likelihood.

    ``epsilon`` (default ``J``) sets ``beta = epsilon / J``, ``gamma = W = epsilon / n``,
    ``alpha = epsilon / J`` and ``zeta = epsilon``; an intercept (a first column of ones)
    of ``X`` or ``V`` is not penalised in the mean model and penalised by ``min_logit``
    (1e-3) in the zero-inflation model. The penalty is
    ``sum(eps * par**2) / 2`` over all coefficients plus ``eps_zeta * var(zeta) / 2``
    (sample variance; zero for a common dispersion).
    """

    beta_mu: np.ndarray  # (M,)
    beta_pi: np.ndarray
    gamma_mu: np.ndarray  # (L,)
    gamma_pi: np.ndarray
    W: float
    alpha: float
    zeta: float
    scalars: dict  # the scalar epsilons, as zinbwave's slots (epsilon_W etc.)

    @classmethod
    def zinbwave(cls, X, V, n: int, J: int, epsilon=None):
        eps = {} if epsilon is None else dict(epsilon) if isinstance(epsilon, dict) else {"epsilon": float(epsilon)}
        base = float(eps.pop("epsilon", J))
        unknown = set(eps) - set(EPSILON_KEYS)
        if unknown:
            raise ValueError(f"epsilon has unknown keys {sorted(unknown)}; allowed: 'epsilon', {', '.join(map(repr, EPSILON_KEYS))}.")
        s = {
            "beta_mu": base / J, "gamma_mu": base / n, "beta_pi": base / J, "gamma_pi": base / n,
            "W": base / n, "alpha": base / J, "zeta": base, "min_logit": 1e-3,
        }
        s.update({k: float(v) for k, v in eps.items()})
        for k, v in s.items():
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"epsilon[{k!r}] must be a non-negative number, got {v!r}.")
        xi, vi = _has_intercept(X), _has_intercept(V)
        M, L = X.shape[1], V.shape[1]

        def vec(size, value, intercept, first):
            e = np.full(size, value)
            if intercept:
                e[0] = first
            return e

        return cls(
            beta_mu=vec(M, s["beta_mu"], xi, 0.0),
            beta_pi=vec(M, s["beta_pi"], xi, s["min_logit"]),
            gamma_mu=vec(L, s["gamma_mu"], vi, 0.0),
            gamma_pi=vec(L, s["gamma_pi"], vi, s["min_logit"]),
            W=s["W"], alpha=s["alpha"], zeta=s["zeta"], scalars=s,
        )

    def gene_vector(self, K: int):
        """Ridge weights of one gene's block ``(beta_mu, alpha_mu, beta_pi, alpha_pi)``."""
        a = np.full(K, self.alpha)
        return np.concatenate([self.beta_mu, a, self.beta_pi, a])

    def cell_vector(self, K: int):
        """Ridge weights of one cell's block ``(gamma_mu, gamma_pi, W)``."""
        return np.concatenate([self.gamma_mu, self.gamma_pi, np.full(K, self.W)])


@dataclass
class Params:
    beta_mu: object
    beta_pi: object
    gamma_mu: object
    gamma_pi: object
    W: object
    alpha_mu: object
    alpha_pi: object
    zeta: object  # (J,)

    def copy(self):
        return replace(self, **{f.name: getattr(self, f.name).copy() for f in fields(self)})

    def take_cells(self, rows):
        """The parameters with only the cells ``rows`` (copies; gene arrays shared)."""
        return replace(self, gamma_mu=self.gamma_mu[:, rows].copy(), gamma_pi=self.gamma_pi[:, rows].copy(),
                       W=self.W[rows].copy())

    # -- blocks ----------------------------------------------------------------------
    def gene_block(self):
        """(J, 2(M + K)): per gene ``(beta_mu, alpha_mu, beta_pi, alpha_pi)``."""
        xp = get_namespace(self.beta_mu)
        return xp.concatenate([self.beta_mu, self.alpha_mu, self.beta_pi, self.alpha_pi], axis=0).T

    def set_gene_block(self, G, cols=None):
        M, K = self.beta_mu.shape[0], self.alpha_mu.shape[0]
        parts = (("beta_mu", M), ("alpha_mu", K), ("beta_pi", M), ("alpha_pi", K))
        i = 0
        for name, size in parts:
            if cols is None:
                getattr(self, name)[...] = G[:, i:i + size].T
            else:
                getattr(self, name)[:, cols] = G[:, i:i + size].T
            i += size

    def cell_block(self, rows=slice(None)):
        """(n_rows, 2L + K): per cell ``(gamma_mu, gamma_pi, W)``."""
        xp = get_namespace(self.W)
        return xp.concatenate([self.gamma_mu[:, rows].T, self.gamma_pi[:, rows].T, self.W[rows]], axis=1)

    def set_cell_block(self, C, rows):
        L = self.gamma_mu.shape[0]
        self.gamma_mu[:, rows] = C[:, :L].T
        self.gamma_pi[:, rows] = C[:, L:2 * L].T
        self.W[rows] = C[:, 2 * L:]


class Design:
    """Covariates, offsets and penalty of one fit; builds linear predictors chunk by chunk."""

    def __init__(self, X, V, off_mu, off_pi, penalty: Penalty, K: int):
        self.X, self.V = X, V
        self.off_mu, self.off_pi = off_mu, off_pi  # None, (n,) or (n, J)
        self.penalty = penalty
        self.K = K
        xp = get_namespace(X)
        self.xp = xp
        self.pen_gene = xp.asarray(penalty.gene_vector(K))
        self.pen_cell = xp.asarray(penalty.cell_vector(K))

    @staticmethod
    def _offset(off, rows, cols):
        if off is None:
            return 0.0
        if off.ndim == 1:
            return off[rows][:, None]
        o = off[rows]
        return o if cols is None else o[:, cols]

    def eta(self, P: Params, rows, cols=None, part: str = "mu"):
        """One linear predictor, ``eta_mu`` or ``eta_pi``, for cells ``rows`` and genes ``cols``."""
        xp = self.xp
        beta, gamma, alpha, off = (
            (P.beta_mu, P.gamma_mu, P.alpha_mu, self.off_mu) if part == "mu" else (P.beta_pi, P.gamma_pi, P.alpha_pi, self.off_pi)
        )
        left = xp.concatenate([self.X[rows], gamma[:, rows].T, P.W[rows]], axis=1)
        right = xp.concatenate([beta, self.V.T, alpha], axis=0)
        if cols is not None:
            right = right[:, cols]
        return left @ right + self._offset(off, rows, cols)

    def predictors(self, P: Params, rows, cols=None):
        """``(eta_mu, eta_pi)`` for the cells ``rows`` (a slice or index array) and genes ``cols``."""
        return self.eta(P, rows, cols, "mu"), self.eta(P, rows, cols, "pi")

    # -- penalty ----------------------------------------------------------------------
    def gene_penalty(self, G):
        """Per-gene ridge penalty of gene blocks ``G`` (J, 2(M + K))."""
        return 0.5 * (G * G) @ self.pen_gene

    def cell_penalty(self, C):
        return 0.5 * (C * C) @ self.pen_cell

    def zeta_penalty(self, zeta, common: bool) -> float:
        J = zeta.shape[0]
        if common or J < 2:
            return 0.0
        xp = get_namespace(zeta)
        return 0.5 * self.penalty.zeta * float(xp.var(zeta, ddof=1))

    def total_penalty(self, P: Params, common: bool) -> float:
        return (
            float(self.gene_penalty(P.gene_block()).sum())
            + float(self.cell_penalty(P.cell_block()).sum())
            + self.zeta_penalty(P.zeta, common)
        )
