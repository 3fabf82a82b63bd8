"""Exporters, one per format. Add a format: one module here + its name below + a test."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

from .base import ArtifactConfig

# Module names under edgepack.export that define an exporter (CONFIG class and export()).
EXPORTER_MODULES: tuple[str, ...] = (
    "onnx",
    "executorch",
    "tflite",
)


@dataclass(frozen=True)
class ExporterEntry:
    format: str
    config: type[ArtifactConfig]
    module: ModuleType


@lru_cache(maxsize=1)
def registry() -> dict[str, ExporterEntry]:
    entries: dict[str, ExporterEntry] = {}
    for module_name in EXPORTER_MODULES:
        module = importlib.import_module(f"{__name__}.{module_name}")
        fmt = module.CONFIG.model_fields["format"].default
        if fmt in entries:
            raise RuntimeError(f"format {fmt!r} registered twice (export/{module_name}.py)")
        entries[fmt] = ExporterEntry(format=fmt, config=module.CONFIG, module=module)
    return entries


# Which runner module (edgepack.runtimes.<name>) runs each format.
RUNTIME_FOR_FORMAT: dict[str, str] = {"onnx": "onnxruntime", "pte": "executorch", "tflite": "litert"}

# What each format needs installed beyond the core, and the extra that brings it.
REQUIRES: dict[str, tuple[str, tuple[str, ...]]] = {
    "pte": ("executorch", ("executorch",)),
    "tflite": ("litert", ("litert_torch", "ai_edge_litert")),
}


def missing_for(formats: list[str]) -> dict[str, tuple[str, list[str]]]:
    """format -> (extra, packages not importable here), for the formats that cannot be built."""
    missing = {}
    for fmt in dict.fromkeys(formats):
        extra, packages = REQUIRES.get(fmt, ("", ()))
        absent = [p for p in packages if importlib.util.find_spec(p) is None]
        if absent:
            missing[fmt] = (extra, absent)
    return missing


def check_installed(profile: Any) -> None:
    """Fail before any work when a format the profile (a TargetProfile: its name and artifacts)
    asks for has no exporter installed here."""
    from ..errors import RuntimeUnavailable

    missing = missing_for([a.format for a in profile.artifacts])
    if missing:
        named = "; ".join(f".{fmt} needs {', '.join(pkgs)}" for fmt, (_, pkgs) in missing.items())
        extras = ",".join(dict.fromkeys(extra for extra, _ in missing.values()))
        raise RuntimeUnavailable(f"target {profile.name}: {named}, not installed here",
                                 f"pip install 'edgepack[{extras}]', or pick a target without those formats")
