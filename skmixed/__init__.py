"""skmixed: scikit-learn-compatible mixed and latent-variable models for count data."""

from ._inputs import store_contrast
from ._parallel import parallel_config
from .eiv import GLMEIV
from .mixed import LinearMixedModel, NegativeBinomialGLMM, PoissonGLMM
from .offset import NegBinOffsetMean, resampling_test
from .zinb import ZINBWaVE

__all__ = [
    "GLMEIV",
    "LinearMixedModel",
    "NegBinOffsetMean",
    "NegativeBinomialGLMM",
    "PoissonGLMM",
    "ZINBWaVE",
    "parallel_config",
    "resampling_test",
    "store_contrast",
]
__version__ = "0.1.0.dev0"
