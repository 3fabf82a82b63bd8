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


# CPU flags (/proc/cpuinfo "flags" on x86, "Features" on arm64 where asimddp = dotprod) that decide
# which int8 kernels run; a target profile's device.int8_isa names the same words.
INT8_ISA_FLAGS = {"avx2": "avx2", "avx512_vnni": "avx512_vnni", "avx_vnni": "avx_vnni", "amx_int8": "amx_int8",
                  "asimddp": "dotprod", "i8mm": "i8mm"}


def host_info() -> dict[str, Any]:
    cpu, flags, named = platform.processor() or "", set(), False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not named:
                cpu, named = value.strip(), True
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = sorted({word for flag, word in INT8_ISA_FLAGS.items() if flag in flags})
    return {"machine": platform.machine(), "system": platform.system(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "int8_isa": isa}


def host_matches(device: Any, host: dict[str, Any]) -> dict[str, Any]:
    """Whether this build host is of the target's device class, for its latency figures: the same
    architecture, and the int8 instructions the profile names (when it names them)."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64-v8a", "arm64": "arm64-v8a"}.get(
        str(host.get("machine", "")).lower(), host.get("machine"))
    if arch != device.arch:
        return {"matches": False, "reason": f"host {host.get('machine')} is not a {device.arch} device: host "
                                            f"latency is not device latency"}
    wanted, have = set(device.int8_isa or ()), set(host.get("int8_isa") or ())
    missing, extra = sorted(wanted - have), sorted(have - wanted) if device.int8_isa is not None else []
    if missing or extra:
        return {"matches": False, "missing_int8_isa": missing, "extra_int8_isa": extra,
                "reason": f"host int8 instructions differ from the target's (missing {missing or 'none'}, "
                          f"extra {extra or 'none'}): int8 latency here is another CPU class's"}
    return {"matches": True, "reason": "same architecture" + (" and int8 instructions" if device.int8_isa else "")}
