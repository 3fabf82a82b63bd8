"""provenance.py: what built a bundle (edgepack and toolchain versions, the host)."""

from __future__ import annotations

import importlib.metadata
import os

from edgepack.provenance import edgepack_version, host_info, toolchain_versions


def test_versions_and_host():
    versions = toolchain_versions()
    assert versions["torch"] == importlib.metadata.version("torch") and versions["edgepack"] == edgepack_version()
    assert versions["python"].count(".") == 2
    host = host_info()
    assert host["cpu_count"] == os.cpu_count() and host["machine"] and host["system"] == "Linux"
    assert host["cpu"]  # read from /proc/cpuinfo on Linux
