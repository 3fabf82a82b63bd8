"""An arm64 CPython 3.11 with numpy and the runtimes, run under qemu-aarch64: what the bundle's
device kit (device/validate.py) needs to run on real arm64 code on the build host.

    guest = ensure({"numpy": "2.4.6", "ai-edge-litert": "2.3.0", "onnxruntime": "1.32.0"}, say=print)
    command = guest.command("cortex-a76", ["/bundle/device/validate.py", "--bundle", "/bundle", ...])
    done = qemu.run(command, env=guest.environment(), timeout_s=600, what="...")

Three parts, each set up once in <cache>/arm64 (EDGEPACK_CACHE, else ~/.cache/edgepack):

- qemu-aarch64 10.x (emulators/qemu.py);
- a sysroot: Debian bookworm's arm64 python3.11 and libstdc++6 (the manylinux wheels need the
  system's; python3.11 does not depend on it) with their whole dependency closure, libc6
  included: 39 packages, 16 MB of .deb, fetched and checked with emulators/debian.py. Absolute
  symlinks are made relative inside the root (sitecustomize.py -> /etc/python3.11/... would
  otherwise read the host's file). Python finds its stdlib from argv[0], so the guest runs
  ``<sysroot>/usr/bin/python3.11`` with ``qemu-aarch64 -L <sysroot>``;
- aarch64 wheels, downloaded with this host's pip (``--platform manylinux_2_17..2_36_aarch64``)
  and installed with ``pip --target`` into a site directory per set of pins. The pins are the
  bundle's toolchain (its manifest), so the emulated runtime is the build host's version; other
  requirements are resolved from the wheels' own metadata with markers evaluated for linux
  aarch64 (host pip would evaluate them for x86-64), pinned to this host's installed version
  where it has the package. numpy + ai-edge-litert + onnxruntime: 55 MB of wheels, 185 MB
  installed. ExecuTorch is opt-in (``executorch=True``): PyPI's only aarch64 torch is the CUDA
  build, whose libraries need the NVIDIA wheels just to import (2.7 GB of wheels, 4.2 GB
  installed; one emulated import took 52 s).

After installing, one emulated import compiles the guest's .pyc files (the first run of a
runtime otherwise pays about twice its time).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EmulatorUnavailable
from . import debian, qemu

SYSROOT = debian.Recipe(
    name="arm64-python",
    architecture="arm64",
    suites=debian.BOOKWORM,
    roots=(debian.Want("python3.11"), debian.Want("libstdc++6")),
    host_only=(),
    host_codenames=None,  # runs under qemu, whatever the host's distribution
    default_keep=(r"^(?!(\./)?usr/share/(doc|man|info|lintian|locale)/)",),  # all but documentation
    sysroot=True,
)
PLATFORMS = tuple(f"manylinux_2_{n}_aarch64" for n in range(17, 37)) + ("manylinux2014_aarch64", "linux_aarch64")
# Requirement markers are evaluated for the guest, not for this host.
GUEST_MARKERS = {"platform_machine": "aarch64", "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix",
                 "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython",
                 "implementation_version": "3.11.2", "platform_python_implementation": "CPython"}
RUNTIMES = {"litert": ("ai-edge-litert",), "onnxruntime": ("onnxruntime",), "executorch": ("torch", "executorch")}
# executorch declares its export tooling too (pandas, hydra-core, coremltools, scikit-learn...);
# loading and running a .pte imports only these (found by running the kit under emulation).
EXECUTORCH_RUNTIME_DEPS = ("numpy", "ruamel.yaml", "tabulate", "typing-extensions", "sympy", "mpmath", "packaging",
                           "flatbuffers")
WARM_UP = {"litert": "import ai_edge_litert.interpreter", "onnxruntime": "import onnxruntime",
           "executorch": "import torch, executorch.runtime, executorch.kernels.quantized"}
SETUP_TIMEOUT_S = 1800.0


@dataclass
class Arm64Python:
    emulator: qemu.Qemu
    sysroot: Path
    site: Path
    pins: list[str]  # name==version installed in site
    runtimes: tuple[str, ...]
    packages: list[dict] = field(default_factory=list)  # the sysroot's Debian packages

    @property
    def python(self) -> Path:
        return self.sysroot / "usr/bin/python3.11"

    def command(self, cpu: str, argv: list[str], deterministic: bool = False, extra: tuple[str, ...] = (),
                binary: Path | None = None) -> list[str]:
        return self.emulator.command(cpu, self.sysroot, [str(self.python), *argv], deterministic, extra, binary)

    def environment(self, **extra: str) -> dict[str, str]:
        """A clean guest environment: nothing of the host's Python or locale leaks in."""
        home = qemu.state_directory() / "home"
        home.mkdir(parents=True, exist_ok=True)
        return {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8", "TMPDIR": "/tmp",
                "PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0",
                "TF_CPP_MIN_LOG_LEVEL": "3", "GLOG_minloglevel": "2", **extra}

    def describe(self) -> dict:
        python = next((p["version"] for p in self.packages if p["package"] == "python3.11"), None)
        return {**self.emulator.describe(), "python": f"Debian bookworm arm64 python3.11 {python}",
                "sysroot_packages": len(self.packages), "wheels": self.pins}


