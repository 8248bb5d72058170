"""Fit time and peak memory of LinearMixedModel on lme4's data sets (lmer's models)."""

import functools
import warnings

from skmixed.datasets import load_insteval, load_sleepstudy
from skmixed.mixed import LinearMixedModel

INSTEVAL = "y ~ service + (1 | s) + (1 | d) + (1 | dept)"
SLEEP = "Reaction ~ Days + (Days | Subject)"


@functools.lru_cache(maxsize=None)
def _data(name):
    return {"insteval": load_insteval, "sleepstudy": load_sleepstudy}[name]()


def _fit(formula, data, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LinearMixedModel.from_formula(formula, data, **params)


class InstEval:
    """``y ~ service + (1 | s) + (1 | d) + (1 | dept)``, 73,421 rows, three crossed factors."""

    params = [True, False]
    param_names = ["reml"]
    timeout = 300

    def setup(self, reml):
        self.data = _data("insteval")

    def time_fit(self, reml):
        _fit(INSTEVAL, self.data, reml=reml)

    def peakmem_fit(self, reml):
        _fit(INSTEVAL, self.data, reml=reml)


class SleepStudy:
    """``Reaction ~ Days + (Days | Subject)`` by each solver (EM and MacKay iterate)."""

    params = ["profiled", "em", "mackay"]
    param_names = ["solver"]

    def setup(self, solver):
        self.data = _data("sleepstudy")

    def time_fit(self, solver):
        _fit(SLEEP, self.data, reml=False, solver=solver, max_iter=100_000)
