"""The arm64 guest: Debian's arm64 python3.11 sysroot and aarch64 wheels, set up by the product
itself in the user's cache, running real arm64 code under qemu-aarch64 per CPU model."""

from __future__ import annotations

import json
import os

import pytest

from edgepack.emulators import arm64_python, qemu
from edgepack.provenance import toolchain_versions

PROBE = ("import json, platform, numpy; from ai_edge_litert.interpreter import Interpreter; import onnxruntime; "
         "features = [l.split(':', 1)[1].split() for l in open('/proc/cpuinfo') if l.startswith('Features')][0]; "
         "print(json.dumps({'machine': platform.machine(), 'numpy': numpy.__version__, "
         "'onnxruntime': onnxruntime.__version__, 'features': features}))")


@pytest.fixture(scope="module")
def guest():
    """numpy, LiteRT and onnxruntime at this host's versions (first use: ~80 MB downloaded; the
    tests using it are marked slow, so `make test-fast` downloads nothing)."""
    runtimes = ("litert", "onnxruntime")
    return arm64_python.ensure(arm64_python.runtime_pins(toolchain_versions(), runtimes), runtimes)


def _run(guest, cpu: str, *argv: str):
    return qemu.run(guest.command(cpu, list(argv)), env=guest.environment(), timeout_s=300, what=f"probe on {cpu}")


@pytest.mark.slow
@pytest.mark.parametrize("cpu,has,lacks", [("cortex-a53", [], ["asimddp", "i8mm"]),
                                           ("cortex-a76", ["asimddp"], ["i8mm"]),
                                           ("cortex-a710", ["asimddp", "i8mm", "sve2"], ["sme"])])
def test_the_guest_runs_arm64_python_with_the_runtimes_and_the_cpu_models_features(guest, cpu, has, lacks):
    done = _run(guest, cpu, "-c", PROBE)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout)
    assert seen["machine"] == "aarch64"
    versions = toolchain_versions()
    assert seen["numpy"] == versions["numpy"] and seen["onnxruntime"] == versions["onnxruntime"]
    assert set(has) <= set(seen["features"]) and not set(lacks) & set(seen["features"])


@pytest.mark.slow
def test_the_sysroot_has_no_link_to_the_host(guest):
    """Every absolute symlink of the 39 packages was made relative inside the sysroot."""
    absolute = [p for p in guest.sysroot.rglob("*") if p.is_symlink() and os.readlink(p).startswith("/")]
    assert not absolute
    link = guest.sysroot / "usr/lib/python3.11/sitecustomize.py"
    assert os.readlink(link) == "../../../etc/python3.11/sitecustomize.py" and link.resolve().is_relative_to(guest.sysroot)
    names = {p["package"] for p in guest.packages}
    assert {"python3.11", "libstdc++6", "libc6"} <= names and len(names) < 60
    assert not any((guest.sysroot / "usr/share/doc").glob("*"))  # documentation is not kept


@pytest.mark.slow
def test_a_guest_crash_is_a_signal_not_a_hang(guest):
    done = _run(guest, "cortex-a53", "-c", "import ctypes; ctypes.string_at(0)")
    assert done.returncode < 0 and qemu.ended_by(done.returncode).startswith("signal 11")


# What ExecuTorch's aarch64 runtime does when it loads a .pte: reserve 1 GiB at a hint of ~2 TiB.
# Under the instruction counter's repeatable flags (-R: guest mappings in qemu's reserved range)
# qemu 10 aborts on a hint above that range (page_find_range_empty: Assertion `min <= max').
HINTED_MMAP = ("import ctypes; libc = ctypes.CDLL(None); libc.mmap.restype = ctypes.c_void_p; "
               "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, "
               "ctypes.c_long]; p = libc.mmap(0x20a2c000000, 1 << 30, 3, 0x22 | 0x4000, -1, 0); "
               "print('mapped' if p not in (None, ctypes.c_void_p(-1).value) else 'refused')")


@pytest.mark.slow
def test_a_hinted_mapping_above_128_gib_runs_under_the_repeatable_flags(guest):
    done = qemu.run(guest.command("cortex-a76", ["-c", HINTED_MMAP], deterministic=True), env=guest.environment(),
                    timeout_s=300, what="hinted mmap")
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "mapped"


@pytest.mark.slow
def test_pins_come_from_the_bundle_toolchain(guest):
    pins = arm64_python.runtime_pins({"numpy": "2.4.6", "ai-edge-litert": "2.3.0", "torch": "2.13.0+cpu",
                                      "executorch": "1.5.1"}, ("litert", "executorch"))
    assert pins == {"numpy": "2.4.6", "ai-edge-litert": "2.3.0", "torch": "2.13.0", "executorch": "1.5.1"}
    assert "ai-edge-litert==" + toolchain_versions()["ai-edge-litert"] in guest.pins
    assert guest.describe()["python"].startswith("Debian bookworm arm64 python3.11 3.11.")


def test_requirements_are_pinned_to_the_host_unless_the_wheel_pins_them():
    from packaging.requirements import Requirement

    assert arm64_python._pin(Requirement("nvidia-cudnn-cu13==9.20.0.48")) == "nvidia-cudnn-cu13==9.20.0.48"
    numpy = toolchain_versions()["numpy"]
    assert arm64_python._pin(Requirement("numpy>=1.21")) == f"numpy=={numpy}"
    assert arm64_python._pin(Requirement("numpy<1")) == "numpy<1"  # the host's does not satisfy it
    assert arm64_python._pin(Requirement("no-such-package-here>=2")) == "no-such-package-here>=2"
    marker = Requirement('coremltools==9.0; platform_system == "Linux" and platform_machine == "x86_64"').marker
    assert not marker.evaluate(arm64_python.GUEST_MARKERS)  # host pip would say yes on this x86-64 host
