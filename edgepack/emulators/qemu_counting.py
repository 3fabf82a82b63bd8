"""A qemu-aarch64 that loads TCG plugins, and the plugin that counts executed instructions: the
deterministic ARM cost figure (instructions per inference), built once on explicit request.

    counter = ensure(say=print)      # `edgepack arm64-setup --counts` / `make arm64-count-setup`
    counter.command_extra(out_json)  # ("-plugin", "<lib>,out=<json>") for qemu.Qemu.command(binary=counter.binary)

Why a build: Debian's qemu-user is static-pie and has no -plugin option, and qemu's configure
refuses "static and plugins" together; no Debian package ships a plugin. So this fetches the
source of the same qemu version as the qemu-user package (its .orig tarball, 39 MB, checked
against bookworm-backports' signed Sources index) and glib's headers (libglib2.0-dev, -0,
libpcre2-dev from bookworm: their .pc files and headers only, 3.7 MB), installs meson and
pycotap in a private venv (the +ds tarball drops qemu's bundled wheels), and builds only
qemu-aarch64 with --enable-plugins. Measured on the 2-core build host: downloads 2.5 s,
configure 14-21 s, ninja 144-292 s (387 steps). Needs gcc, ninja and pkg-config (Debian 12: apt-get
install gcc ninja-build pkg-config) and a Debian 12 host (the private glib is bookworm's). The
source and build trees (~450 MB) are removed afterwards; the binary (6 MB) and plugin stay.

The plugin (insnclass.c, next to this file) adds each executed translation block's instruction
count to a per-vCPU scoreboard inline (cheap: a whole python + LiteRT run takes 1.2-2.4 s), plus
per-class counts by encoding (SDOT, SMMLA, SMLAL, FMLA, SVE, SME...), checked against GNU
objdump on every distinct word seen. Counts repeat exactly with qemu.DETERMINISTIC_FLAGS,
PYTHONHASHSEED=0, one runtime thread and fixed-length arguments.
"""

from __future__ import annotations

import fcntl
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from ..errors import EmulatorUnavailable
from . import debian, qemu
from .debian_format import parse_stanzas

GLIB_DEV = debian.Recipe(
    name="glib-dev",
    architecture="amd64",
    suites=debian.BOOKWORM,
    # headers, .pc files and the .so the private qemu links (found through its rpath); their other
    # Depends are tools and -dev packages the build does not use
    roots=(debian.Want("libglib2.0-dev"), debian.Want("libglib2.0-0"), debian.Want("libpcre2-dev")),
    default_keep=(r"^(\./)?usr/(include|lib)/",),
    follow_depends=False,
)
BUILD_PYTHON = ("meson==1.5.2", "pycotap==1.3.1")  # qemu 10's configure wants meson >= 1.5
CONFIGURE = ("--target-list=aarch64-linux-user", "--enable-plugins", "--without-default-features",
             "--disable-install-blobs", "--disable-docs", "--disable-werror", "--disable-debug-info",
             "--disable-system", "--disable-tools")
TOOLS = {"gcc": "gcc", "ninja": "ninja-build", "pkg-config": "pkg-config"}
STAMP = "counting.json"
BUILD_TIMEOUT_S = 3600.0


@dataclass
class Counter:
    binary: Path  # qemu-aarch64 with plugin support
    plugin: Path  # libinsnclass.so
    version: str

    def command_extra(self, out: Path) -> tuple[str, ...]:
        return ("-plugin", f"{self.plugin},out={out}")

    def describe(self) -> dict:
        return {"emulator": self.version, "plugin": "insnclass (edgepack/emulators/insnclass.c): executed instructions, "
                                                    "inline per translation block", "flags": " ".join(qemu.DETERMINISTIC_FLAGS)}


def directory() -> Path:
    return qemu.state_directory() / "counting"


