"""edgepack: turn a PyTorch model into verified, deployable artifacts for a named device class."""

from .spec import ModelSpec, load_spec

__all__ = ["ModelSpec", "load_spec"]
