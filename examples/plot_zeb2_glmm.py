"""
ZEB2 expression by cell group with a Poisson GLMM
=================================================

Boland et al. (2020) compared gene expression in immune cells from blood and
rectum of healthy people and of patients with ulcerative colitis. Disease state
is confounded with the patient, so the cell-group means of a gene such as ZEB2
are estimated with a random intercept per patient and the cell's total UMI
count as exposure, the lme4 model

``ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``.

This example fits that model to :func:`skmixed.datasets.load_zeb2_like`, a
simulation with the structure of the original data (68,627 cells, 20 cell
groups, 16 patients) whose true parameters are known, and compares the
estimates and their 95% confidence intervals with the truth.
"""

# %%
# Load the data
# -------------
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from skmixed import PoissonGLMM
from skmixed.datasets import load_zeb2_like, load_zeb2_truth

data = load_zeb2_like()
print(data.shape)
data.head()

# %%
# Fit the model
# -------------
# :meth:`~skmixed.PoissonGLMM.from_formula` takes lme4's formula: one mean per cell
# group (``0 + cell_group``), the log of the total count as offset and a random
# intercept per patient. Coefficients are named as lme4 names them.
formula = "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"
model = PoissonGLMM.from_formula(formula, data)

# The same fit with the matrix interface:
#
#     X = pd.get_dummies(data["cell_group"], prefix="cell_group", prefix_sep="", dtype=float)
#     model = PoissonGLMM(fit_intercept=False).fit(
#         X, data["ZEB2"], groups=data["patient_assignment"],
#         offset=np.log(data["total_count"]))
summary = model.summary()
print(summary.fit)
print(summary.random)

# %%
# Estimates beside the truth
# --------------------------
# ``summary().fixed`` holds the estimates, standard errors and 95% intervals. By
# default the variance is fitted by REML and the intervals refer to a t distribution
# with the between-within degrees of freedom (14 for a cell-group mean estimated from
# 16 patients' cells; see :ref:`small_sample_inference`); ``reml=False`` and
# ``summary(test="z")`` give lme4's ``summary()`` table with Wald intervals.
# The truth used by the simulation is lme4's fit of the real data.
truth = load_zeb2_truth()
true_fixed = truth.loc[truth["kind"] == "fixed"].set_index("name")["value"]

table = summary.fixed[["estimate", "std_error", "ci_2.5%", "ci_97.5%"]].copy()
table.index = table.index.str.removeprefix("cell_group")
table["truth"] = true_fixed.reindex(table.index)
table["covered"] = (table["ci_2.5%"] <= table["truth"]) & (table["truth"] <= table["ci_97.5%"])
with pd.option_context("display.width", 120, "display.max_columns", 10, "display.precision", 3):
    print(table)
print(f"{table['covered'].sum()} of {len(table)} intervals contain the true value")

# %%
# Forest plot
# -----------
# Each cell group's estimated log rate of ZEB2 per UMI, with its 95% interval,
# and the true value as a cross.
order = table.sort_values("estimate").index
est = table.loc[order]
ypos = np.arange(len(order))

fig, ax = plt.subplots(figsize=(7, 6.5))
ax.errorbar(
    est["estimate"],
    ypos,
    xerr=[est["estimate"] - est["ci_2.5%"], est["ci_97.5%"] - est["estimate"]],
    fmt="o",
    color="C0",
    capsize=2,
    label="PoissonGLMM estimate, 95% CI",
)
ax.scatter(est["truth"], ypos, marker="x", color="C3", zorder=3, label="truth")
ax.set_yticks(ypos)
ax.set_yticklabels(order)
ax.set_xlabel("log(ZEB2 molecules per UMI)")
ax.set_title("ZEB2 cell-group means, random intercept per patient")
ax.legend(loc="lower right")
fig.tight_layout()
if "__file__" in globals():  # run as a script: keep the figure next to it
    fig.savefig(Path(__file__).with_suffix(".png"), dpi=120)

# %%
# Patient effects
# ---------------
# Conditional modes of the patient intercepts with their conditional standard
# deviations (lme4's ``ranef(fit, condVar = TRUE)``), beside the simulated ones.
re = model.random_effects_.set_index("level")
true_patient = truth.loc[truth["kind"] == "patient"].set_index("name")["value"]
re["truth"] = true_patient.reindex(re.index)
print(re[["condval", "condsd", "truth"]].round(3))
