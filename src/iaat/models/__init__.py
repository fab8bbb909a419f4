"""Models by registry name. Every model takes images in [0, 1]; normalisation is inside."""

from .registry import MODELS, build_model
from .normalize import Normalize, NormalizedModel
from .precision import float32_view

__all__ = ["MODELS", "build_model", "Normalize", "NormalizedModel", "float32_view"]
