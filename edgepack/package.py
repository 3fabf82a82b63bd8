"""Packaging: the on-device kit, the payload digest, the deterministic zip, reproducibility.

Order in a build (pipeline.py):

    manifest = builder.run(staged, scratch)     # writes staged/manifest.json
    install_kit(staged)                          # staged/device/{validate.py, run_android.sh, README.md}
    seal_bundle(staged)                          # manifest.package: every file's sha256 + payload_sha256
    write_zip(staged, out / f"{model}-{target}.zip")   # pipeline.py: ZipWriter, payload before the last manifest
    commit_dir(staged, final)

manifest.json records host latency measured in each build, so two builds of the same model
give different manifests and zips. ``payload_sha256`` covers every other file of the bundle,
so two builds whose artifacts and golden data are byte-identical give the same payload digest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable

from . import bundle as bundle_mod
from .bundle import Manifest, PackageInfo, ReproducibilityCheck
from .errors import BundleError, EdgepackError

# The kit's source files (edgepack/device/); a bundle gets validate.py and README.md always,
# run_android.sh on an Android target, and a generated APP.md beside them.
KIT_FILES = ("validate.py", "run_android.sh", "README.md")
KIT_DIR = "device"
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)
ZIP_COMPRESSLEVEL = 9
ZIP64_THRESHOLD = 1 << 31
MANIFEST = "manifest.json"
PAYLOAD_SHA256_METHOD = (
    "sha256 over every bundle file except manifest.json (which records per-build host latency), "
    "in sorted path order, each as: path (UTF-8), NUL, size in decimal, NUL, bytes. Equal across "
    "builds whose artifacts, golden data and kit are byte-identical; see package.payload_sha256.")
# Written by the device kit or by hand into a bundle; never part of its payload.
_NOT_PAYLOAD_PREFIXES = ("device_report",)


def _mode_for(name: str) -> int:
    return 0o755 if name.endswith(".sh") else 0o644


# --- the device kit ----------------------------------------------------------------------

def install_kit(bundle_dir: Path) -> list[Path]:
    """Write the device kit into ``bundle_dir/device/`` (bytes only: no source mtimes leak in):
    validate.py, README.md rendered for this bundle (kitdocs.py), and for an Android target
    run_android.sh and APP.md. Reads the bundle's manifest.json, so it runs after it is written."""
    from . import kitdocs

    manifest = json.loads((Path(bundle_dir) / MANIFEST).read_text())
    target = Path(bundle_dir) / KIT_DIR
    target.mkdir(parents=True, exist_ok=True)
    source = resources.files("edgepack.device")
    contents = {"validate.py": source.joinpath("validate.py").read_bytes(),
                "README.md": kitdocs.render_readme(source.joinpath("README.md").read_text(), manifest).encode()}
    if kitdocs.is_android(manifest):
        contents["run_android.sh"] = source.joinpath("run_android.sh").read_bytes()
    app = kitdocs.render_app(manifest)
    if app is not None:
        contents["APP.md"] = app.encode()
    written = []
    for name, data in contents.items():
        path = target / name
        path.write_bytes(data)
        os.chmod(path, _mode_for(name))
        written.append(path)
    return written


# --- payload -----------------------------------------------------------------------------

def bundle_files(bundle_dir: Path) -> list[str]:
    """Bundle-relative POSIX paths of the payload: every regular file except manifest.json,
    device reports, hidden files and __pycache__, sorted. Symlinks are refused."""
    root = Path(bundle_dir)
    found = []
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
            continue
        if path.is_symlink():
            raise BundleError(f"{path}: a symlink inside a bundle", "bundles hold regular files only; replace it")
        if not path.is_file():
            continue
        name = rel.as_posix()
        if name == MANIFEST or (len(rel.parts) == 1 and name.startswith(_NOT_PAYLOAD_PREFIXES)):
            continue
        found.append(name)
    return sorted(found)


class _PayloadDigest:
    def __init__(self) -> None:
        self._digest = hashlib.sha256()

    def add(self, name: str, chunks: Iterable[bytes], size: int) -> None:
        self._digest.update(name.encode("utf-8") + b"\0" + str(size).encode() + b"\0")
        for chunk in chunks:
            self._digest.update(chunk)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _chunks(path: Path) -> Iterable[bytes]:
    with open(path, "rb") as handle:
        yield from iter(lambda: handle.read(1 << 20), b"")


def payload_sha256(bundle_dir: Path, names: list[str] | None = None) -> str:
    """The payload digest of a bundle directory (names: bundle-relative paths; default all)."""
    root = Path(bundle_dir)
    digest = _PayloadDigest()
    for name in sorted(names if names is not None else bundle_files(root)):
        path = root / name
        digest.add(name, _chunks(path), path.stat().st_size)
    return digest.hexdigest()


def zip_payload_sha256(archive: zipfile.ZipFile, prefix: str = "") -> str:
    """The payload digest of a bundle zip, computed from its entries (prefix: the top folder + '/')."""
    digest = _PayloadDigest()
    infos = sorted((i for i in archive.infolist() if not i.is_dir()), key=lambda i: i.filename)
    for info in infos:
        name = info.filename[len(prefix):]
        if name == MANIFEST:
            continue
        with archive.open(info) as handle:
            digest.add(name, iter(lambda: handle.read(1 << 20), b""), info.file_size)
    return digest.hexdigest()


