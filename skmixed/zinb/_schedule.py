"""Subsample problems of zinbwave's objective: a random subset of the cells, with the
gene penalties scaled by the sampled fraction.

With the gene penalties (and the dispersion penalty) scaled by ``m / n``, the objective
of ``m`` uniformly sampled cells estimates, up to the factor ``m / n``, the full
objective's dependence on the gene parameters and the dispersion; its maximiser
estimates the full one's with the sampling error of ``m`` cells. :func:`prefit_dispersion`
uses this for zinbwave's first step, the dispersion alone at the initial values: a
scalar (or one value per gene) that a few thousand cells determine to far better than
the full iterations need, which refine it at every iteration anyway.

(A full "subsample first" solver, every gene parameter fitted on a subsample before the
full iterations, was tried on 20,000 x 1,000 simulated cells with K = 10: it started the
full iterations with the deficit that the subsample's sampling error predicts, about
``0.5 * (gene parameters) * (n / m - 1)`` log-likelihood units, and the alternating
iterations then needed as many steps to remove it as they need from the
initialisation, so it was slower; it is not offered.)
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ._chunks import row_problem
from ._model import Params
from ._optimize import Optimizer


def _sub_penalty(penalty, scale: float):
    """The penalty of a subsample problem: gene terms scaled by ``m / n``, cell terms kept."""
    return replace(
        penalty,
        beta_mu=penalty.beta_mu * scale,
        beta_pi=penalty.beta_pi * scale,
        alpha=penalty.alpha * scale,
        zeta=penalty.zeta * scale,
    )


def subsample_problem(counts, design, P, idx):
    """Counts, design and parameters of the cells ``idx`` (sorted host indices)."""
    xp = design.xp
    ix = idx if xp is np else xp.asarray(idx)
    scale = idx.size / counts.n
    sub_counts, sub_design = row_problem(counts, design, ix, _sub_penalty(design.penalty, scale))
    Ps = Params(
        beta_mu=P.beta_mu.copy(), beta_pi=P.beta_pi.copy(),
        gamma_mu=P.gamma_mu[:, ix].copy(), gamma_pi=P.gamma_pi[:, ix].copy(), W=P.W[ix].copy(),
        alpha_mu=P.alpha_mu.copy(), alpha_pi=P.alpha_pi.copy(), zeta=P.zeta.copy(),
    )
    return sub_counts, sub_design, Ps


def prefit_dispersion(counts, design, P, *, common: bool, rng, size: int = 4000):
    """zinbwave's dispersion-only start (:meth:`Optimizer.zeta_only`) on at most ``size``
    random cells; ``P.zeta`` is updated in place."""
    if counts.n <= size:
        Optimizer(counts, design, common_dispersion=common).zeta_only(P)
        return
    idx = np.sort(rng.choice(counts.n, size=size, replace=False))
    sub_counts, sub_design, Ps = subsample_problem(counts, design, P, idx)
    Optimizer(sub_counts, sub_design, common_dispersion=common).zeta_only(Ps)
    P.zeta[...] = Ps.zeta
