"""Mesa's lavapipe: a conformant Vulkan driver that runs on the CPU, set up privately on first use,
so LiteRT's GPU accelerator (WebGPU through Dawn, on Vulkan) runs on a build host without a GPU.

    driver = ensure(say=print)                    # fetched once into <cache>/debian/lavapipe
    env = driver.environment()                    # for the child process that runs the GPU path
    driver.describe()                             # for the manifest: driver, version, packages

Why these packages (measured on Debian 12.11, x86-64): Debian 12's own lavapipe (Mesa 22.3.6)
lacks two features Dawn requires (texel-buffer dynamic indexing) and Dawn then finds "No
adapters"; Mesa 25.0.7 from bookworm-backports has them. The Vulkan loader (libvulkan1) is not on
a default Debian 12 host, so it comes too. libdrm-amdgpu1 is a dependency for radv only
(libvulkan_lvp.so does not link it) and libdrm-common holds amdgpu marketing names: neither is
fetched. About 11.5 MB are downloaded and 11 MB kept.

lavapipe is a correctness tool, not a speed proxy and not a phone GPU driver: its shaders are
compiled by LLVM for this CPU (the first inference of a model pays that; Mesa's on-disk shader
cache, kept in <cache>/lavapipe, spares later processes), and its fp16 arithmetic is not a
phone GPU's rounding. LD_LIBRARY_PATH is read when a process starts, so the driver is only used
in child processes started with environment().
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EmulatorUnavailable
from . import debian

RECIPE = debian.Recipe(
    name="lavapipe",
    architecture="amd64",
    suites=debian.BOOKWORM_WITH_BACKPORTS,
    roots=(
        debian.Want("mesa-vulkan-drivers", suite="bookworm-backports", min_version="25",
                    keep=(r"usr/lib/x86_64-linux-gnu/libvulkan_lvp\.so$", r"usr/share/vulkan/icd\.d/lvp_icd[^/]*\.json$")),
        debian.Want("libvulkan1"),
    ),
    skip=("libdrm-amdgpu1", "libdrm-common"),
)
NOT_A_PHONE_DRIVER = ("Mesa lavapipe runs Vulkan on the build host's CPU: LiteRT's GPU kernels (fp16 shaders) are "
                      "exercised, but this is not a phone GPU driver; its times are not device times")
STATE = "driver.json"
PROBE_TIMEOUT_S = 120.0


@dataclass
class Lavapipe:
    directory: Path  # <cache>/lavapipe: ICD file, probe result, Mesa's shader cache
    library_dir: Path  # libvulkan.so.1, libvulkan_lvp.so and any library the host lacked
    icd: Path
    packages: list[dict] = field(default_factory=list)
    device: dict = field(default_factory=dict)  # vulkan.probe() of the driver, as a child sees it

    def environment(self) -> dict[str, str]:
        """Variables for a child process that should get lavapipe (and no other Vulkan driver)."""
        inherited = os.environ.get("LD_LIBRARY_PATH")
        return {
            "VK_ICD_FILENAMES": str(self.icd),  # the loader in libvulkan1 1.3.239 reads this one
            "VK_DRIVER_FILES": str(self.icd),  # newer loaders' name for it
            "LD_LIBRARY_PATH": str(self.library_dir) + (f":{inherited}" if inherited else ""),
            "MESA_SHADER_CACHE_DIR": str(self.directory / "mesa_shader_cache"),
            "NODEVICE_SELECT": "1",  # a host's Mesa device-select layer must not reorder devices
            "VK_LOADER_LAYERS_DISABLE": "~implicit~",  # no host implicit layers (loaders >= 1.3.262)
        }

    def describe(self) -> dict:
        mesa = next((p for p in self.packages if p["package"] == "mesa-vulkan-drivers"), {})
        return {"name": "Mesa lavapipe", "package_version": mesa.get("version"),
                "device": self.device.get("name"), "device_type": self.device.get("type"),
                "driver_info": self.device.get("driver_info"), "vulkan_api": self.device.get("api_version"),
                "packages": [{k: p[k] for k in ("package", "version", "suite", "sha256")} for p in self.packages],
                "not_a_phone_gpu_driver": NOT_A_PHONE_DRIVER}


def state_directory() -> Path:
    return debian.cache_root() / "lavapipe"


def ensure(say: Callable[[str], None] | None = None) -> Lavapipe:
    """lavapipe ready to use: fetched and probed on first use (a few seconds and ~11.5 MB), read
    from the cache afterwards. Raises EmulatorUnavailable (with a hint) when it cannot be."""
    fetched = debian.fetch(RECIPE, say)
    directory = state_directory()
    key = hashlib.sha256(json.dumps([p["sha256"] for p in fetched.packages]).encode()).hexdigest()
    lavapipe = Lavapipe(directory=directory, library_dir=fetched.library_dir, icd=directory / "lvp_icd.json",
                        packages=fetched.packages)
    try:
        state = json.loads((directory / STATE).read_text())
    except (OSError, ValueError):
        state = {}
    if state.get("packages_key") == key and lavapipe.icd.is_file() and state.get("library_dir") == str(fetched.library_dir):
        lavapipe.device = state["device"]
        return lavapipe
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_icd(fetched.root, lavapipe)
    except OSError as exc:
        raise debian.CacheUnwritable(f"cannot write {directory}: {exc.strerror or exc}",
                                     "set EDGEPACK_CACHE to a writable directory") from None
    _check_links(fetched.library_dir)
    lavapipe.device = _probe(lavapipe)
    if say:
        say(f"lavapipe: {lavapipe.device['name']}, {lavapipe.device['driver_info']}, Vulkan {lavapipe.device['api_version']}")
    tmp = directory / f".{STATE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"packages_key": key, "library_dir": str(fetched.library_dir),
                               "device": lavapipe.device}, indent=2))
    os.replace(tmp, directory / STATE)
    return lavapipe


def _write_icd(root: Path, lavapipe: Lavapipe) -> None:
    """The packaged ICD file names the driver by bare file name; ours gives its absolute path."""
    packaged = sorted((root / "usr/share/vulkan/icd.d").glob("lvp_icd*.json"))
    if not packaged:
        raise EmulatorUnavailable("mesa-vulkan-drivers has no lvp_icd*.json", "report this with the message")
    icd = json.loads(packaged[0].read_text())
    icd["ICD"]["library_path"] = str(lavapipe.library_dir / "libvulkan_lvp.so")
    tmp = lavapipe.icd.with_name(f".{lavapipe.icd.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(icd, indent=2))
    os.replace(tmp, lavapipe.icd)


def _check_links(library_dir: Path) -> None:
    """Every library the driver links must resolve (the fetch adds those the host lacks)."""
    if shutil.which("ldd") is None:
        return
    out = subprocess.run(["ldd", str(library_dir / "libvulkan_lvp.so")], capture_output=True, text=True, check=False,
                         env={**os.environ, "LD_LIBRARY_PATH": str(library_dir)}).stdout
    missing = sorted({line.split()[0] for line in out.splitlines() if "not found" in line})
    if missing:
        raise debian.UnsupportedHost(f"lavapipe needs libraries this host lacks: {', '.join(missing)}",
                                     "install them with apt-get (their Debian 12 packages), then retry")


def _probe(lavapipe: Lavapipe) -> dict:
    """Ask the Vulkan loader, in a child with the driver's environment, what it finds."""
    try:
        done = subprocess.run([sys.executable, "-m", "edgepack.emulators.vulkan"], capture_output=True, text=True,
                              env={**os.environ, **lavapipe.environment()}, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise EmulatorUnavailable(f"the Vulkan probe did not answer within {PROBE_TIMEOUT_S:g} s",
                                  "the host is overloaded or the driver hangs; retry") from None
    try:
        report = json.loads(done.stdout)
    except ValueError:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EmulatorUnavailable(f"the Vulkan probe failed (exit {done.returncode}): {tail}",
                                  "the driver crashed on this host; report this with the message") from None
    device = next((d for d in report["devices"] if d["type"] == "cpu"), None)
    if not report["ok"] or device is None:
        raise EmulatorUnavailable(f"lavapipe does not work here: {report.get('error') or 'no CPU Vulkan device'}",
                                  "report this with the message (and `python -m edgepack.emulators.vulkan`'s output)")
    return device
