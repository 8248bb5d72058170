"""Mean-plus-offset models and the resampling tests built on them."""

from ._mean import NegBinOffsetMean
from ._resampling import (
    Distillation,
    conditional_resamples,
    distill,
    permutation_resamples,
    resampling_pvalues,
    resampling_test,
    skewnorm_moments,
    treatment_probabilities,
)
from ._simulate import make_perturbation_screen

__all__ = [
    "Distillation",
    "NegBinOffsetMean",
    "conditional_resamples",
    "distill",
    "make_perturbation_screen",
    "permutation_resamples",
    "resampling_pvalues",
    "resampling_test",
    "skewnorm_moments",
    "treatment_probabilities",
]
