"""Write zeb2_nb_data.csv.gz: ZEB2-like cells with negative binomial noise.

The design (20 cell groups, 16 patients, sequencing depths) is that of
``skmixed.datasets.make_zeb2_like(20000, random_state=13)``; the counts are redrawn
as NB2 with size 2 around the same means (lme4's ZEB2 estimates as the truth), so
that the NB GLMM has a known truth and glmmTMB a moderately large data set.
Run from the repository root: ``python tests/reference/nbglmm/make_data.py``.
"""

import numpy as np

from skmixed.datasets import load_zeb2_truth, make_zeb2_like

SIZE = 2.0

data = make_zeb2_like(20_000, random_state=13)
truth = load_zeb2_truth()
fixed = truth.loc[truth.kind == "fixed"].set_index("name")["value"]
patient = truth.loc[truth.kind == "patient"].set_index("name")["value"]
mu = np.exp(
    fixed.loc[data.cell_group.astype(str)].to_numpy()
    + patient.loc[data.patient_assignment].to_numpy()
    + np.log(data.total_count.to_numpy())
)
rng = np.random.default_rng(13)
# NB2 as a gamma-Poisson mixture: variance mu + mu^2 / SIZE
data["y"] = rng.poisson(rng.gamma(SIZE, mu / SIZE))
data[["cell_group", "patient_assignment", "total_count", "y"]].to_csv(
    "tests/reference/nbglmm/zeb2_nb_data.csv.gz", index=False
)
