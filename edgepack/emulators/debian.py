"""Fetch Debian packages privately into edgepack's cache: no apt, no root, nothing installed.

    recipe = Recipe(name="lavapipe", architecture="amd64", suites=BOOKWORM_WITH_BACKPORTS,
                    roots=(Want("mesa-vulkan-drivers", suite="bookworm-backports", keep=(...)),))
    fetched = fetch(recipe, say=print)     # -> Fetched(root=<cache>/debian/lavapipe/root, packages=[...])

What is trusted, in order: each suite's InRelease is checked with gpgv against Debian's archive
keyring; the Packages.xz index must have the SHA256 the signed Release gives; every .deb must
have the SHA256 the index gives. Only the files a recipe keeps are extracted from the .deb's
data.tar (tarfile's "data" filter: no absolute paths, no links out of the tree).

Dependencies are resolved from the signed indexes like apt would, with backports only where
nothing else satisfies (apt's pin of 100 for backports). When the recipe's architecture is the
host's, a dependency the host already has installed at a satisfying version (dpkg's status file)
is not fetched; packages in ``host_only`` (libc6, ...) must come from the host. A foreign
architecture (an arm64 sysroot for qemu, ``sysroot=True``) takes no such shortcut: it brings its
whole dependency closure, libc included, and its absolute symlinks are made relative inside the
root. Versions are resolved by name from the index, never pinned by URL: backports replace
versions, and the archive drops the old ones.

A fetch is done once: the result lands in <cache>/debian/<recipe>/ with ready.json written last;
a later fetch of the same recipe reads the stamp and touches no network. A lock serialises
concurrent fetches; a failed fetch leaves no partial tree. Settings: EDGEPACK_CACHE (else
$XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack), EDGEPACK_DEBIAN_MIRROR (replaces
http://deb.debian.org, e.g. a local mirror or proxy), EDGEPACK_DEBIAN_KEYRING.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import lzma
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import EmulatorUnavailable
from .debian_format import DebFormatError, compare_versions, extract, parse_relations, parse_stanzas, satisfies

DEBIAN_HOST = "http://deb.debian.org"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
STAMP = "ready.json"
STAMP_VERSION = 1
HTTP_TIMEOUT_S = 60.0
MULTIARCH = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu", "armhf": "arm-linux-gnueabihf"}
DPKG_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armhf"}
DPKG_STATUS = Path("/var/lib/dpkg/status")


class DownloadRefused(EmulatorUnavailable):
    """A mirror could not be reached or refused a file."""


class UnsupportedHost(EmulatorUnavailable):
    """The host is not one the recipe's binaries run on (OS, CPU, distribution, libc)."""


class ToolMissing(EmulatorUnavailable):
    """gpgv or Debian's archive keyring, needed to trust the index, is not installed."""


class IntegrityError(EmulatorUnavailable):
    """A signature or a checksum did not match: the download is not what Debian published."""


class CacheUnwritable(EmulatorUnavailable):
    """The cache directory cannot be created or written."""


@dataclass(frozen=True)
class Suite:
    name: str  # bookworm, bookworm-backports, ...
    base: str = "/debian"  # path under the mirror host: /debian or /debian-security
    component: str = "main"
    priority: int = 500  # apt's pin: a lower one is used only when nothing else satisfies


BOOKWORM = (Suite("bookworm"), Suite("bookworm-updates"), Suite("bookworm-security", base="/debian-security"))
BOOKWORM_WITH_BACKPORTS = BOOKWORM + (Suite("bookworm-backports", priority=100),)


@dataclass(frozen=True)
class Want:
    """A package the recipe asks for by name; its dependencies come along."""

    name: str
    suite: str | None = None  # only from this suite (None: the best candidate of any)
    min_version: str | None = None
    keep: tuple[str, ...] = ()  # regexes over paths in data.tar (default: the recipe's default_keep)


@dataclass(frozen=True)
class Recipe:
    name: str  # the cache folder: <cache>/debian/<name>
    architecture: str
    suites: tuple[Suite, ...]
    roots: tuple[Want, ...]
    skip: tuple[str, ...] = ()  # dependencies the kept files do not need (say why where the recipe is)
    host_only: tuple[str, ...] = ("libc6", "libgcc-s1", "libstdc++6")  # never fetched; the host must have them
    host_machine: str | None = "x86_64"  # platform.machine() the binaries run on (None: any)
    host_codenames: tuple[str, ...] | None = ("bookworm",)  # /etc/os-release VERSION_CODENAME (None: any)
    default_keep: tuple[str, ...] | None = None  # None: shared libraries of the architecture
    # A root file system for another machine (qemu -L): absolute symlinks become relative links
    # inside the root (debian_format.extract); nothing of the host's is assumed (see resolve).
    sysroot: bool = False
    follow_depends: bool = True  # False: only the roots (headers for a build, say; the recipe says why)

    def keep_for(self, package: str) -> tuple[str, ...]:
        for want in self.roots:
            if want.name == package and want.keep:
                return want.keep
        if self.default_keep is not None:
            return self.default_keep
        triplet = re.escape(MULTIARCH.get(self.architecture, self.architecture))
        return (rf"^(\./)?(usr/)?lib/{triplet}/[^/]+\.so(\.[0-9]+)*$",)

    def fingerprint(self) -> str:
        fields = asdict(self)
        for name, default in _LATER_FIELDS.items():  # added later: at their default, older caches stay valid
            if fields[name] == default:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


