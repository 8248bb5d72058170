"""Response distributions: one object per family, each owning its log-likelihood,
deviance, derivatives with respect to the linear predictor and valid ranges.

All methods are elementwise and namespace-agnostic (numpy or cupy, via
:mod:`skmixed._backend`). Weights multiply the per-observation log-likelihood.
"""

from __future__ import annotations

import numpy as np

from ._backend import gammaln, get_namespace, safe_exp, segment_sum, to_host, xlogy


class Poisson:
    """Poisson distribution with log link: ``y ~ Poisson(exp(eta))``."""

    name = "poisson"

    # -- validation ---------------------------------------------------------------
    @staticmethod
    def check_response(y, name: str = "y") -> bool:
        """Raise ``ValueError`` for NaN, infinite or negative counts.

        Returns whether every value is an integer (non-integer values are allowed
        by the likelihood through ``lgamma``, but callers decide whether to accept them).
        """
        yh = to_host(y)
        if not np.all(np.isfinite(yh)):
            bad = yh[~np.isfinite(yh)][0]
            raise ValueError(f"{name} must be finite; found {bad!r}.")
        if np.any(yh < 0):
            raise ValueError(f"{name} must be non-negative counts; found {yh[yh < 0][0]!r}.")
        return bool(np.all(yh == np.round(yh)))

    # -- the distribution ---------------------------------------------------------
    @staticmethod
    def mean(eta):
        return safe_exp(eta)

    @staticmethod
    def loglik(y, eta, weights=None):
        """Per-observation log-likelihood ``w * (y * eta - exp(eta) - lgamma(y + 1))``."""
        ll = y * eta - safe_exp(eta) - gammaln(y + 1.0)
        return ll if weights is None else weights * ll

    @staticmethod
    def loglik_kernel(y, eta, weights=None):
        """The part of ``loglik`` that depends on ``eta``: ``w * (y * eta - exp(eta))``."""
        ll = y * eta - safe_exp(eta)
        return ll if weights is None else weights * ll

    @staticmethod
    def log_normaliser(y, weights=None):
        """``loglik - loglik_kernel``: ``-w * lgamma(y + 1)``."""
        ll = -gammaln(y + 1.0)
        return ll if weights is None else weights * ll

    @staticmethod
    def saturated_loglik(y, weights=None):
        """Log-likelihood at ``mu = y``; ``-2 * (loglik - saturated)`` is the deviance."""
        ll = xlogy(y, y) - y - gammaln(y + 1.0)
        return ll if weights is None else weights * ll

    @staticmethod
    def unit_deviance(y, mu):
        return 2.0 * (xlogy(y, y / mu) - (y - mu))

    # -- derivatives with respect to eta -------------------------------------------
    @staticmethod
    def score(y, mu, weights=None):
        """d loglik / d eta."""
        g = y - mu
        return g if weights is None else weights * g

    @staticmethod
    def information(mu, weights=None):
        """-d^2 loglik / d eta^2 (observed = expected for the canonical link)."""
        return mu if weights is None else weights * mu

    @staticmethod
    def information_deriv(mu, weights=None):
        """d information / d eta (``mu`` again under the log link)."""
        return mu if weights is None else weights * mu

    # -- exact data reduction -------------------------------------------------------
    @staticmethod
    def collapse(y, offset, weights, keys, n_keys: int):
        """Sufficient statistics of rows that share a linear predictor.

        Rows with the same ``keys`` value share ``eta - offset``. The Poisson
        log-likelihood of the rows of a key is then that of one observation with
        count ``sum(w * y)`` and offset ``log(sum(w * exp(offset)))`` plus a term
        that does not depend on the parameters, returned as ``const``.

        Returns
        -------
        y_c, offset_c : arrays of shape (n_keys,)
        const : float
            ``full log-likelihood - collapsed log-likelihood`` at any parameters.
        """
        xp = get_namespace(y)
        w = xp.ones_like(y) if weights is None else weights
        y_c = segment_sum(w * y, keys, n_keys)
        # log-sum-exp of the offsets within a key, shifted for stability
        shift = xp.max(offset) if offset.size else 0.0
        e_c = segment_sum(w * xp.exp(offset - shift), keys, n_keys)
        offset_c = xp.log(e_c) + shift
        const = float(xp.sum(w * (y * offset - gammaln(y + 1.0))))
        const -= float(xp.sum(y_c * offset_c - gammaln(y_c + 1.0)))
        return y_c, offset_c, const


FAMILIES = {"poisson": Poisson}
