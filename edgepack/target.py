"""TargetProfile: one YAML per device class, validated strictly when it loads.

A profile names the device, the ordered compression stages, the artifacts to produce
(format + precision + recipe), parity tolerances per precision and optional budgets.
Unknown keys, wrong types and out-of-range values are errors naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, field_validator, model_validator

from .compress import registry as stage_registry
from .errors import ConfigError
from .export import registry as export_registry
from .profile_sections import (  # noqa: F401 (re-exported: the profile's sections are part of its API)
    DEFAULT_FP32_TOLERANCE, GPU_CHECK_PRECISIONS, PRECISIONS, Arm64CheckSettings, Budgets, CpuSpec, DeviceSpec,
    FallbackSettings, GpuCheckSettings, LatencySettings, ParitySettings, Precision, Tolerance, VNNI_ISA, _Strict)

PROFILE_SCHEMA_VERSION = 1
MAX_ERROR_LINES = 20  # a profile error lists at most this many problems
MAX_EXTENDS = 8  # profiles extending profiles, at most this deep
SCHEMA_PATH = Path(__file__).parent / "schema" / "profile.schema.json"
def _stage_union():
    configs = tuple(entry.config for entry in stage_registry().values())
    return Annotated[Union[configs], Field(discriminator="type")]  # type: ignore[valid-type]


def _artifact_union():
    configs = tuple(entry.config for entry in export_registry().values())
    return Annotated[Union[configs], Field(discriminator="format")]  # type: ignore[valid-type]


@lru_cache(maxsize=1)
def profile_model() -> type[BaseModel]:
    """Build the TargetProfile model from the registered stages and exporters."""
    stage_t = _stage_union()
    artifact_t = _artifact_union()

    class TargetProfile(_Strict):
        _source: str = PrivateAttr(default="")  # where it was loaded from, for the manifest
        schema_version: Literal[1] = PROFILE_SCHEMA_VERSION
        name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
        description: str = ""
        device: DeviceSpec
        stages: list[stage_t] = Field(default_factory=list)  # type: ignore[valid-type]
        artifacts: list[artifact_t] = Field(min_length=1)  # type: ignore[valid-type]
        tolerances: dict[Precision, Tolerance]
        budgets: Budgets = Budgets()
        parity: ParitySettings = ParitySettings()
        latency: LatencySettings = LatencySettings()
        # What to do when a quantized artifact is not faster than its float sibling on the build
        # host (both measured in the same build): fail the build, warn, or ship the float one.
        slower_than_float: Literal["fail", "warn", "keep_float"] = "warn"
        # What to do when an int8 artifact fails parity: fail the build, or keep the layers the
        # diagnosis ranks most harmful in fp32, a group per step, re-exporting and re-validating
        # until parity passes or `fallback`'s limits or `budgets` would be exceeded.
        on_parity_failure: Literal["fail", "fallback"] = "fail"
        # A static int8 artifact still failing parity: fail, or judge it as int8-dynamic by the int8
        # thresholds and ship that, with a warning, if it passes (steps/judge.py).
        on_static_int8_failure: Literal["fail", "dynamic"] = "fail"
        # What to do when a quantized artifact's recipe finds nothing to quantize in the model (an
        # FFT-only model): fail the build, or ship the fp32 artifact of that format with a warning.
        unquantizable: Literal["fail", "keep_float"] = "fail"
        fallback: FallbackSettings = FallbackSettings()
        gpu_check: GpuCheckSettings = GpuCheckSettings()
        arm64_check: Arm64CheckSettings = Arm64CheckSettings()

        @field_validator("artifacts")
        @classmethod
        def _unique_files(cls, artifacts: list) -> list:
            names = [a.file_name for a in artifacts]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"two artifacts write the same file {dupes}; give them distinct 'name's")
            return artifacts

        @model_validator(mode="before")
        @classmethod
        def _weight_bits_follow_the_cpu_class(cls, data: Any) -> Any:
            """An int8 artifact that takes reduce_range and does not set it gets the device's:
            7-bit weights on an x86 class without VNNI (int8_isa given, no avx512_vnni/avx_vnni/
            amx_int8), 8-bit with VNNI. The recipe follows the profile, never the build host."""
            device = data.get("device") if isinstance(data, dict) else None
            isa = device.get("int8_isa") if isinstance(device, dict) else None
            if not isinstance(isa, list) or not isinstance(data.get("artifacts"), list):
                return data
            has_vnni = any(isinstance(word, str) and word in VNNI_ISA for word in isa)  # bad words: field error
            configs = {fmt: entry.config for fmt, entry in export_registry().items()}
            artifacts = []
            for artifact in data["artifacts"]:
                fmt = artifact.get("format") if isinstance(artifact, dict) else None
                config = configs.get(fmt) if isinstance(fmt, str) else None  # anything else: a field error
                if (config is not None and "reduce_range" in config.model_fields and "reduce_range" not in artifact
                        and artifact.get("precision") in ("int8", "int8-dynamic")):
                    artifact = {**artifact, "reduce_range": not has_vnni}
                artifacts.append(artifact)
            return {**data, "artifacts": artifacts}

        @model_validator(mode="after")
        def _tolerance_per_precision(self):
            missing = sorted({a.precision for a in self.artifacts} - set(self.tolerances))
            if missing:
                raise ValueError(f"tolerances has no entry for precision(s) {missing} used by artifacts")
            return self

        @model_validator(mode="after")
        def _gpu_check_has_work(self):
            if self.gpu_check.enabled:
                checked = [a for a in self.artifacts if a.format == "tflite" and a.precision in GPU_CHECK_PRECISIONS]
                if not checked:
                    raise ValueError("gpu_check runs .tflite artifacts of precision fp16 or fp32; the profile has none")
                for key in sorted({self.gpu_check.tolerance_key(a.precision) for a in checked}):
                    if key not in self.tolerances:
                        raise ValueError(f"gpu_check: tolerances has no entry {key!r} to judge it")
            return self

        @model_validator(mode="after")
        def _qat_last(self):
            types = [stage.type for stage in self.stages]
            if "qat" in types[:-1]:
                raise ValueError("stages: qat must be the last stage (a later stage would change the weights "
                                 "the quantization-aware graph was trained with)")
            return self

        @model_validator(mode="after")
        def _keep_float_needs_sibling(self):
            if self.slower_than_float == "keep_float":
                floats = {a.format for a in self.artifacts if a.precision == "fp32"}
                lonely = sorted({a.file_name for a in self.artifacts if a.precision != "fp32" and a.format not in floats})
                if lonely:
                    raise ValueError(f"slower_than_float: keep_float needs an fp32 artifact of the same format "
                                     f"for {lonely}; add one or use warn/fail")
            return self

        def tolerance_for(self, precision: str) -> Tolerance:
            if precision == "fp32" and "fp32" not in self.tolerances:
                return Tolerance(**DEFAULT_FP32_TOLERANCE)
            return self.tolerances[precision]

        def sha256(self) -> str:
            return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    return TargetProfile


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def targets_dir() -> Path:  # EDGEPACK_TARGETS_DIR, a checkout's targets/, or pip's <prefix>/share/edgepack/targets
    env, checkout = os.environ.get("EDGEPACK_TARGETS_DIR"), Path(__file__).resolve().parent.parent / "targets"
    return Path(env) if env else checkout if checkout.is_dir() else Path(sys.prefix) / "share/edgepack/targets"


def known_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.yaml"))  # a missing folder globs to nothing


def _loc(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _format_validation_error(source: str, exc: ValidationError) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.endswith("Config") or x in ("function-after",)))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not part of the profile schema)"
        elif err["type"] == "union_tag_invalid":
            ctx = err.get("ctx", {})
            kind = "format" if ctx.get("discriminator") == "'format'" else "stage type"
            tag = ctx.get("tag")
            known = ctx.get("expected_tags")
            msg = f"{kind} {tag!r} is not available in this install (known: {known})"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{source}: {_loc(loc)}: {msg}")
    first, rest = lines[0], lines[1:MAX_ERROR_LINES]
    message = first + "".join(f"\n  {line}" for line in rest)
    if len(lines) > MAX_ERROR_LINES:
        message += f"\n  ... and {len(lines) - MAX_ERROR_LINES} more"
    return ConfigError(message, "fix the profile or the --set value; `edgepack targets show NAME` prints a valid one")


def parse_profile(data: Any, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a YAML mapping, got {type(data).__name__}",
                          "start from one of the shipped profiles in targets/")
    try:
        return profile_model().model_validate(data)
    except ValidationError as exc:
        raise _format_validation_error(source, exc) from None


class _ProfileLoader(yaml.SafeLoader):
    """yaml.safe_load, except that dates stay strings: a profile has no date fields, and an
    impossible date such as ``2024-13-45`` would otherwise escape as a bare ValueError."""


_ProfileLoader.add_constructor("tag:yaml.org,2002:timestamp", _ProfileLoader.construct_yaml_str)


def _profile_path(ref: str, relative_to: Path | None = None) -> Path:
    """A profile by name (targets/<name>.yaml) or by path (relative to the extending file)."""
    path = Path(ref)
    if relative_to is not None and not path.is_absolute() and ref.endswith((".yaml", ".yml")):
        path = relative_to / path
    if not (ref.endswith((".yaml", ".yml")) or os.sep in ref or path.is_file()):
        path = targets_dir() / f"{ref}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown target {ref!r}; known targets: {', '.join(known_targets()) or '(none)'}",
                              "pass one of the known names or a path to your own YAML profile")
    if not path.is_file():
        raise ConfigError(f"{ref}: profile file not found", "pass an existing YAML file or a known target name")
    return path


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc}", "check the file's permissions and encoding") from exc
    try:
        return yaml.load(text, Loader=_ProfileLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: invalid YAML: {problem}", "fix the YAML syntax at that line and column") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply", "a profile is a few levels deep; "
                          "check the file is the profile you meant") from None
    except ValueError as exc:  # a scalar PyYAML recognises but cannot build
        raise ConfigError(f"{path}: invalid YAML: {exc}", "fix or quote that value") from None


def merge(base: dict, changes: dict) -> dict:
    """``changes`` laid over ``base``: mappings merge key by key, anything else (lists too) replaces."""
    merged = dict(base)
    for key, value in changes.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _resolved_data(path: Path, chain: tuple[Path, ...] = ()) -> Any:
    """The profile's YAML with ``extends: <target or path>`` resolved (the base first, this file's
    keys over it; at most MAX_EXTENDS deep, no cycles)."""
    data = _read_yaml(path)
    if not isinstance(data, dict) or "extends" not in data:
        return data
    parent_ref = data.pop("extends")
    if not isinstance(parent_ref, str):
        raise ConfigError(f"{path}: extends: give a target name or a YAML path, got {parent_ref!r}",
                          "e.g. extends: android-arm64")
    parent = _profile_path(parent_ref, path.parent)
    if parent.resolve() in chain or len(chain) >= MAX_EXTENDS:
        raise ConfigError(f"{path}: extends {parent_ref!r} goes round in a circle or deeper than {MAX_EXTENDS}",
                          "extend a shipped profile, which extends nothing")
    base = _resolved_data(parent, chain + (path.resolve(),))
    if not isinstance(base, dict):
        raise ConfigError(f"{parent}: not a profile mapping (extended by {path})", "extend a valid profile")
    return merge(base, data)


def apply_settings(data: dict, settings: list[str], source: str) -> dict:
    """``key.path=value`` assignments (``--set``) on raw profile data; the value is read as YAML
    (``0.97``, ``true``, ``[a, b]``) and a number in the path indexes a list (``artifacts.0.precision``)."""
    data = json.loads(json.dumps(data))  # a deep copy
    for setting in settings:
        key, sep, raw = setting.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {setting!r}: expected key.path=value", "e.g. --set tolerances.int8.min_cosine=0.97")
        try:
            value = yaml.load(raw, Loader=_ProfileLoader)
        except yaml.YAMLError:
            value = raw
        node: Any = data
        parts = key.split(".")
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"{source}: --set {key}: {part!r} is not an index of a list of {len(node)}",
                                      "use a number below the list's length")
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise ConfigError(f"{source}: --set {key}: {'.'.join(parts[:index])} is not a mapping or list",
                                  "set a key inside a section, e.g. budgets.max_bytes=5000000")
    return data


def load_target(ref: str | os.PathLike, settings: list[str] | None = None, overrides: dict | None = None):
    """Load a profile by name (targets/<name>.yaml) or by path to a YAML file, resolving
    ``extends:``, then laying ``overrides`` (a mapping merged key by key) and ``settings``
    (``key.path=value``) over it before it is validated."""
    path = _profile_path(str(ref))
    data, source = _resolved_data(path), str(path)
    if (overrides or settings) and isinstance(data, dict):
        data = apply_settings(merge(data, overrides or {}), list(settings or []), source)
        source += "".join(f" --set {s}" for s in settings or [])
    profile = parse_profile(data, str(path))
    profile._source = source
    return profile


def profile_json_schema() -> dict:
    """The profile's JSON Schema (SCHEMA_PATH, committed), for editors and for checking files."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "edgepack target profile",
            **profile_model().model_json_schema()}


def dump_profile(profile) -> str:
    return yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False)
