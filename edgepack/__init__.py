"""edgepack: turn a PyTorch model into verified, deployable artifacts for a named device class.

    import edgepack
    result = edgepack.build("models/digits_cnn.py", "x86-64")     # or an nn.Module + example inputs
    print(result.exit_code, result.bundle_dir)
    edgepack.validate(result.bundle_dir); edgepack.inspect(result.bundle_dir)
    edgepack.diagnose("models/digits_cnn.py", "android-arm64")

See edgepack/api.py for every argument.

Layers (imports run downward only; tests/test_layers.py enforces it, function-local imports too):

    8 faces      cli.py (every command), tables.py (what they print), fuzz/, this package's API
    7 order      pipeline.py: build(), the order of steps, manifest assembly, atomic placement
    6 steps      steps/: judge one artifact (export, run, parity, budgets, fallback), the speed
                 comparison and its slower_than_float policy, the GPU check, validate, ingest
    5 analysis   analysis/: int8 diagnosis, ONNX QDQ profile, charts, the fallback search
    4 profile    target.py: TargetProfile, FallbackSettings, the one Budgets rule
    3 plug-ins   compress/* stages, export/* exporters: never import each other
    2 quant      quant/: the int8 recipe (one options block, the only config -> recipe mapping),
                 observers, quantizers, calibration, bias correction, emulation, weight-only
    1 contracts  spec.py, stage.py, export/base.py, bundle.py, intake.py (untrusted input), package.py,
                 runtimes/*, emulators/* (Debian packages fetched privately, the Vulkan probe, lavapipe)
    0 ground     errors.py, parity.py, measure.py, costmodel.py, modelstats.py, provenance.py
    apart        device/: the on-device kit (stdlib + numpy + a runtime), imports nothing of edgepack

A module may import from its own layer (without cycles) and from any layer below it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["ModelSpec", "load_spec", "build", "validate", "inspect", "diagnose", "load_target", "BuildResult",
           "EdgepackError", "__version__"]

if TYPE_CHECKING:
    from .api import build, diagnose, inspect, validate
    from .errors import EdgepackError
    from .pipeline import BuildResult
    from .spec import ModelSpec, load_spec
    from .target import load_target

_HOMES = {"ModelSpec": "spec", "load_spec": "spec", "build": "api", "validate": "api", "inspect": "api",
          "diagnose": "api", "load_target": "target", "BuildResult": "pipeline", "EdgepackError": "errors"}


def __getattr__(name: str) -> Any:
    # Lazy: `edgepack validate`, `targets` and runtime workers must not pay for importing torch.
    if name == "__version__":
        from .provenance import edgepack_version

        return edgepack_version()
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'edgepack' has no attribute {name!r}")
