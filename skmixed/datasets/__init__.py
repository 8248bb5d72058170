"""Simulators with known truth and small bundled data sets."""

from ._grouseticks import load_grouseticks
from ._lme4_data import load_insteval, load_pastes, load_penicillin, load_sleepstudy
from ._simulate import make_multipatient_counts, make_poisson_glmm
from ._zeb2 import load_zeb2_like, load_zeb2_truth, make_boland_like_counts, make_zeb2_like
from ._zinb import make_zinb_counts

__all__ = [
    "load_grouseticks",
    "load_insteval",
    "load_pastes",
    "load_penicillin",
    "load_sleepstudy",
    "load_zeb2_like",
    "load_zeb2_truth",
    "make_boland_like_counts",
    "make_multipatient_counts",
    "make_poisson_glmm",
    "make_zeb2_like",
    "make_zinb_counts",
]