def _stamp() -> dict:
    try:
        return json.loads((directory() / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def _plugin_source() -> bytes:
    return resources.files("edgepack.emulators").joinpath("insnclass.c").read_bytes()


def ready() -> Counter | None:
    """The counting qemu and a plugin compiled from this edgepack's insnclass.c, else None
    (nothing is built here)."""
    stamp = _stamp()
    if not stamp or stamp.get("plugin_source") != debian.sha256_bytes(_plugin_source()):
        return None
    counter = Counter(Path(stamp["binary"]), Path(stamp["plugin"]), stamp["version"])
    return counter if counter.binary.is_file() and counter.plugin.is_file() else None


def ensure(say: Callable[[str], None] | None = None) -> Counter:
    """Build the plugin-enabled qemu-aarch64 and the plugin on first use (minutes); EmulatorUnavailable
    (exit 2) with a hint when this host cannot."""
    say = say or (lambda message: None)
    done = ready()
    if done is not None:
        return done
    emulator = qemu.ensure(say)
    missing = [name for name in TOOLS if shutil.which(name) is None]
    if missing:
        raise debian.ToolMissing(f"counting instructions builds qemu from source and needs {', '.join(missing)}",
                                 f"apt-get install {' '.join(TOOLS[m] for m in missing)}")
    glib = debian.fetch(GLIB_DEV, say)
    base = directory()
    try:
        base.mkdir(parents=True, exist_ok=True)
        lock = open(base.parent / "counting.lock", "w")
    except OSError as exc:
        raise debian.CacheUnwritable(f"cannot write {base}: {exc.strerror or exc}",
                                     "set EDGEPACK_CACHE to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = ready()
        if done is not None:
            return done
        stamp = _stamp()
        if stamp and Path(stamp["binary"]).is_file() and (base / "include/qemu-plugin.h").is_file():
            say("counting: compiling the plugin again (its source changed)")  # qemu itself is still good
            _compile_plugin(base, glib.root, base / "include", Path(stamp["plugin"]))
            (base / STAMP).write_text(json.dumps({**stamp, "plugin_source": debian.sha256_bytes(_plugin_source())},
                                                 indent=2))
            return Counter(Path(stamp["binary"]), Path(stamp["plugin"]), stamp["version"])
        return _build(emulator, glib.root, base, say)


def _compile_plugin(base: Path, glib: Path, include: Path, plugin: Path) -> None:
    """insnclass.c against the built qemu's qemu-plugin.h and glib's headers."""
    libdir = glib / "usr/lib/x86_64-linux-gnu"
    env = {**os.environ, "PKG_CONFIG_LIBDIR": str(libdir / "pkgconfig"), "PKG_CONFIG_SYSROOT_DIR": str(glib)}
    cflags = _call(["pkg-config", "--cflags", "glib-2.0"], "finding glib's headers", env=env).split()
    source = base / "insnclass.c"
    source.write_bytes(_plugin_source())
    _call(["gcc", "-O2", "-shared", "-fPIC", "-Wall", f"-I{include}", *cflags, "-o", str(plugin), str(source)],
          "compiling the counting plugin")


def _source_tarball(version: str, say: Callable[[str], None]) -> tuple[str, bytes]:
    """qemu's .orig tarball for the qemu-user package's version, checked against the signed Sources."""
    suite = qemu.RECIPE.suites[0]
    index = f"{suite.component}/source/Sources.xz"
    digest = debian.verified_release(suite).get(index)
    if digest is None:
        raise debian.IntegrityError(f"{suite.name}: the signed Release lists no {index}", "report this with the message")
    say(f"counting: reading Debian's signed source index of {suite.name}")
    data = debian.download(f"{debian.mirror_url(suite)}/dists/{suite.name}/{index}")
    if debian.sha256_bytes(data) != digest:
        raise debian.IntegrityError(f"{suite.name} {index}: SHA256 differs from the signed Release",
                                    "the mirror served a damaged or stale index; retry or use another mirror")
    wanted = frozenset({"Package", "Version", "Directory", "Checksums-Sha256"})
    for stanza in parse_stanzas(lzma.decompress(data).decode("utf-8", errors="replace"), wanted):
        if stanza.get("Package") != "qemu" or stanza.get("Version") != version:
            continue
        for line in stanza.get("Checksums-Sha256", "").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].endswith(".orig.tar.xz"):
                say(f"counting: downloading {parts[2]} ({int(parts[1]) / 1e6:.1f} MB)")
                tarball = debian.download(f"{debian.mirror_url(suite)}/{stanza['Directory']}/{parts[2]}")
                if debian.sha256_bytes(tarball) != parts[0]:
                    raise debian.IntegrityError(f"{parts[2]}: SHA256 differs from the signed Sources index",
                                                "the mirror served a damaged file; retry or use another mirror")
                return parts[2], tarball
    raise debian.DownloadRefused(f"no qemu {version} source in {suite.name}", "the archive moved on; update edgepack")


def _build(emulator: qemu.Qemu, glib: Path, base: Path, say: Callable[[str], None]) -> Counter:
    started = time.perf_counter()
    name, tarball = _source_tarball(emulator.package["version"], say)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    try:
        with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:xz") as archive:
            archive.extractall(work, filter="data")
        source = next(p for p in work.iterdir() if p.is_dir())
        venv = base / "buildenv"
        if not (venv / "bin" / "meson").exists():
            say(f"counting: installing {' and '.join(BUILD_PYTHON)} in a private venv (from PyPI)")
            _call([sys.executable, "-m", "venv", str(venv)], "creating the build venv")
            _call([str(venv / "bin/python"), "-m", "pip", "install", "-q", *BUILD_PYTHON], "installing meson")
        libdir = glib / "usr/lib/x86_64-linux-gnu"
        env = {**os.environ, "PKG_CONFIG_LIBDIR": str(libdir / "pkgconfig"), "PKG_CONFIG_SYSROOT_DIR": str(glib)}
        build = source / "build"
        build.mkdir()
        say("counting: configuring qemu-aarch64 with TCG plugins (about 20 s)")
        _call(["../configure", f"--python={venv / 'bin/python'}", *CONFIGURE, f"--extra-ldflags=-Wl,-rpath,{libdir}"],
              "configuring qemu", cwd=build, env=env)
        say("counting: building qemu-aarch64 (387 steps, 2-5 minutes on 2 cores, at low priority)")
        _call(["nice", "-n", "19", "ninja", "-j", str(os.cpu_count() or 2), "qemu-aarch64"], "building qemu",
              cwd=build, env=env)
        (base / "bin").mkdir(exist_ok=True)
        (base / "include").mkdir(exist_ok=True)
        binary, plugin = base / "bin/qemu-aarch64", base / "bin/libinsnclass.so"
        shutil.copy2(build / "qemu-aarch64", binary)
        shutil.copy2(source / "include/qemu/qemu-plugin.h", base / "include/qemu-plugin.h")  # to rebuild the plugin
        _compile_plugin(base, glib, base / "include", plugin)
        version = _call([str(binary), "--version"], "running the built qemu").splitlines()[0]
        stamp = {"binary": str(binary), "plugin": str(plugin), "version": version, "source": name,
                 "plugin_source": debian.sha256_bytes(_plugin_source()),
                 "seconds": round(time.perf_counter() - started, 1)}
        (base / STAMP).write_text(json.dumps(stamp, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"counting: {version} with plugins, built in {stamp['seconds']:.0f} s ({base})")
    return Counter(binary, plugin, version)


def _call(command: list[str], what: str, cwd: Path | None = None, env: dict | None = None) -> str:
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                              timeout=BUILD_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorUnavailable(f"counting: {what} failed: {exc}", "report this with the message") from None
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-4:])
        raise EmulatorUnavailable(f"counting: {what} failed (exit {done.returncode}): {tail}",
                                  "see the message; the build needs gcc, ninja, pkg-config and PyPI for meson")
    return done.stdout