def seal_bundle(bundle_dir: Path) -> Manifest:
    """Record every payload file's sha256, the kit and payload_sha256 in manifest.package."""
    root = Path(bundle_dir)
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    names = bundle_files(root)
    files = [bundle_mod.file_entry(root / name, root) for name in names]
    kit = [name for name in names if name.startswith(KIT_DIR + "/")]
    package = PackageInfo(files=files, payload_sha256=payload_sha256(root, names),
                          payload_sha256_method=PAYLOAD_SHA256_METHOD, kit=kit)
    manifest = manifest.model_copy(update={"package": package})
    write_manifest_atomic(root, manifest)
    return manifest


def write_manifest_atomic(bundle_dir: Path, manifest: Manifest) -> None:
    """Replace bundle_dir/manifest.json whole (temp file beside it, fsync, rename)."""
    root = Path(bundle_dir)
    temp = root / f".{MANIFEST}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        bundle_mod.write_manifest(temp, manifest)
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, root / MANIFEST)
    finally:
        temp.unlink(missing_ok=True)


# --- deterministic zip -------------------------------------------------------------------

@dataclass
class ZipResult:
    path: Path
    bytes: int
    sha256: str
    payload_sha256: str
    entries: int


def _zip_names(root: Path) -> list[str]:
    """manifest.json plus the files the manifest vouches for (all payload files if not sealed)."""
    manifest = Manifest.model_validate_json((root / MANIFEST).read_text())
    if manifest.package is None:
        return sorted([MANIFEST] + bundle_files(root))
    for entry in manifest.package.files:
        path = root / entry.path
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing", "rebuild the bundle")
        if path.stat().st_size != entry.bytes or bundle_mod.sha256_file(path) != entry.sha256:
            raise BundleError(f"{path}: differs from its sha256 in the manifest", "rebuild the bundle")
    return sorted([MANIFEST] + [e.path for e in manifest.package.files])


def write_zip(bundle_dir: Path, zip_path: Path, root_name: str | None = None) -> ZipResult:
    """Write the bundle as a deterministic zip, atomically.

    Entries sit under one top folder (``root_name``, default the zip's stem), listed sorted by
    path, dated 1980-01-01 00:00:00, mode 0644 (0755 for *.sh), deflated at level 9, no directory
    entries and no extra fields, so the same bundle always gives the same bytes.
    """
    writer = ZipWriter(bundle_dir, zip_path, root_name)
    try:
        writer.add_payload()
        return writer.close()
    finally:
        writer.abort()


class ZipWriter:
    """write_zip in two parts, so a build can compress its payload (nearly all of a zip's time)
    in a timed step before its last manifest write, and add manifest.json after it:

        writer = ZipWriter(bundle, zip_path); writer.add_payload()   # every file but manifest.json
        ... write the final manifest.json ...
        writer.close()                                               # adds it; the zip lands whole
        writer.abort()                                               # (in a finally) no temp left

    manifest.json is stored last; the central directory lists every entry sorted by path."""

    def __init__(self, bundle_dir: Path, zip_path: Path, root_name: str | None = None) -> None:
        self.root, self.zip_path = Path(bundle_dir), Path(zip_path)
        self.prefix = (root_name if root_name is not None else self.zip_path.stem).strip("/")
        if not self.prefix or ".." in PurePosixPath(self.prefix).parts:
            raise BundleError(f"{zip_path}: unusable top folder name {self.prefix!r}", "pass another zip name")
        self.zip_path.parent.mkdir(parents=True, exist_ok=True)
        self.temp = self.zip_path.parent / f".{self.zip_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.raw = open(self.temp, "wb")
        self.archive = zipfile.ZipFile(self.raw, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=ZIP_COMPRESSLEVEL)
        self.digest = _PayloadDigest()

    def _add(self, name: str) -> None:
        path = self.root / name
        size = path.stat().st_size
        info = zipfile.ZipInfo(f"{self.prefix}/{name}", date_time=ZIP_DATE_TIME)
        info.compress_type = zipfile.ZIP_DEFLATED
        _set_compress_level(info, ZIP_COMPRESSLEVEL)
        info.create_system = 3  # unix, so the mode bits below are honoured by unzip
        info.external_attr = (stat.S_IFREG | _mode_for(name)) << 16
        info.file_size = size
        with self.archive.open(info, "w", force_zip64=size >= ZIP64_THRESHOLD) as out:
            for chunk in _chunks(path):
                out.write(chunk)
        if name != MANIFEST:
            self.digest.add(name, _chunks(path), size)

    def add_payload(self) -> None:
        """Every file the manifest vouches for (checked against its sha256), manifest.json aside."""
        for name in _zip_names(self.root):
            if name != MANIFEST:
                self._add(name)

    def close(self) -> ZipResult:
        """Add manifest.json as it is now, sort the listing, and put the zip in place."""
        self._add(MANIFEST)
        self.archive.filelist.sort(key=lambda info: info.filename)  # the central directory, by path
        self.archive.close()
        self.raw.flush()
        os.fsync(self.raw.fileno())
        self.raw.close()
        os.replace(self.temp, self.zip_path)
        entries = len(self.archive.filelist)
        return ZipResult(path=self.zip_path, bytes=self.zip_path.stat().st_size,
                         sha256=bundle_mod.sha256_file(self.zip_path), payload_sha256=self.digest.hexdigest(),
                         entries=entries)

    def abort(self) -> None:
        """Remove the temp file if the zip was not put in place (harmless after close)."""
        if not self.raw.closed:
            with contextlib.suppress(Exception):
                self.archive.close()
            self.raw.close()
        self.temp.unlink(missing_ok=True)