def runtime_pins(toolchain: dict[str, str], runtimes: tuple[str, ...]) -> dict[str, str]:
    """name -> version for numpy and the runtimes' packages, from a manifest's toolchain (else
    this host's installed versions)."""
    names = ["numpy"] + [n for r in runtimes for n in RUNTIMES[r]]
    pins = {}
    for name in names:
        version = toolchain.get(name) or _host_version(name)
        if version is None:
            raise EmulatorUnavailable(f"no version of {name} to install for the arm64 guest",
                                      "the bundle's manifest records none and this host has none installed")
        pins[name] = version.split("+")[0]  # torch 2.13.0+cpu on the host; PyPI's aarch64 wheel is 2.13.0
    return pins


def ensure(pins: dict[str, str], runtimes: tuple[str, ...] = ("litert", "onnxruntime"),
           say: Callable[[str], None] | None = None) -> Arm64Python:
    """The guest Python with ``pins`` (name -> version) installed; set up on first use."""
    say = say or (lambda message: None)
    emulator = qemu.ensure(say)
    fetched = debian.fetch(SYSROOT, say)
    if not (fetched.root / "usr/bin/python3.11").is_file():
        raise EmulatorUnavailable("the arm64 sysroot has no usr/bin/python3.11", "report this with the message")
    site = _site(pins, say)
    guest = Arm64Python(emulator, fetched.root, site, json.loads((site / STAMP).read_text())["pins"], runtimes,
                        fetched.packages)
    warm = site / f".warm-{'-'.join(sorted(runtimes))}"
    if not warm.exists():
        code = "; ".join(["import numpy"] + [WARM_UP[r] for r in runtimes])
        say(f"arm64: first emulated import of {', '.join(runtimes)} (compiles the guest's .pyc files)")
        done = qemu.run(guest.command("cortex-a76", ["-c", code]), env=guest.environment(), timeout_s=SETUP_TIMEOUT_S,
                        what="importing the runtimes under emulation")
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise EmulatorUnavailable(f"the arm64 runtimes do not import under qemu ({qemu.ended_by(done.returncode)}): "
                                      f"{tail}", "report this with the message")
        warm.write_text(f"{done.seconds}\n")
    return guest


# --- wheels ----------------------------------------------------------------------------------

STAMP = ".edgepack-site.json"


def _site(pins: dict[str, str], say: Callable[[str], None]) -> Path:
    roots = sorted(f"{name}=={version}" for name, version in pins.items())
    key = hashlib.sha256(json.dumps([roots, PLATFORMS]).encode()).hexdigest()[:16]
    base = qemu.state_directory()
    site = base / f"site-{key}"
    if (site / STAMP).is_file():
        return site
    try:
        base.mkdir(parents=True, exist_ok=True)
        lock = open(base / f"site-{key}.lock", "w")
    except OSError as exc:
        raise debian.CacheUnwritable(f"cannot write edgepack's cache at {base}: {exc.strerror or exc}",
                                     "set EDGEPACK_CACHE to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (site / STAMP).is_file():
            return site
        wheels = base / "wheels"
        say(f"arm64: resolving aarch64 wheels for {' '.join(roots)}")
        resolved = resolve_wheels(roots, wheels, say)
        staging = Path(tempfile.mkdtemp(prefix=f".site-{key}.tmp-", dir=base))
        try:
            _pip(["install", "--no-index", "--no-deps", "--no-warn-conflicts", "--find-links", str(wheels),
                  "--target", str(staging), *_platform_args(), *resolved], say, "installing the aarch64 wheels")
            (staging / STAMP).write_text(json.dumps({"roots": roots, "pins": resolved}, indent=2))
            os.rename(staging, site)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return site


def _platform_args() -> list[str]:
    return ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311",
            *[a for p in PLATFORMS for a in ("--platform", p)]]


