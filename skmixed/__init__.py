"""skmixed: scikit-learn-compatible mixed and latent-variable models for count data."""

from ._inputs import store_contrast
from .eiv import GLMEIV
from .mixed import LinearMixedModel, PoissonGLMM
from .offset import NegBinOffsetMean, resampling_test
from .zinb import ZINBWaVE

__all__ = ["GLMEIV", "LinearMixedModel", "NegBinOffsetMean", "PoissonGLMM", "ZINBWaVE", "resampling_test", "store_contrast"]
__version__ = "0.1.0.dev0"
