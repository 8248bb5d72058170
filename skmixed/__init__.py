"""skmixed: scikit-learn-compatible mixed and latent-variable models for count data."""

from .mixed import PoissonGLMM

__all__ = ["PoissonGLMM"]
__version__ = "0.1.0.dev0"
