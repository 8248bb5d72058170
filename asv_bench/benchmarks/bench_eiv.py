"""GLMEIV fit time: one pair of 50,000 cells (the reference data; glmeiv's accelerated fit
takes 2.8-4.0 s on the same pair, tests/reference/eiv/glmeiv_reference.csv) and a block of
pairs, on the CPU and (when CuPy sees a device) on the GPU."""

import functools

import numpy as np

from skmixed._backend import cupy_available
from skmixed.eiv import GLMEIV, make_glmeiv_data

from ._sizes import sizes


@functools.cache
def pair_data(family):
    X, m, g, off, _ = make_glmeiv_data(50_000, 1, pi=0.02, g_perturbation=np.log(1.5),
                                       mrna_size=None if family == "poisson" else 20.0, random_state=0)
    return X, m[:, 0], g[:, 0], off


@functools.cache
def screen_data(pairs, cells):
    return make_glmeiv_data(cells, pairs, pi=0.01, mrna_size=20.0, random_state=1)


class OnePair:
    params = (["poisson", "negative_binomial"], ["accelerated", "random"])
    param_names = ["mrna_family", "init"]
    timeout = 300

    def setup(self, family, init):
        self.data = pair_data(family)
        self.model = GLMEIV(mrna_family=family, init=init, random_state=0)

    def time_fit(self, family, init):
        X, m, g, off = self.data
        self.model.fit(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"])


class ManyPairs:
    params = (sizes([(100, 20_000)], [(100, 20_000), (20, 200_000)]), ["cpu", "gpu"])
    param_names = ["pairs_x_cells", "device"]
    timeout = 600

    def setup(self, shape, device):
        if device == "gpu" and not cupy_available():
            raise NotImplementedError("no CUDA device")
        self.data = screen_data(*shape)
        self.model = GLMEIV(device=device, random_state=0)

    def time_fit(self, shape, device):
        X, m, g, off, _ = self.data
        self.model.fit(X, m, grna=g, offset=off["mrna"], grna_offset=off["grna"],
                       pairs=[(j, j) for j in range(shape[0])])

    def peakmem_fit(self, shape, device):
        self.time_fit(shape, device)