_LATER_FIELDS = {"sysroot": False, "follow_depends": True}


@dataclass
class Fetched:
    root: Path  # the extracted tree (usr/lib/<triplet>/..., usr/share/...)
    architecture: str
    packages: list[dict] = field(default_factory=list)  # name, version, suite, url, sha256, bytes, files
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def library_dir(self) -> Path:
        return self.root / "usr" / "lib" / MULTIARCH.get(self.architecture, self.architecture)


# --- where --------------------------------------------------------------------------------

def cache_root() -> Path:
    """edgepack's cache: EDGEPACK_CACHE, else $XDG_CACHE_HOME/edgepack, else ~/.cache/edgepack."""
    if os.environ.get("EDGEPACK_CACHE"):
        return Path(os.environ["EDGEPACK_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edgepack"


def mirror_url(suite: Suite) -> str:
    return os.environ.get("EDGEPACK_DEBIAN_MIRROR", DEBIAN_HOST).rstrip("/") + suite.base


# --- the host -----------------------------------------------------------------------------

def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {k: v.strip().strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


def check_host(recipe: Recipe) -> None:
    """Raise UnsupportedHost when the recipe's binaries cannot run here."""
    machine = platform.machine()
    if platform.system() != "Linux" or (recipe.host_machine and machine != recipe.host_machine):
        raise UnsupportedHost(
            f"{recipe.name}: needs Linux on {recipe.host_machine or 'any CPU'}; this host is "
            f"{platform.system()} on {machine}", "run this on a Linux x86-64 build host (Debian 12 or compatible)")
    if recipe.host_codenames is not None:
        release = _os_release()
        codename = release.get("VERSION_CODENAME") or ""
        if codename not in recipe.host_codenames:
            raise UnsupportedHost(
                f"{recipe.name}: its packages are built for Debian {'/'.join(recipe.host_codenames)}; this host is "
                f"{release.get('PRETTY_NAME', 'not a Debian system')}",
                "run this on a Debian 12 (bookworm) host or container, e.g. python:3.11-bookworm")


def host_packages(architecture: str) -> dict[str, list[tuple[str, str]]]:
    """Installed packages of ``architecture`` (and arch all), from dpkg's status file:
    {name: [(version, providing package)]}, virtual names (Provides) included."""
    if DPKG_ARCH.get(platform.machine()) != architecture or not DPKG_STATUS.is_file():
        return {}
    wanted = frozenset({"Package", "Status", "Version", "Architecture", "Provides"})
    found: dict[str, list[tuple[str, str]]] = {}
    for stanza in parse_stanzas(DPKG_STATUS.read_text(errors="replace"), wanted):
        if not stanza.get("Status", "").endswith(" installed") or stanza.get("Architecture") not in (architecture, "all"):
            continue
        found.setdefault(stanza["Package"], []).append((stanza["Version"], stanza["Package"]))
        for group in parse_relations(stanza.get("Provides")):
            name, _, version = group[0]
            found.setdefault(name, []).append((version or stanza["Version"], stanza["Package"]))
    return found


# --- downloads ----------------------------------------------------------------------------

def download(url: str) -> bytes:
    """GET url, whole, into memory (the largest are qemu-user's .deb, 63 MB, and qemu's source, 39 MB);
    DownloadRefused on any network error."""
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DownloadRefused(f"cannot download {url}: {reason}",
                              "check that this host may reach deb.debian.org (or set EDGEPACK_DEBIAN_MIRROR "
                              "to a Debian mirror it may reach; http_proxy is honoured)") from None


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verified_release(suite: Suite) -> dict[str, str]:
    """The suite's InRelease, signature checked with gpgv: {index path: sha256}."""
    keyring = os.environ.get("EDGEPACK_DEBIAN_KEYRING", KEYRING)
    if shutil.which("gpgv") is None or not Path(keyring).is_file():
        raise ToolMissing(f"cannot check Debian's signatures: {'gpgv' if shutil.which('gpgv') is None else keyring} "
                          "is missing", "apt-get install gpgv debian-archive-keyring")
    url = f"{mirror_url(suite)}/dists/{suite.name}/InRelease"
    signed = download(url)
    with tempfile.TemporaryDirectory(prefix="edgepack-gpgv-") as scratch:
        src, out = Path(scratch) / "InRelease", Path(scratch) / "Release"
        src.write_bytes(signed)
        check = subprocess.run(["gpgv", "--keyring", keyring, "--output", str(out), str(src)],
                               capture_output=True, text=True)
        if check.returncode != 0:
            why = (check.stderr.strip().splitlines() or ["gpgv failed"])[-1]
            raise IntegrityError(f"{url}: bad signature ({why})",
                                 "the mirror served something Debian did not sign; use another mirror")
        text = out.read_text(errors="replace")
    sums, in_sha256 = {}, False
    for line in text.splitlines():
        if line.startswith("SHA256:"):
            in_sha256 = True
        elif in_sha256 and line.startswith(" "):
            digest, _size, name = line.split()
            sums[name] = digest
        else:
            in_sha256 = False
    return sums


_INDEX_FIELDS = frozenset({"Package", "Version", "Architecture", "Depends", "Pre-Depends", "Provides", "Filename",
                           "SHA256", "Size"})


def package_index(suite: Suite, architecture: str) -> list[dict[str, str]]:
    """The suite's Packages for one architecture, checked against the signed Release."""
    name = f"{suite.component}/binary-{architecture}/Packages.xz"
    digest = verified_release(suite).get(name)
    if digest is None:
        raise IntegrityError(f"{suite.name}: the signed Release lists no {name}", "check the suite and architecture")
    data = download(f"{mirror_url(suite)}/dists/{suite.name}/{name}")
    if sha256_bytes(data) != digest:
        raise IntegrityError(f"{suite.name} {name}: SHA256 differs from the signed Release",
                             "the mirror served a damaged or stale index; retry or use another mirror")
    stanzas = parse_stanzas(lzma.decompress(data).decode("utf-8", errors="replace"), _INDEX_FIELDS)
    for stanza in stanzas:
        stanza["_suite"] = suite.name
        stanza["_url"] = f"{mirror_url(suite)}/{stanza.get('Filename', '')}"
        stanza["_priority"] = str(suite.priority)
    return stanzas


# --- resolving ----------------------------------------------------------------------------

class _Candidates:
    """Every suite's stanzas by package name and by provided name."""

    def __init__(self, stanzas: list[dict[str, str]]):
        self.by_name: dict[str, list[dict[str, str]]] = {}
        self.providers: dict[str, list[tuple[str, dict[str, str]]]] = {}
        for stanza in stanzas:
            self.by_name.setdefault(stanza["Package"], []).append(stanza)
            for group in parse_relations(stanza.get("Provides")):
                name, _, version = group[0]
                self.providers.setdefault(name, []).append((version or stanza["Version"], stanza))

    def best(self, name: str, relation: str | None = None, wanted: str | None = None,
             suite: str | None = None) -> dict[str, str] | None:
        """apt's choice: the highest pin first (backports only when nothing else fits), then the
        highest version."""
        options = [(s["Version"], s) for s in self.by_name.get(name, [])] + self.providers.get(name, [])
        fitting = [s for version, s in options if (suite is None or s["_suite"] == suite)
                   and satisfies(version, relation, wanted)]

        def order(a: dict[str, str], b: dict[str, str]) -> int:
            return (int(a["_priority"]) - int(b["_priority"])) or compare_versions(a["Version"], b["Version"])

        return max(fitting, key=functools.cmp_to_key(order), default=None)


def resolve(recipe: Recipe, candidates: _Candidates, host: dict[str, list[tuple[str, str]]]
            ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The packages to fetch (name -> index stanza) and notes on what was skipped."""
    chosen: dict[str, dict[str, str]] = {}
    notes: list[str] = []
    queue = []
    # host_only names what the host's own libc provides to binaries of its architecture; a
    # foreign architecture (an arm64 sysroot) must bring its own, and host_packages() is empty.
    native = DPKG_ARCH.get(platform.machine()) == recipe.architecture
    for want in recipe.roots:
        stanza = candidates.best(want.name, ">=" if want.min_version else None, want.min_version, want.suite)
        if stanza is None:
            where = f" in {want.suite}" if want.suite else ""
            at_least = f" >= {want.min_version}" if want.min_version else ""
            raise DownloadRefused(f"{recipe.name}: no {want.name}{at_least}{where} for {recipe.architecture} in the index",
                                  "the archive moved on; update edgepack, or report this with the message")
        chosen[want.name] = stanza
        queue.append(stanza)
    while queue and recipe.follow_depends:
        stanza = queue.pop(0)
        for group in parse_relations(stanza.get("Pre-Depends")) + parse_relations(stanza.get("Depends")):
            if any(any(satisfies(v, rel, want) for v, _ in host.get(name, [])) or
                   (name in chosen and satisfies(chosen[name]["Version"], rel, want)) for name, rel, want in group):
                continue
            name, relation, wanted = group[0]
            if name in recipe.skip:
                notes.append(f"{name} not fetched (needed by {stanza['Package']}; the recipe skips it)")
                continue
            if name in recipe.host_only and native:
                have = ", ".join(v for v, _ in host.get(name, [])) or "none"
                raise UnsupportedHost(f"{recipe.name}: {stanza['Package']} needs {name} {relation or ''} {wanted or ''}"
                                      f"; this host has {have}",
                                      "this host's C library is too old for these binaries: use Debian 12 or newer")
            pick = next((c for c in (candidates.best(n, r, w) for n, r, w in group) if c is not None), None)
            if pick is None:
                raise DownloadRefused(f"{recipe.name}: nothing in the index satisfies {group} (for {stanza['Package']})",
                                      "the archive moved on; update edgepack, or report this with the message")
            chosen[pick["Package"]] = pick
            queue.append(pick)
    return chosen, notes


# --- the whole fetch ----------------------------------------------------------------------

def _stamp(directory: Path, recipe: Recipe) -> Fetched | None:
    try:
        stamp = json.loads((directory / STAMP).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("stamp_version") != STAMP_VERSION or stamp.get("recipe") != recipe.fingerprint():
        return None
    root = directory / "root"
    if not all((root / f).exists() or (root / f).is_symlink() for p in stamp["packages"] for f in p["files"]):
        return None
    return Fetched(root=root, architecture=recipe.architecture, packages=stamp["packages"], notes=stamp["notes"],
                   seconds=stamp["seconds"])


def fetch(recipe: Recipe, say: Callable[[str], None] | None = None) -> Fetched:
    """The recipe's packages extracted under <cache>/debian/<recipe.name>/root (fetched on first use)."""
    say = say or (lambda message: None)
    directory = cache_root() / "debian" / recipe.name
    done = _stamp(directory, recipe)
    if done is not None:
        return done
    check_host(recipe)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        lock = open(directory.parent / f"{recipe.name}.lock", "w")
    except OSError as exc:
        raise CacheUnwritable(f"cannot write edgepack's cache at {directory.parent}: {exc.strerror or exc}",
                              "set EDGEPACK_CACHE to a writable directory") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be fetching the same recipe
        done = _stamp(directory, recipe)
        if done is not None:
            return done
        return _fetch_locked(recipe, directory, say)


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"


def _fetch_locked(recipe: Recipe, directory: Path, say: Callable[[str], None]) -> Fetched:
    started = time.perf_counter()
    stanzas = []
    for suite in recipe.suites:
        say(f"{recipe.name}: reading Debian's signed index of {suite.name} ({recipe.architecture})")
        stanzas += package_index(suite, recipe.architecture)
    chosen, notes = resolve(recipe, _Candidates(stanzas), host_packages(recipe.architecture))
    staging = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.tmp-", dir=directory.parent))
    try:
        packages = []
        for name in sorted(chosen):
            stanza = chosen[name]
            size = int(stanza.get("Size", 0))
            host = urllib.parse.urlsplit(stanza["_url"]).netloc
            say(f"{recipe.name}: downloading {name} {stanza['Version']} ({_size(size)}) from {host}")
            deb = download(stanza["_url"])
            if sha256_bytes(deb) != stanza["SHA256"]:
                raise IntegrityError(f"{stanza['_url']}: SHA256 differs from the signed index",
                                     "the mirror served a damaged file; retry or use another mirror")
            try:
                files = extract(deb, staging / "root", recipe.keep_for(name), sysroot=recipe.sysroot)
            except DebFormatError as exc:
                raise IntegrityError(f"{stanza['_url']}: {exc}", "report this with the message") from None
            packages.append({"package": name, "version": stanza["Version"], "suite": stanza["_suite"],
                             "url": stanza["_url"], "sha256": stanza["SHA256"], "bytes": size, "files": files})
        seconds = round(time.perf_counter() - started, 2)
        stamp = {"stamp_version": STAMP_VERSION, "recipe": recipe.fingerprint(), "packages": packages,
                 "notes": notes, "seconds": seconds}
        (staging / STAMP).write_text(json.dumps(stamp, indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    say(f"{recipe.name}: {len(packages)} package(s) ready in {directory} ({seconds:.1f} s)")
    return Fetched(root=directory / "root", architecture=recipe.architecture, packages=packages, notes=notes,
                   seconds=seconds)
