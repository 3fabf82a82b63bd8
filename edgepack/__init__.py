"""edgepack: turn a PyTorch model into verified, deployable artifacts for a named device class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ModelSpec", "load_spec"]

if TYPE_CHECKING:
    from .spec import ModelSpec, load_spec


def __getattr__(name: str) -> Any:
    # Lazy: `edgepack validate`, `targets` and runtime workers must not pay for importing torch.
    if name in __all__:
        from . import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
