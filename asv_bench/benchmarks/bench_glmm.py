"""Fit time and peak memory of PoissonGLMM.

Data are simulated with fixed seeds and built once per process (cached), so
``setup`` costs nothing after the first parameter combination.
"""

import functools
import warnings

import numpy as np
import pandas as pd

from skmixed import PoissonGLMM
from skmixed.datasets import load_zeb2_like, make_poisson_glmm, make_zeb2_like

from ._sizes import sizes

N_FULL = 68_627  # the bundled data set, the size of Boland et al. (2020)


@functools.lru_cache(maxsize=None)
def zeb2_design(n_cells):
    """ZEB2 model inputs: one-hot cell groups, counts, patients, log offset."""
    data = load_zeb2_like() if n_cells == N_FULL else make_zeb2_like(n_cells, random_state=0)
    X = pd.get_dummies(data["cell_group"], prefix="cell_group", prefix_sep="", dtype=float)
    return X, data["ZEB2"], data["patient_assignment"], np.log(data["total_count"].to_numpy())


@functools.lru_cache(maxsize=None)
def slope_design(n_groups, n_per_group):
    data, _ = make_poisson_glmm(n_groups, n_per_group, sd_slope=0.3, corr=0.3, random_state=0)
    return data[["x1", "x2"]], data["y"], data["g"], data["offset"].to_numpy()


def _fit(model, X, y, groups, offset):
    with warnings.catch_warnings():
        # a benchmark measures the fit; warnings (e.g. singular fits) are not its business
        warnings.simplefilter("ignore")
        return model.fit(X, y, groups=groups, offset=offset)


class ZEB2:
    """``ZEB2 ~ 0 + cell_group + offset(log(total_count)) + (1 | patient_assignment)``."""

    params = ([10_000, N_FULL], [1, 25])
    param_names = ["n_cells", "nagq"]
    timeout = 300

    def setup(self, n_cells, nagq):
        self.args = zeb2_design(n_cells)
        self.model = PoissonGLMM(fit_intercept=False, nagq=nagq, reml=False)  # lme4's ML fit

    def time_fit(self, n_cells, nagq):
        _fit(self.model, *self.args)

    def peakmem_fit(self, n_cells, nagq):
        _fit(self.model, *self.args)


class ZEB2Uncollapsed:
    """The ZEB2 model, Laplace, on every row (``collapse=False``): the PIRLS engine itself."""

    params = sizes([10_000], [10_000, N_FULL])
    param_names = ["n_cells"]
    timeout = 300

    def setup(self, n_cells):
        self.args = zeb2_design(n_cells)
        self.model = PoissonGLMM(fit_intercept=False, collapse=False)

    def time_fit(self, n_cells):
        _fit(self.model, *self.args)

    def peakmem_fit(self, n_cells):
        _fit(self.model, *self.args)


class RandomSlope:
    """``y ~ x1 + x2 + offset(offset) + (1 + x1 | g)`` (or ``||``) on make_poisson_glmm."""

    params = ([(30, 40), (200, 50)], [True, False])
    param_names = ["groups_x_rows", "correlated"]
    timeout = 120

    def setup(self, size, correlated):
        self.args = slope_design(*size)
        self.model = PoissonGLMM(random_slopes=["x1"], random_correlated=correlated)

    def time_fit(self, size, correlated):
        _fit(self.model, *self.args)

    def peakmem_fit(self, size, correlated):
        _fit(self.model, *self.args)

    def time_predict(self, size, correlated):
        # fitted once in the first call; predict is the cheap path users call often
        if not hasattr(self.model, "coef_"):
            _fit(self.model, *self.args)
        X, _, groups, offset = self.args
        self.model.predict(X, groups=groups, offset=offset)


class ManyGenes:
    """One random-intercept model per gene, vectorised: sparse Boland-like counts."""

    params = sizes([500], [500, 2000])
    param_names = ["n_genes"]
    timeout = 300

    def setup(self, n_genes):
        from skmixed.datasets import make_boland_like_counts

        cells, self.counts, _ = make_boland_like_counts(n_genes, 20_000, random_state=0)
        self.X = pd.get_dummies(cells["cell_group"], prefix="cell_group", prefix_sep="", dtype=float)
        self.groups = cells["patient_assignment"]
        self.offset = np.log(cells["total_count"].to_numpy())

    def time_fit(self, n_genes):
        _fit(PoissonGLMM(fit_intercept=False), self.X, self.counts, self.groups, self.offset)

    def peakmem_fit(self, n_genes):
        _fit(PoissonGLMM(fit_intercept=False), self.X, self.counts, self.groups, self.offset)
