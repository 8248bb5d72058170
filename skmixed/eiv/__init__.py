"""GLM-EIV: the errors-in-variables GLM of Barry, Roeder and Katsevich (2024) for CRISPR screens."""

from ._simulate import make_glmeiv_data

__all__ = ["make_glmeiv_data"]
