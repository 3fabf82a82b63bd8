"""What built a bundle: edgepack's version, the toolchain's versions and the build host."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

TOOLCHAIN_PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao",
                      "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch-pruning")


def edgepack_version() -> str:
    try:
        return importlib.metadata.version("edgepack")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def toolchain_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "edgepack": edgepack_version()}
    for name in TOOLCHAIN_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "cpu": cpu, "cpu_count": os.cpu_count()}
