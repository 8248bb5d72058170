"""Fit time and peak memory of ZINBWaVE on simulated counts (make_zinb_counts).

Data are simulated with fixed seeds once per process (cached). ``time_fit`` runs a
fixed number of iterations (``max_iter``, no convergence test) so that timings compare
across versions; ``time_iteration`` is one cell pass plus one gene step.
"""

import functools
import warnings

import numpy as np

from skmixed import ZINBWaVE
from skmixed.datasets import make_zinb_counts

from ._sizes import sizes


@functools.cache
def counts(n_cells, n_genes):
    sim = make_zinb_counts(n_cells, n_genes, n_clusters=8, n_latent=10, random_state=0)
    Y = sim.counts
    Y = Y[:, np.asarray((Y > 0).sum(0)).ravel() > 0]
    return Y[np.asarray((Y > 0).sum(1)).ravel() > 0]


class Fit:
    params = (sizes([(2000, 500)], [(2000, 500), (10000, 1000)]), [2, 10])
    param_names = ["cells_x_genes", "K"]
    timeout = 600

    def setup(self, shape, K):
        self.Y = counts(*shape)

    def _fit(self, K, max_iter):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ZINBWaVE(K, random_state=0, max_iter=max_iter, tol=0.0).fit(self.Y)

    def time_fit(self, shape, K):
        self._fit(K, 10)

    def peakmem_fit(self, shape, K):
        self._fit(K, 3)


class Transform:
    """W of 1,000 new cells with the gene parameters fixed.

    The fit is made once (``setup_cache``, outside the timed region and its timeout)
    and shared by the repeats."""

    timeout = 300

    def setup_cache(self):
        Y = counts(6000, 500)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = ZINBWaVE(10, random_state=0, max_iter=20).fit(Y[:5000])
        return model, Y[5000:]

    def time_transform(self, fitted):
        model, new = fitted
        model.transform(new)


class Kernel:
    """Three iterations with the fused numba kernel or the numpy passes, and with float32
    or float64 information products (issue 14); 100,000 x 1,000 is the published case
    (asv_bench/zinb_compare.py, doc/benchmarks_zinb.rst)."""

    params = (sizes([(2000, 1000)], [(20000, 1000)]), ["numba", "numpy"], ["mixed", "double"])
    param_names = ["cells_x_genes", "kernel", "precision"]
    timeout = 900

    def setup(self, shape, kernel, precision):
        from skmixed.zinb import _evaluate, _kernels_numba  # noqa: PLC0415

        if kernel == "numba" and not _kernels_numba.available():
            raise NotImplementedError("numba is not installed")  # asv skips the case
        self.Y = counts(*shape)
        self.previous = _evaluate.use_kernel(kernel)

    def teardown(self, shape, kernel, precision):
        from skmixed.zinb import _evaluate  # noqa: PLC0415

        _evaluate.use_kernel(self.previous)

    def time_fit(self, shape, kernel, precision):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ZINBWaVE(10, random_state=0, max_iter=3, tol=0.0, n_jobs=2, precision=precision).fit(self.Y)
