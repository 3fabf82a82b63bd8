"""qemu-aarch64 set up by the product itself (bookworm-backports, in the user's cache), the kernel
family a CPU model's features select, and the errors a user sees when it cannot run."""

from __future__ import annotations

import time

import pytest

from conftest import run_cli
from edgepack.emulators import debian, qemu
from edgepack.emulators.debian import UnsupportedHost
from edgepack.errors import EmulatorUnavailable, RuntimeCheckError

UNREACHABLE = "http://127.0.0.1:9"
FEATURES = {  # /proc/cpuinfo "Features" qemu 10 synthesizes per model (measured on the build host)
    "cortex-a53": "fp asimd aes pmull sha1 sha2 crc32 cpuid",
    "cortex-a76": "fp asimd aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp",
    "cortex-a710": "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma lrcpc "
                   "dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp "
                   "sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svebf16 i8mm bf16 dgh bti mte",
    "max": "fp asimd aes pmull sha1 sha2 crc32 atomics asimddp i8mm sve sve2 sme smei8i32 smef32f32",
}


@pytest.mark.slow  # first use in a cache downloads ~63 MB
def test_ensure_sets_up_once_then_reads_the_cache(monkeypatch):
    emulator = qemu.ensure()  # first use in this cache: ~63 MB downloaded, 13.7 MB kept
    assert qemu.parse_version(emulator.version) >= (10, 0) and emulator.binary.is_file()
    assert emulator.package["package"] == "qemu-user" and emulator.package["suite"] == "bookworm-backports"
    assert emulator.binary.stat().st_size < 20_000_000  # one emulator of the package's 360 MB
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", UNREACHABLE)  # the second call must not need the network
    started = time.perf_counter()
    again = qemu.ensure(say=pytest.fail)
    assert time.perf_counter() - started < 2.0 and again.version == emulator.version
    described = emulator.describe()
    assert described["emulator"].startswith("qemu-aarch64 version 10.") and "not device time" in described["time"]


@pytest.mark.parametrize("cpu,int8,fp32", [
    ("cortex-a53", "NEON SMLAL/SMULL (widening multiply-accumulate)", "NEON FMLA"),
    ("cortex-a76", "SDOT (dot product)", "NEON FMLA"),
    ("cortex-a710", "SMMLA (i8mm matrix multiply)", "NEON FMLA"),
    ("max", "SME (SMOPA outer products)", "SME (FMOPA outer products)"),
])
def test_the_kernel_family_follows_the_cpu_features(cpu, int8, fp32):
    features = FEATURES[cpu].split()
    found = qemu.kernel_family(features, "int8")
    assert found["family"] == int8 and found["inferred"] is True and found["from_feature"] in features
    assert qemu.kernel_family(features, "fp32")["family"] == fp32
    assert qemu.kernel_family([], "int8")["family"].startswith("unknown")


def test_the_command_pins_the_cpu_model_and_repeatable_runs():
    emulator = qemu.Qemu(binary=qemu.Path("/q/qemu-aarch64"), version="qemu-aarch64 version 10.0.2")
    command = emulator.command("cortex-a76", qemu.Path("/root"), ["/root/usr/bin/python3.11", "-c", "pass"],
                               deterministic=True)
    assert command == ["/q/qemu-aarch64", "-cpu", "cortex-a76", "-L", "/root", "-seed", "1", "-R", "0x400000000000",
                       "/root/usr/bin/python3.11", "-c", "pass"]
    with pytest.raises(EmulatorUnavailable, match="no CPU model 'cortex-a99'"):
        emulator.command("cortex-a99", qemu.Path("/root"), [])


def test_a_hang_is_stopped_and_named():
    started = time.perf_counter()
    with pytest.raises(RuntimeCheckError, match=r"model.tflite on cortex-a53: no answer within 0.5 s") as info:
        qemu.run(["sleep", "30"], env={"PATH": "/usr/bin:/bin"}, timeout_s=0.5, what="model.tflite on cortex-a53")
    assert time.perf_counter() - started < 10 and "timeout_s" in info.value.hint
    assert qemu.ended_by(-11) == "signal 11 (SIGSEGV)" and qemu.ended_by(3) == "exit 3"


def test_a_host_that_is_not_linux_x86_64_is_refused_before_any_download(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path))
    monkeypatch.setattr(debian.platform, "machine", lambda: "aarch64")
    with pytest.raises(UnsupportedHost, match="qemu-user: needs Linux on x86_64; this host is Linux on aarch64"):
        qemu.ensure()
    monkeypatch.setattr(debian.platform, "system", lambda: "Darwin")
    with pytest.raises(UnsupportedHost, match="this host is Darwin"):
        qemu.ensure()
    assert not (tmp_path / "debian").exists()


def test_a_refused_download_fails_arm64_setup_with_a_hint_and_exit_code_2(tmp_path):
    proc = run_cli("arm64-setup", env={"EDGEPACK_CACHE": str(tmp_path), "EDGEPACK_DEBIAN_MIRROR": UNREACHABLE},
                   timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"emulator unavailable: cannot download {UNREACHABLE}/debian/dists/bookworm-backports/InRelease" in proc.stderr
    assert "EDGEPACK_DEBIAN_MIRROR" in proc.stderr
    assert not (tmp_path / "debian" / "qemu-user").exists()