def _pip(args: list[str], say: Callable[[str], None], what: str) -> list[str]:
    """Host pip with ``args``; each file it downloads is a progress line. Returns its output lines."""
    command = [sys.executable, "-m", "pip", *args, "--progress-bar", "off", "--disable-pip-version-check"]
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   errors="replace")
    except OSError as exc:
        raise debian.ToolMissing(f"cannot run pip ({exc})", "install pip for this Python") from None
    lines = []
    for line in process.stdout:
        line = line.rstrip()
        lines.append(line)
        if line.lstrip().startswith(("Downloading ", "Saved ", "File was already downloaded")):
            say(f"arm64: {line.strip()}")
    if process.wait() != 0:
        tail = [l for l in lines if l.strip()][-3:]
        raise debian.DownloadRefused(f"pip failed while {what}: " + " | ".join(tail),
                                     "check that this host may reach PyPI (pip's index-url, proxy) and that the "
                                     "pinned versions have aarch64 wheels") from None
    return lines


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _host_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolve_wheels(roots: list[str], wheels: Path, say: Callable[[str], None]) -> list[str]:
    """name==version for the roots and everything their wheels require on linux aarch64 (a
    breadth-first closure over the wheels' metadata, one pip download per level)."""
    from packaging.requirements import Requirement

    resolved: dict[str, str] = {}
    pending = [(Requirement(r), "") for r in roots]
    while pending:
        batch: dict[str, tuple] = {}
        for requirement, _by in pending:
            name = _canonical(requirement.name)
            if name not in resolved and name not in batch:
                batch[name] = requirement
        if not batch:
            break
        specs = [_pin(r) for r in batch.values()]
        lines = _pip(["download", "--no-deps", "-d", str(wheels), *_platform_args(), *specs], say,
                     "downloading aarch64 wheels")
        files = [Path(m.group(1).strip()) for m in (re.search(r"(?:Saved|File was already downloaded) (\S+\.whl)", l)
                                                      for l in lines) if m]
        pending = []
        for path in files:
            path = path if path.is_absolute() else (Path.cwd() / path)
            name, version, requires = _wheel_metadata(wheels / path.name)
            if name not in batch or name in resolved:
                continue
            resolved[name] = version
            extras = batch[name].extras
            for text in requires:
                dependency = Requirement(text)
                if name == "executorch" and _canonical(dependency.name) not in map(_canonical, EXECUTORCH_RUNTIME_DEPS):
                    continue
                marker = dependency.marker
                if marker is None or any(marker.evaluate({**GUEST_MARKERS, "extra": e}) for e in ("", *extras)):
                    pending.append((dependency, name))
        missing = sorted(set(batch) - set(resolved))
        if missing:
            raise debian.DownloadRefused(f"pip downloaded no aarch64 wheel for {', '.join(missing)}",
                                         "check the pins in the bundle's toolchain have aarch64 wheels on PyPI")
    return sorted(f"{name}=={version}" for name, version in resolved.items())


def _pin(requirement) -> str:
    """A requirement pinned to this host's installed version when that satisfies it (the guest then
    runs what the host runs), else as written."""
    text = requirement.name + (f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else "")
    exact = [s.version for s in requirement.specifier if s.operator in ("==", "===") and "*" not in s.version]
    if exact:
        return f"{text}=={exact[0]}"
    host = _host_version(requirement.name)
    if host is not None and "+" not in host and requirement.specifier.contains(host, prereleases=True):
        return f"{text}=={host}"
    return f"{text}{requirement.specifier}"


def _wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if re.match(r"[^/]+\.dist-info/METADATA$", n))
        text = archive.read(name).decode("utf-8", errors="replace")
    fields = {"Name": "", "Version": ""}
    requires = []
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        if key in fields and not fields[key]:
            fields[key] = value.strip()
        elif key == "Requires-Dist":
            requires.append(value.strip())
    return _canonical(fields["Name"]), fields["Version"], requires
