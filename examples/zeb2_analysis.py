"""The seed analysis: ZEB2 expression by cell group, accounting for patients.

Fits ``ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``
(a Poisson GLMM) to the bundled ZEB2-like data set: 68,627 cells, 20 cell groups
(5 cell types x 2 tissues x 2 disease states), 16 patients of whom 7 have ulcerative
colitis. The data were simulated with lme4's published estimates on the real data
(Boland et al. 2020) as the truth, so the table shows, per cell group, skmixed's
estimate and 95% interval, lme4's estimate on this same data (stored reference
values), and the published lme4 value the simulation started from.

Run from the repository root: ``python examples/zeb2_analysis.py``.
"""

from pathlib import Path
import time

import numpy as np
import pandas as pd
import scipy.stats

from skmixed import PoissonGLMM
from skmixed.datasets import load_zeb2_like, load_zeb2_truth

FORMULA = "ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)"


def main():
    data = load_zeb2_like()
    print(f"{len(data):,} cells, {data.patient_assignment.nunique()} patients, "
          f"{data.cell_group.nunique()} cell groups; model: {FORMULA}\n")
    start = time.perf_counter()
    model = PoissonGLMM.from_formula(FORMULA, data, reml=False)  # glmer's maximum likelihood, to compare
    seconds = time.perf_counter() - start

    table = model.summary().fixed
    table.index = [name.removeprefix("cell_group") for name in table.index]
    published = load_zeb2_truth().query("kind == 'fixed'").set_index("name")
    out = pd.DataFrame(
        {
            "skmixed": table.estimate,
            "95% CI": [f"[{lo:7.3f}, {hi:7.3f}]" for lo, hi in zip(table["ci_2.5%"], table["ci_97.5%"])],
            "SE": table.std_error,
            "published lme4": published.value.loc[table.index],
            "(SE)": published.lme4_se.loc[table.index],
        }
    )
    reference = Path(__file__).resolve().parents[1] / "tests" / "reference" / "zeb2_laplace_fixef.csv"
    if reference.exists():  # lme4::glmer on this very data set, written by make_reference.R
        lme4 = pd.read_csv(reference).set_index("term").estimate
        out.insert(3, "lme4, same data", lme4.rename(lambda s: s.removeprefix("cell_group")).loc[table.index])
    with pd.option_context("display.width", 140, "display.float_format", "{:8.3f}".format):
        print("log expression rate per UMI, by cell group (type : tissue : disease)")
        print(out.to_string())

    vc = model.variance_components_.iloc[0]
    print(f"\npatient SD: {vc.sdcor:.3f} (published lme4: 0.201)   logLik: {model.loglik_:.2f}   "
          f"converged: {model.converged_}   fit: {seconds:.2f} s")

    # The paper's finding: ZEB2 is higher in rectal T cells of patients with colitis.
    names = list(table.index)
    c = np.zeros(len(names))
    c[names.index("T : R : diseased")], c[names.index("T : R : healthy")] = 1.0, -1.0
    est = c @ model.fixed_effects_.to_numpy()
    se = float(np.sqrt(c @ model.coef_cov_ @ c))
    p = 2 * scipy.stats.norm.sf(abs(est / se))
    print(f"\nT cells in rectum, diseased vs healthy: log fold change {est:.3f} "
          f"(fold change {np.exp(est):.2f}, 95% CI {np.exp(est - 1.96 * se):.2f}-{np.exp(est + 1.96 * se):.2f}), "
          f"z = {est / se:.2f}, p = {p:.2g}")


if __name__ == "__main__":
    main()
