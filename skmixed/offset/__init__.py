"""Mean-plus-offset models and the resampling tests built on them."""

from ._mean import NegBinOffsetMean

__all__ = ["NegBinOffsetMean"]
