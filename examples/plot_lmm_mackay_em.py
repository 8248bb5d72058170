"""
MacKay's recipe, EM and lmer on the sleepstudy data
===================================================

A linear mixed model estimates how much to shrink each group's effects from the data.
MacKay's "quick and dirty" empirical Bayes recipe (Hinton's lecture 9f) iterates two
plug-in updates: the residual variance is the variance of the residuals, and the
random-effect variance is the variance of the predicted effects. EM looks almost the
same, but its M-step adds the *conditional variance* of the effects:

.. math::

   \\Sigma \\leftarrow \\frac1L \\sum_l \\bigl(\\hat b_l \\hat b_l^\\top
   + \\operatorname{Var}(b_l \\mid y)\\bigr),
   \\qquad
   \\operatorname{Var}(b) = \\operatorname{Var}(\\operatorname E[b \\mid y])
   + \\operatorname E[\\operatorname{Var}(b \\mid y)].

The law of total variance (right) says what the recipe leaves out. This example fits
lme4's ``Reaction ~ Days + (Days | Subject)`` by maximum likelihood three ways with
:class:`skmixed.mixed.LinearMixedModel` (``solver="profiled"``, lmer's method;
``solver="em"``; ``solver="mackay"``) and puts them side by side.
"""

# %%
# Three fits of one model
# -----------------------
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from skmixed.datasets import load_sleepstudy
from skmixed.mixed import LinearMixedModel

data = load_sleepstudy()
formula = "Reaction ~ Days + (Days | Subject)"
fits = {
    "lmer (profiled ML)": LinearMixedModel.from_formula(formula, data, reml=False),
    "EM": LinearMixedModel.from_formula(formula, data, reml=False, solver="em", max_iter=100_000),
    "MacKay (diagonal)": LinearMixedModel.from_formula(formula, data, reml=False, solver="mackay",
                                                      max_iter=100_000),
}


def components(model):
    vc = model.variance_components_
    out = {f"Var({v})": c for g, v, w, c in zip(vc.grp, vc.var1, vc.var2, vc.vcov)
           if g != "Residual" and pd.isna(w)}
    out["sigma^2"] = model.sigma_**2
    out["logLik"] = model.loglik_
    out["iterations"] = model.n_iter_
    return out


table = pd.DataFrame({name: components(m) for name, m in fits.items()})
print(table.round(2))

# %%
# EM lands on lmer's estimates (to the optimiser's precision) and on the same
# log-likelihood; MacKay's fixed point has both random-effect variances too small, and
# the residual variance too: the mean squared residual at the predictions leaves out
# ``tr(Z'Z Var(b | y)) / n``, the same conditional-variance term on the residual side.
# The fixed effects do not move: for this balanced design the GLS estimate does not
# depend on the variances.
#
# (The blog post reports 303, 31.1 and 671 for its run of the recipe; its exact
# definitions are not published. ``tests/test_lmm_solvers.py`` checks skmixed's fixed
# point against a dense re-implementation of the recipe as written above.)

# %%
# The law of total variance at the ML estimate
# --------------------------------------------
# lme4's ``ranef(fit, condVar = TRUE)`` gives the conditional mean and SD of every
# subject's effects (``random_effects_``). At the ML estimate, the variance component
# is exactly the variance of the predictions plus the mean conditional variance --
# EM's fixed point. MacKay keeps only the first part.
ml = fits["lmer (profiled ML)"]
re = ml.random_effects_
rows = []
for term in ["(Intercept)", "Days"]:
    r = re[re.term == term]
    var_pred, mean_cond = np.mean(r.condval**2), np.mean(r.condsd**2)
    rows.append({"term": term, "Var(E[b|y])": var_pred, "E[Var(b|y)]": mean_cond,
                 "sum": var_pred + mean_cond,
                 "VarCorr (ML)": ml.variance_components_.query("var1 == @term and var2 != var2").vcov.iloc[0]})
print(pd.DataFrame(rows).round(2))

# %%
# The recipe's error is the conditional variance it drops: about a third of the
# intercept variance here, because each subject's intercept is predicted from only ten
# days of data.

# %%
# A full covariance collapses
# ---------------------------
# The seed blog post found that keeping the off-diagonal of the predicted effects'
# covariance makes the procedure "bomb". The predictions are shrunk along the
# direction in which the data say least, so their empirical correlation grows each
# round until the covariance is singular. skmixed detects this, stops, warns and sets
# ``collapsed_``:
import warnings  # noqa: E402

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    full = LinearMixedModel.from_formula(formula, data, reml=False, solver="mackay", covariance="full")
print(full.collapsed_, full.n_iter_, [str(w.message)[:90] for w in caught])
print(full.variance_components_.round(3))

# %%
# Trajectories
# ------------
# The intercept variance along the iterations of EM and of MacKay's recipe, from lme4's
# starting point (theta = 1), against lmer's estimate.
from skmixed.mixed._lmm_em import fit_em  # noqa: E402

stats = ml._stats
traj = {}
for name, mackay in [("EM", False), ("MacKay", True)]:
    out = fit_em(stats, 0, reml=False, mackay=mackay, max_iter=60, tol=1e-14)
    traj[name] = [S[0][0, 0] for _, S in out["trace"]]
fig, ax = plt.subplots(figsize=(6, 3.5))
for name, values in traj.items():
    ax.plot(np.arange(1, len(values) + 1), values, label=name)
ax.axhline(table.loc["Var((Intercept))", "lmer (profiled ML)"], color="k", ls="--", label="lmer (ML)")
ax.set_xlabel("iteration")
ax.set_ylabel("Var(Subject intercept)")
ax.legend()
fig.tight_layout()
if "__file__" in globals():
    fig.savefig(Path(__file__).with_suffix(".png"), dpi=80)
