"""Simulate the GLM-EIV reference data (seeded); make_reference.R fits them with glmeiv.

One table of 50,000 cells (the paper's main setting: pi = 0.02, m_perturbation = log 0.25,
m_intercept = log 0.01, g_intercept = log 0.005, a Bernoulli batch, offsets log library
size) with two mRNA columns sharing the latent perturbation (``m_pois`` Poisson,
``m_nb`` negative binomial of size 20) and two gRNA columns (``g_15``: g_perturbation = log 1.5,
``g_4``: log 4). The four (mRNA, gRNA) combinations are the reference pairs.

    python tests/reference/eiv/simulate_reference.py
"""

from pathlib import Path

import numpy as np
import pandas as pd

from skmixed.eiv._simulate import make_glmeiv_data

HERE = Path(__file__).parent
N = 50_000

rng = np.random.default_rng(20240601)
X, m_p, g, off, p = make_glmeiv_data(N, 2, g_perturbation=np.log([1.5, 4.0]), random_state=rng)
# the same cells and perturbation for the NB mRNA column: redraw m given p[:, 0]
lib_m = np.exp(off["mrna"].to_numpy())
lib_g = np.exp(off["grna"].to_numpy())
eta_m = np.log(0.01) + np.log(0.25) * p[:, 0] + np.log(0.9) * X["batch"].to_numpy() + np.log(lib_m)
mu = np.exp(eta_m)
m_nb = rng.negative_binomial(20.0, 20.0 / (20.0 + mu))
# the gRNA column with log 4 must share the latent indicator: redraw it given p[:, 0]
eta_g = np.log(0.005) + np.log(4.0) * p[:, 0] + np.log(1.1) * X["batch"].to_numpy() + np.log(lib_g)
g_4 = rng.poisson(np.exp(eta_g))
df = pd.DataFrame(
    {
        "batch": X["batch"].astype(int),
        "lib_m": lib_m.astype(int),
        "lib_g": lib_g.astype(int),
        "p": p[:, 0].astype(int),
        "m_pois": m_p[:, 0],
        "m_nb": m_nb,
        "g_15": g[:, 0],
        "g_4": g_4,
    }
)
df.to_csv(HERE / "glmeiv_data.csv.gz", index=False)
print(df.describe().T)
