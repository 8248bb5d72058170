"""GLM-EIV: the errors-in-variables GLM of Barry, Roeder and Katsevich (2024) for CRISPR screens."""

from ._estimator import GLMEIV
from ._simulate import make_glmeiv_data
from ._threshold import thresholding_estimator

__all__ = ["GLMEIV", "make_glmeiv_data", "thresholding_estimator"]