def _set_compress_level(info: zipfile.ZipInfo, level: int) -> None:
    # ZipFile.open(info, "w") ignores the archive's compresslevel and reads it from the ZipInfo
    # (``_compresslevel`` up to Python 3.12, ``compress_level`` from 3.13).
    if hasattr(type(info), "compress_level"):
        info.compress_level = level
    else:
        info._compresslevel = level


# --- reproducibility ---------------------------------------------------------------------

REPRO_METHOD = ("exported a second time in the same build into a temp dir, with the RNGs seeded "
                "from the export context, and compared byte for byte; a static int8 export reuses the "
                "first one's calibrated graph (one calibration per recipe per build), so the second run "
                "repeats conversion, torch.export, lowering and serialisation, not calibration")
LANE_REPRO_METHOD = ("exported a second time from scratch (calibration included, once per recipe as in the build) "
                     "in a separate process started for the build (steps/lane.py) and sent the same model and "
                     "inputs, with the RNGs seeded from the export context, while the build went on; compared "
                     "byte for byte")


def check_reproducible(export: Callable[[Any, Any], Any], config: Any, ctx: Any,
                       files: list[Path]) -> ReproducibilityCheck:
    """Export ``config`` again with ``export`` (an exporter module's export function) into a temp
    dir and compare the bytes of every file with ``files`` (what the first export wrote, under
    ``ctx.workdir``). The model is deep-copied and the torch/numpy RNG states are restored, so
    the check changes nothing in the rest of the build. Export errors propagate unchanged."""
    import copy
    import random

    import numpy as np
    import torch

    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-repro-") as scratch:
            torch.manual_seed(ctx.seed)
            np.random.seed(ctx.seed)
            random.seed(ctx.seed)
            again_ctx = dataclasses.replace(ctx, workdir=Path(scratch), model=copy.deepcopy(ctx.model))
            result = export(config, again_ctx)
            return compare_exports(files, Path(ctx.workdir), result.files, Path(scratch), REPRO_METHOD)
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(np_state)
        random.setstate(py_state)


def compare_exports(files: list[Path], root: Path, again: list[Path], again_root: Path,
                    method: str) -> ReproducibilityCheck:
    """Byte-for-byte comparison of a first export (``files`` under ``root``) and a second one
    (``again`` under ``again_root``), file by file under the same relative names."""
    first = {Path(p).resolve().relative_to(Path(root).resolve()).as_posix(): Path(p) for p in files}
    second = {Path(p).resolve().relative_to(Path(again_root).resolve()).as_posix(): Path(p) for p in again}
    differing, details = [], []
    for name in sorted(set(first) | set(second)):
        if name not in second:
            differing.append(name)
            details.append(f"{name}: not written by the second export")
            continue
        if name not in first:
            differing.append(name)
            details.append(f"{name}: written only by the second export")
            continue
        why = _byte_difference(first[name], second[name])
        if why:
            differing.append(name)
            details.append(f"{name}: {why}")
    return ReproducibilityCheck(
        reproducible=not differing, method=method, files=sorted(first), differing=differing,
        detail="; ".join(details) if details else f"{len(first)} file(s) byte-identical")


def _byte_difference(a: Path, b: Path) -> str | None:
    import numpy as np

    data_a, data_b = a.read_bytes(), b.read_bytes()
    if data_a == data_b:
        return None
    if len(data_a) != len(data_b):
        return f"{len(data_a)} vs {len(data_b)} bytes"
    unequal = np.flatnonzero(np.frombuffer(data_a, np.uint8) != np.frombuffer(data_b, np.uint8))
    return f"{unequal.size} of {len(data_a)} bytes differ, first at offset {int(unequal[0])}"


def scratch_full(exc: OSError, scratch: Path, out: Path) -> EdgepackError | None:
    """An EdgepackError naming the scratch directory when a full disk there (not under --out)
    is what failed the build; None otherwise."""
    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    try:
        if os.stat(scratch).st_dev == os.stat(out).st_dev:
            return None  # one filesystem: the CLI's output error names --out, which is right
        if shutil.disk_usage(scratch).free >= shutil.disk_usage(out).free:
            return None
    except OSError:
        return None
    return EdgepackError(f"{scratch.parent}: no space left for the build's scratch files ({exc.strerror})",
                         "free space there or point TMPDIR at a directory with room; the previous bundle is "
                         "untouched")
