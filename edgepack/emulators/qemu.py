"""qemu-aarch64 (user mode): arm64 Linux programs run on an x86-64 build host, one CPU model at a
time, set up privately on first use.

    emulator = ensure(say=print)                      # qemu-user 10.x from bookworm-backports
    done = run(emulator.command("cortex-a76", "/sysroot", ["/sysroot/usr/bin/python3.11", ...]),
               env=..., timeout_s=600, what="device/validate.py on cortex-a76")

Why this package (measured on Debian 12.11, x86-64): qemu-user 10.0.2 from bookworm-backports is a
static-pie binary with no Depends, so only usr/bin/qemu-aarch64 (13.7 MB) is kept of its 63 MB
.deb and it runs on any x86-64 Linux. Debian 12's own qemu-user-static 7.2 dies in the runtimes'
CPU detection (validate.py on a .tflite: "uncaught target signal 11", exit 139, under
cortex-a76 and max) and passes the host's x86 /proc/cpuinfo through; 10.x synthesizes an arm64
/proc/cpuinfo from the emulated CPU model (Features, CPU part) and HWCAPs, which is what the
runtimes read to pick their kernels. So at least 10.0 is required.

Which kernel family ran is inferred from the features the guest sees (``kernel_family``): a
TCG plugin that counts executed instructions by encoding confirmed it for XNNPACK, LiteRT and
onnxruntime on cortex-a53 / a76 / a710 / max (README, "arm64 kernels on the build host").
Emulated time is not device time: TCG translates every guest instruction, so seconds measured
here say nothing about a phone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EmulatorUnavailable, RuntimeCheckError
from . import debian

RECIPE = debian.Recipe(
    name="qemu-user",
    architecture="amd64",
    suites=(debian.Suite("bookworm-backports", priority=100),),
    roots=(debian.Want("qemu-user", suite="bookworm-backports", min_version="1:10.0",
                       keep=(r"^(\./)?usr/bin/qemu-aarch64$",)),),
    host_codenames=None,  # a static binary: any x86-64 Linux
)
MIN_VERSION = (10, 0)
# -cpu models of qemu 10's aarch64 user mode (``qemu-aarch64 -cpu help``)
CPU_MODELS = ("a64fx", "cortex-a35", "cortex-a53", "cortex-a55", "cortex-a57", "cortex-a72", "cortex-a76",
              "cortex-a710", "max", "neoverse-n1", "neoverse-n2", "neoverse-v1")
# Repeatable runs (instruction counts): fixed random bytes (AT_RANDOM, getrandom) and guest
# mappings placed by qemu in its own reserved range, so they no longer depend on the order of
# qemu's host mmaps (its RCU thread's stack raced with the guest's first mmap; `setarch -R`
# alone did not fix it, -R did: 12 of 12 runs gave the same count). The range is 64 TiB (of host
# address space, reserved PROT_NONE: no memory): qemu 10 aborts (page_find_range_empty: Assertion
# `min <= max') when a guest's mmap hint lies above the reserved range, and ExecuTorch's aarch64
# runtime reserves 1 GiB at a hint of about 2 TiB (`mmap(0x20a2c000000, 1 GiB, ..., MAP_NORESERVE)`,
# seen with qemu's -strace); under the former 128 GiB range counting a .pte aborted every time.
DETERMINISTIC_FLAGS = ("-seed", "1", "-R", "0x400000000000")
NOT_DEVICE_TIME = ("emulated: qemu-aarch64 (TCG) translating arm64 code on the build host's x86-64 CPU; "
                   "not device time")
STATE = "qemu.json"


@dataclass
class Qemu:
    binary: Path
    version: str  # "qemu-aarch64 version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"
    package: dict = field(default_factory=dict)  # package, version, suite, url, sha256

    def command(self, cpu: str, sysroot: Path, argv: list[str], deterministic: bool = False,
                extra: tuple[str, ...] = (), binary: Path | None = None) -> list[str]:
        """argv (a guest program and its arguments) under ``-cpu cpu`` with the sysroot as the
        guest's root for absolute paths it has (-L); ``binary``: another qemu-aarch64 (the
        plugin-enabled one that counts instructions)."""
        if cpu not in CPU_MODELS:
            raise EmulatorUnavailable(f"qemu-aarch64 has no CPU model {cpu!r}", f"use one of {', '.join(CPU_MODELS)}")
        flags = DETERMINISTIC_FLAGS if deterministic else ()
        return [str(binary or self.binary), "-cpu", cpu, "-L", str(sysroot), *flags, *extra, *argv]

    def describe(self) -> dict:
        return {"emulator": self.version, "package": f"{self.package.get('package')} {self.package.get('version')}",
                "suite": self.package.get("suite"), "sha256": self.package.get("sha256"), "time": NOT_DEVICE_TIME}


def state_directory() -> Path:
    return debian.cache_root() / "arm64"


def parse_version(text: str) -> tuple[int, int]:
    match = re.search(r"version (\d+)\.(\d+)", text)
    if not match:
        raise EmulatorUnavailable(f"cannot read qemu's version from {text[:200]!r}", "report this with the message")
    return int(match.group(1)), int(match.group(2))


def ensure(say: Callable[[str], None] | None = None) -> Qemu:
    """qemu-aarch64 ready to use (fetched on first use, ~63 MB downloaded, 13.7 MB kept); raises
    EmulatorUnavailable (exit 2, with a hint) when it cannot be: host not Linux x86-64, download
    refused, gpgv missing, a version older than 10.0."""
    fetched = debian.fetch(RECIPE, say)
    binary = fetched.root / "usr/bin/qemu-aarch64"
    package = next(p for p in fetched.packages if p["package"] == "qemu-user")
    key = hashlib.sha256(package["sha256"].encode()).hexdigest()
    state_file = state_directory() / STATE
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("key") == key and state.get("binary") == str(binary) and binary.is_file():
        return Qemu(binary, state["version"], {k: package[k] for k in ("package", "version", "suite", "url", "sha256")})
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorUnavailable(f"{binary} does not run here: {exc}",
                                  "qemu-user's binary is static x86-64: the host must be Linux x86-64") from None
    version = (done.stdout.strip().splitlines() or [""])[0]
    if parse_version(version) < MIN_VERSION:
        raise EmulatorUnavailable(f"{version}: older than {'.'.join(map(str, MIN_VERSION))}, whose arm64 /proc/cpuinfo "
                                  f"the runtimes need (7.2 crashes in their CPU detection)",
                                  "the archive moved on; update edgepack, or report this with the message")
    if say:
        say(f"qemu: {version}")
    try:
        state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_file.with_name(f".{STATE}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "binary": str(binary), "version": version}, indent=2))
        os.replace(tmp, state_file)
    except OSError as exc:
        raise debian.CacheUnwritable(f"cannot write {state_file.parent}: {exc.strerror or exc}",
                                     "set EDGEPACK_CACHE to a writable directory") from None
    return Qemu(binary, version, {k: package[k] for k in ("package", "version", "suite", "url", "sha256")})


# --- which kernels a CPU model gets -----------------------------------------------------------

# (feature the guest's /proc/cpuinfo lists, kernel family), first match wins
_INT8_FAMILIES = (("sme", "SME (SMOPA outer products)"), ("i8mm", "SMMLA (i8mm matrix multiply)"),
                  ("asimddp", "SDOT (dot product)"), ("asimd", "NEON SMLAL/SMULL (widening multiply-accumulate)"))
_FLOAT_FAMILIES = (("sme", "SME (FMOPA outer products)"), ("asimd", "NEON FMLA"))
FAMILY_EVIDENCE = ("inferred from the CPU features the guest sees (/proc/cpuinfo): sme -> SME, i8mm -> SMMLA, "
                   "asimddp -> SDOT, else NEON SMLAL; confirmed once by counting executed instructions by "
                   "encoding (XNNPACK, LiteRT, onnxruntime on cortex-a53/a76/a710/max; README)")


def kernel_family(features: list[str], precision: str) -> dict:
    """The kernel family an arm64 runtime picks for ``precision`` given the CPU features (inferred:
    the runtimes do not say which kernel they run)."""
    table = _INT8_FAMILIES if precision.startswith("int") else _FLOAT_FAMILIES
    present = set(features)
    flag, family = next(((f, name) for f, name in table if f in present), (None, "unknown (no Advanced SIMD)"))
    return {"family": family, "from_feature": flag, "inferred": True}


# --- running a guest program ----------------------------------------------------------------

@dataclass
class GuestRun:
    returncode: int
    stdout: str
    stderr: str
    seconds: float  # wall time on the build host: emulated, not device time


def run(command: list[str], *, env: dict[str, str], timeout_s: float, what: str, cwd: Path | None = None) -> GuestRun:
    """Run a guest command in a child process (its own process group, so a hang is killed whole).
    A timeout raises RuntimeCheckError naming ``what``; the exit status is the caller's to judge
    (``ended_by`` describes a signal)."""
    started = time.perf_counter()
    try:
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, errors="replace", start_new_session=True)
    except OSError as exc:
        raise EmulatorUnavailable(f"cannot start qemu-aarch64 for {what}: {exc}",
                                  "run `edgepack arm64-setup` again (the cached emulator may be damaged)") from None
    try:
        stdout, stderr = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill(process)
        process.communicate()
        raise RuntimeCheckError(f"{what}: no answer within {timeout_s:g} s under emulation; stopped",
                                "a hang in the runtime, or a host too busy: raise arm64_check.timeout_s") from None
    except BaseException:
        _kill(process)
        raise
    return GuestRun(process.returncode, stdout, stderr, round(time.perf_counter() - started, 2))


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def ended_by(returncode: int) -> str:
    """'exit 3', or 'signal 11 (SIGSEGV)' when the guest (and so qemu) was killed by one."""
    if returncode >= 0:
        return f"exit {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = "unknown"
    return f"signal {-returncode} ({name})"
