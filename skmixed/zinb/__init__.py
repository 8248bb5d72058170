"""ZINBWaVE: zinbwave's zero-inflated negative binomial factor model."""

from ._estimator import ZINBWaVE

__all__ = ["ZINBWaVE"]
