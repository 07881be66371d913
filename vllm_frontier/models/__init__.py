"""Models: the embedded trained default model, its torch reference and training, the tiny-model factory."""

from .embedded import VIEWS, embedded_model_path

__all__ = ["VIEWS", "embedded_model_path"]
