"""Fit time of NegBinOffsetMean and of the SCEPTRE-style resampling test.

Data are simulated with fixed seeds and built once per process (cached). The
resampling benchmarks take the distillation and the treatment model as given (they
are per-gene and per-perturbation precomputations, timed separately), so that
``time_resampling`` is the cost of the B x pairs fits and their p-values.
"""

import functools
import warnings

import numpy as np
import scipy.sparse

from skmixed._backend import cupy_available

from ._sizes import sizes
from skmixed.offset import (
    NegBinOffsetMean,
    distill,
    make_perturbation_screen,
    resampling_test,
    treatment_probabilities,
)


@functools.cache
def offset_data(n, G, B, density, seed=0):
    rng = np.random.default_rng(seed)
    o = rng.normal(0.0, 0.5, n)
    mu = np.exp(0.2 + o)[:, None]
    Y = rng.negative_binomial(2.0, 2.0 / (2.0 + mu), size=(n, G)).astype(float)
    W = None
    if B:
        W = scipy.sparse.random(n, B, density=density, format="csr", random_state=seed, dtype=float)
        W.data[:] = 1.0
    return o[:, None], (Y[:, 0] if G == 1 else Y), W


class OneFit:
    """One NegBinOffsetMean fit on 2,000 cells (R's glm(negative.binomial(r)): ~3 ms)."""

    params = (["poisson", "nb_closed_form", "nb_mle", "nb_size_mle"],)
    param_names = ["model"]

    def setup(self, model):
        self.X, self.y, _ = offset_data(2000, 1, 0, 0.0)
        self.model = {
            "poisson": NegBinOffsetMean(family="poisson"),
            "nb_closed_form": NegBinOffsetMean(size=2.0),
            "nb_mle": NegBinOffsetMean(size=2.0, method="mle"),
            "nb_size_mle": NegBinOffsetMean(method="mle"),
        }[model]

    def time_fit(self, model):
        self.model.fit(self.X, self.y)


class ManyFits:
    """G responses x B weight columns in one call (divide by G * B for the time per fit)."""

    params = (sizes([2000], [2000, 200_000]), [0.01, 1.0], ["nb_closed_form", "nb_mle"], ["cpu", "gpu"])
    param_names = ["n_cells", "weight_density", "model", "device"]
    timeout = 300

    def setup(self, n_cells, density, model, device):
        G, B = 10, 500
        if n_cells * density * B > 2e7:  # dense weights on 200,000 cells: 1e8 entries
            raise NotImplementedError("too large for a benchmark")
        self.X, self.Y, self.W = offset_data(n_cells, G, B, density)
        if device == "gpu":
            if not cupy_available():
                raise NotImplementedError("needs CuPy and a CUDA device")
            import cupy
            import cupyx.scipy.sparse

            self.X, self.Y = cupy.asarray(self.X), cupy.asarray(self.Y)
            self.W = cupyx.scipy.sparse.csr_matrix(self.W)
        self.model = NegBinOffsetMean(size=2.0, method="closed_form" if model == "nb_closed_form" else "mle")

    def time_fit(self, n_cells, density, model, device):
        self.model.fit(self.X, self.Y, sample_weight=self.W)


class SingleGeneSparse:
    """Issue 14's case: one gene, 200,000 cells, 500 resampled 1% treatment indicators as a
    CSC (or CSR) matrix; divide by 500 for the time per fit (R's 2,000-cell
    ``glm(negative.binomial(2))``: 2.4 ms on the idle development machine)."""

    params = (["csc", "csr"], ["nb_closed_form", "poisson"])
    param_names = ["weight_format", "model"]

    def setup(self, fmt, model):
        X, Y, _ = offset_data(200_000, 1, 0, 0.0)
        self.X, self.y = X, Y
        W = scipy.sparse.random(200_000, 500, density=0.01, format=fmt, random_state=2, dtype=float)
        W.data[:] = 1.0
        self.W = W
        self.model = NegBinOffsetMean(size=2.0) if model == "nb_closed_form" else NegBinOffsetMean(family="poisson")
        self.model.fit(self.X, self.y, sample_weight=self.W)  # compiles the fused passes once

    def time_fit(self, fmt, model):
        self.model.fit(self.X, self.y, sample_weight=self.W)


@functools.cache
def screen(n_cells, n_perts, genes_per_pert):
    G = n_perts * genes_per_pert
    counts, treatment, cov, _ = make_perturbation_screen(
        n_cells, G, n_perts, treated_fraction=0.01, random_state=0
    )
    pairs = np.column_stack([np.arange(G), np.repeat(np.arange(n_perts), genes_per_pert)])
    return counts, treatment, cov, pairs


@functools.cache
def screen_precomputed(n_cells, n_perts, genes_per_pert):
    counts, treatment, cov, _ = screen(n_cells, n_perts, genes_per_pert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return distill(counts, cov), treatment_probabilities(treatment, cov)


class Resampling:
    """1,000 gene x perturbation pairs, B = 500, 1% of cells treated per perturbation.

    ``device="gpu"`` needs CuPy and a CUDA device (skipped otherwise): the same
    resamples, the block sums on the GPU.
    """

    params = (sizes([20_000], [20_000, 200_000]), sizes([(100, 10)], [(100, 10), (1000, 1)]),
              sizes(["conditional"], ["permutation", "conditional"]), sizes(["wald"], ["wald", "score"]),
              ["cpu", "gpu"])
    param_names = ["n_cells", "perturbations_x_genes", "resampling", "statistic", "device"]
    timeout = 900

    def setup(self, n_cells, shape, resampling, statistic, device):
        if device == "gpu" and not cupy_available():
            raise NotImplementedError("needs CuPy and a CUDA device")
        self.data = screen(n_cells, *shape)
        self.dist, self.pi = screen_precomputed(n_cells, *shape)

    def time_resampling(self, n_cells, shape, resampling, statistic, device):
        counts, treatment, cov, pairs = self.data
        resampling_test(counts, treatment, cov, pairs=pairs, n_resamples=500, statistic=statistic,
                        resampling=resampling, distillation=self.dist, propensity=self.pi, n_jobs=2,
                        device=device, random_state=0)

    def peakmem_resampling(self, n_cells, shape, resampling, statistic, device):
        self.time_resampling(n_cells, shape, resampling, statistic, device)


class Precomputation:
    """The per-gene distillation (NB GLM on 2 covariates) and the per-perturbation
    logistic treatment model, for 100 genes / perturbations."""

    params = (sizes([20_000], [20_000, 200_000]),)
    param_names = ["n_cells"]
    timeout = 600

    def setup(self, n_cells):
        self.counts, self.treatment, self.cov, _ = screen(n_cells, 100, 1)

    def time_distill(self, n_cells):
        distill(self.counts, self.cov)

    def time_treatment_model(self, n_cells):
        treatment_probabilities(self.treatment, self.cov)
