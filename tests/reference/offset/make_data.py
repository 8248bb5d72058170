"""Writes data.csv, the input of make_reference.R (run once; the CSV is committed).

    python tests/reference/offset/make_data.py

Columns: o (offset), y_nb (NB, size 2.5, beta 0.4), y_low (NB, size 0.7, low mean,
mostly zeros), y_pois (Poisson, beta -0.2: no overdispersion), w_treat (0/1 treatment
indicator, ~30% ones), w_prob (membership probabilities in [0, 1], with exact 0s and 1s).
"""

from pathlib import Path

import numpy as np
import pandas as pd

rng = np.random.default_rng(20261122)
n = 300
o = np.round(rng.normal(np.log(0.8), 0.5, n), 6)


def nb(mu, r):
    return rng.negative_binomial(r, r / (r + mu))


w_prob = np.round(rng.uniform(0, 1, n), 6)
w_prob[rng.choice(n, 20, replace=False)] = 0.0
w_prob[rng.choice(n, 20, replace=False)] = 1.0
data = pd.DataFrame(
    {
        "o": o,
        "y_nb": nb(np.exp(0.4 + o), 2.5),
        "y_low": nb(np.exp(np.log(0.3) + o), 0.7),
        "y_pois": rng.poisson(np.exp(-0.2 + o)),
        "w_treat": (rng.uniform(size=n) < 0.3).astype(int),
        "w_prob": w_prob,
    }
)
data.to_csv(Path(__file__).with_name("data.csv"), index=False)
