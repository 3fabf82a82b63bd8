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


def test_host_matches_names_the_architecture_or_the_int8_instructions_that_differ():
    from edgepack.profile_sections import DeviceSpec
    from edgepack.provenance import host_matches

    def device(arch, isa=None):
        return DeviceSpec(arch=arch, cores=2, threads=2, peak_gops={"fp32": 10.0}, memory_gbps=10.0, ram_mb=1000,
                          int8_isa=isa)

    vnni_host = {"machine": "x86_64", "int8_isa": ["avx2", "avx512_vnni"]}
    assert host_matches(device("x86_64", ["avx2", "avx512_vnni"]), vnni_host)["matches"] is True
    assert host_matches(device("x86_64"), vnni_host)["matches"] is True  # the profile names no ISA
    avx2_only = host_matches(device("x86_64", ["avx2"]), vnni_host)
    assert avx2_only["matches"] is False and avx2_only["extra_int8_isa"] == ["avx512_vnni"]
    phone = host_matches(device("arm64-v8a", ["dotprod"]), vnni_host)
    assert phone["matches"] is False and "not device latency" in phone["reason"]
    assert host_matches(device("arm64-v8a"), {"machine": "aarch64", "int8_isa": []})["matches"] is True


def test_host_info_reads_the_int8_instructions_of_this_cpu():
    from pathlib import Path

    from edgepack.provenance import INT8_ISA_FLAGS, host_info

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            break
    assert host_info()["int8_isa"] == sorted({w for f, w in INT8_ISA_FLAGS.items() if f in flags})
