"""Generalised linear mixed models."""

from ._glmm import GLMMSummary, PoissonGLMM

__all__ = ["GLMMSummary", "PoissonGLMM"]
