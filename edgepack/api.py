"""edgepack from Python: the same builds, checks and reports as the command line.

    import edgepack

    result = edgepack.build("models/digits_cnn.py", "android-arm64")        # a spec file
    result = edgepack.build(model, "x86-64", example_inputs=(x,), calibration=samples)   # an nn.Module
    result.exit_code, result.passed, result.bundle_dir, result.manifest, result.warnings

    edgepack.validate(result.bundle_dir)      # re-run parity from the bundle alone
    edgepack.inspect(result.bundle_dir)       # the checked manifest
    edgepack.diagnose(spec, "android-arm64")  # per-layer int8 error of the target's recipe

A target is a shipped name, a path to a YAML profile, or a TargetProfile; keyword overrides are
laid over it key by key (``tolerances={"int8": {"min_cosine": 0.97}}``) and ``set=[...]`` takes
``key.path=value`` strings, as the CLI's --set does. Bad input raises an EdgepackError subclass
(its ``exit_code`` is the CLI's); a build that ran returns a BuildResult whose ``exit_code`` says
whether parity, budgets and exports held (0, 1 or 3), with the report written either way.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .cache import BuildCache
from .errors import ConfigError, EdgepackError, SpecError
from .pipeline import BuildOptions, BuildResult
from .pipeline import build as _build
from .spec import ModelSpec, check_spec, load_spec
from .target import load_target, merge, parse_profile


def _spec(spec_or_model: Any, *, example_inputs, calibration, holdout, evaluate, name, input_names,
          output_names) -> ModelSpec:
    if isinstance(spec_or_model, ModelSpec):
        return spec_or_model
    if isinstance(spec_or_model, (str, Path)):
        return load_spec(str(spec_or_model))
    import torch

    if not isinstance(spec_or_model, torch.nn.Module):
        raise SpecError(f"build() takes a ModelSpec, a spec path or a torch.nn.Module, not "
                        f"{type(spec_or_model).__name__}", "pass one of those")
    if example_inputs is None or calibration is None:
        raise SpecError("build() with a bare nn.Module needs example_inputs= and calibration=",
                        "pass example_inputs=(tensor, ...) and calibration=[(tensor, ...), ...]")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    default_name = re.sub(r"[^A-Za-z0-9._-]+", "-", type(spec_or_model).__name__).strip("-").lower() or "model"
    spec = ModelSpec(name=name or default_name, model=spec_or_model, example_inputs=tuple(example_inputs),
                     calibration=calibration, holdout=holdout, evaluate=evaluate, input_names=input_names,
                     output_names=output_names, source=f"python: {type(spec_or_model).__qualname__}")
    check_spec(spec, spec.source)
    return spec


def _profile(target: Any, overrides: dict[str, Any], settings: Sequence[str] | None):
    if isinstance(target, (str, Path)):
        return load_target(target, settings=list(settings or []), overrides=overrides or None)
    if hasattr(target, "model_dump") and hasattr(target, "artifacts"):
        if not overrides and not settings:
            return target
        from .target import apply_settings

        data = apply_settings(merge(target.model_dump(mode="json"), overrides), list(settings or []),
                              f"python: {target.name}")
        profile = parse_profile(data, f"python: {target.name} with overrides")
        profile._source = f"python: TargetProfile {target.name!r} with overrides"
        return profile
    raise ConfigError(f"target must be a target name, a YAML path or a TargetProfile, not {type(target).__name__}",
                      "e.g. build(spec, 'android-arm64')")


def build(spec_or_model: Any, target: Any, out: str | Path = "dist", *, example_inputs: Any = None,
          calibration: Iterable | None = None, holdout: Iterable | None = None,
          evaluate: Callable | None = None, name: str | None = None, input_names: Sequence[str] | None = None,
          output_names: Sequence[str] | None = None, set: Sequence[str] | None = None,  # noqa: A002 (the CLI's word)
          keep_going: bool = False, check_reproducible: bool = True, write_zip: bool = True,
          progress: Callable[[str], None] | None = None, timeout_s: float = 300.0, cache: bool = True,
          jobs: int | None = None, **overrides: Any) -> BuildResult:
    """Build, validate and package ``spec_or_model`` for ``target`` into ``out``; see the module
    docstring. Returns the BuildResult (exit_code 0 passed, 1 parity/budget, 3 export/runtime)."""
    started = time.perf_counter()
    spec = _spec(spec_or_model, example_inputs=example_inputs, calibration=calibration, holdout=holdout,
                 evaluate=evaluate, name=name, input_names=input_names, output_names=output_names)
    spec_seconds = time.perf_counter() - started
    profile = _profile(target, overrides, set)
    options = BuildOptions(out_dir=Path(out), keep_going=keep_going, progress=progress,
                           runtime_timeout_s=timeout_s, check_reproducible=check_reproducible, write_zip=write_zip,
                           cache=BuildCache.from_env() if cache else None, spec_seconds=spec_seconds, jobs=jobs)
    return _build(spec, profile, options=options)


def validate(bundle: str | Path, *, artifact: str | None = None, threads: int | None = None,
             timeout_s: float = 300.0, gpu: bool = False, arm64: bool = False, cpus: Sequence[str] | None = None,
             executorch: bool = False):
    """Re-run parity from a bundle directory or zip alone (ValidationResult; .exit_code as the CLI).
    arm64: also the device kit under qemu-aarch64 per CPU model (`validate --arm64 --cpu ... --executorch`)."""
    from .steps.validate import Arm64Request, validate_bundle

    if (cpus or executorch) and not arm64:
        raise EdgepackError("cpus and executorch go with arm64=True", "pass arm64=True")
    request = Arm64Request(list(cpus) if cpus else None, executorch) if arm64 else None
    return validate_bundle(Path(bundle), artifact=artifact, threads=threads, timeout_s=timeout_s, gpu=gpu,
                           arm64=request)


def inspect(bundle: str | Path):
    """A bundle's manifest, after checking it and every file it lists."""
    from .intake import load_bundle_manifest
    from .steps.validate import verify_files

    manifest = load_bundle_manifest(Path(bundle))
    verify_files(Path(bundle), manifest)
    return manifest


def diagnose(spec_or_model: Any, target: Any, out: str | Path | None = None, *, samples: int = 8,
             example_inputs: Any = None, calibration: Iterable | None = None, **overrides: Any) -> dict:
    """Per-layer int8 error of the target's recipe on the model (writes diagnosis.json and .png)."""
    from .analysis.diagnose import run_diagnosis

    spec = _spec(spec_or_model, example_inputs=example_inputs, calibration=calibration, holdout=None,
                 evaluate=None, name=None, input_names=None, output_names=None)
    profile = _profile(target, overrides, None)
    out_dir = Path(out) if out is not None else Path("dist") / spec.name / f"{profile.name}.diagnosis"
    return run_diagnosis(spec, profile, out_dir, samples=samples)
