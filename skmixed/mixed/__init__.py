"""Generalised and linear mixed models."""

from ._glmm import GLMMSummary, PoissonGLMM
from ._lmm import LinearMixedModel

__all__ = ["GLMMSummary", "LinearMixedModel", "PoissonGLMM"]
