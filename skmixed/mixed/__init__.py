"""Generalised and linear mixed models."""

from ._glmm import GLMMSummary, PoissonGLMM
from ._lmm import LinearMixedModel
from ._lmm_inference import anova
from ._nbglmm import NegativeBinomialGLMM

__all__ = ["GLMMSummary", "LinearMixedModel", "NegativeBinomialGLMM", "PoissonGLMM", "anova"]
