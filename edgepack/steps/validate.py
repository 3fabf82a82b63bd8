"""Re-validate a bundle on this host from the bundle alone (no spec, no torch model).

    edgepack validate dist/<model>/<target>        or        edgepack validate out/<model>-<target>.zip

1. the manifest must match the JSON Schema (BundleError, exit 2);
2. every file the manifest lists must have its recorded sha256 (BundleError naming the file, exit 2);
3. each artifact runs in its own runtime in a child process with a timeout (RuntimeSession;
   a crash or hang is a RuntimeCheckError, exit 3), fed exactly golden/<file>.inputs.npz;
4. its dequantized outputs are compared with golden/reference_outputs.npz under the manifest's
   thresholds with edgepack.parity (exit 1 when any artifact fails);
5. with --gpu, each float .tflite also runs through LiteRT's GPU accelerator on lavapipe
   (steps/gpu_check.py), judged against the reference and the build host's CPU-interpreter
   outputs (golden/<file>.outputs.npz) under the thresholds the build recorded (exit 1 when it
   fails; 2 when lavapipe cannot be set up; 3 when the accelerator or the driver fails);
6. with --arm64, each artifact's device kit runs on arm64 code under qemu-aarch64, per CPU model
   (steps/arm64_check.py): parity and bit-identity with the build host's outputs (exit 1 when it
   fails; 2 when the emulator cannot be set up; 3 on a crash or hang under emulation).

A .zip is checked before anything is extracted: absolute paths, '..' components, symlinks and
duplicate names are refused; it is then extracted to a temp dir that is removed afterwards.
"""

from __future__ import annotations

import importlib.util
import os
import re
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable

from pydantic import ValidationError

from ..bundle import ArtifactEntry, EmulatedArm64Check, EmulatedGpuCheck, Manifest, sha256_file
from ..errors import EXIT_OK, EXIT_PARITY_OR_BUDGET, BundleError, RuntimeCheckError, RuntimeUnavailable
from ..export import RUNTIME_FOR_FORMAT
from ..intake import (check_zip_against_manifest, checksummed_paths, confined, load_bundle_manifest,
                      read_zip_manifest)
from ..package import MANIFEST, zip_payload_sha256
from ..parity import ParityReport, compare
from ..runtimes.base import TensorIO, from_native
from ..runtimes.session import DEFAULT_TIMEOUT_S, RuntimeSession
from ..target import GPU_CHECK_PRECISIONS, Arm64CheckSettings
from .arm64_check import check_bundle
from .gpu_check import GpuJob, check_on_gpu
from .golden import Golden, agreement, recorded_masks

# Importable module(s) each runner needs; the first one found is enough.
RUNTIME_MODULES = {"onnxruntime": ("onnxruntime",), "executorch": ("executorch",),
                   "litert": ("ai_edge_litert", "tflite_runtime")}
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "executorch": "executorch==1.5.1",
                    "litert": "ai-edge-litert==2.3.*"}


@dataclass
class ArtifactCheck:
    file: str
    format: str
    precision: str
    runtime: str
    runtime_version: str
    parity: ParityReport
    host_agreement: dict

    @property
    def passed(self) -> bool:
        return self.parity.passed

    def to_dict(self) -> dict:
        return {"file": self.file, "format": self.format, "precision": self.precision, "runtime": self.runtime,
                "runtime_version": self.runtime_version, "passed": self.passed, "parity": self.parity.to_dict(),
                "host_agreement": self.host_agreement}


@dataclass
class GpuValidation:
    file: str
    record: EmulatedGpuCheck

    @property
    def passed(self) -> bool:
        return self.record.status == "passed"

    def to_dict(self) -> dict:
        return {"file": self.file, "passed": self.passed, **self.record.model_dump(mode="json")}


@dataclass
class ValidationResult:
    source: Path
    manifest: Manifest
    files_verified: int
    artifacts: list[ArtifactCheck] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gpu: list[GpuValidation] = field(default_factory=list)  # --gpu: float .tflite files on LiteRT's GPU path
    arm64: dict[str, EmulatedArm64Check] = field(default_factory=dict)  # --arm64: the kit under qemu, per file

    @property
    def parity_passed(self) -> bool:
        return all(a.passed for a in self.artifacts)

    @property
    def exit_code(self) -> int:
        """0 only when every artifact re-checked here passed parity (and the GPU path, with --gpu)
        and the bundle's own build passed: a .failed bundle (a budget exceeded, say) is not made
        good by passing parity."""
        passed = (self.parity_passed and all(g.passed for g in self.gpu)
                  and all(r.status != "failed" for r in self.arm64.values()))
        return EXIT_OK if passed and self.manifest.status == "passed" else EXIT_PARITY_OR_BUDGET

    def to_dict(self) -> dict:
        return {"source": str(self.source), "model": self.manifest.model.name, "target": self.manifest.target.name,
                "passed": self.exit_code == EXIT_OK, "exit_code": self.exit_code,
                "parity_passed": self.parity_passed, "build_status": self.manifest.status,
                "build_failures": list(self.manifest.failures),
                "files_verified": self.files_verified, "artifacts": [a.to_dict() for a in self.artifacts],
                "gpu": [g.to_dict() for g in self.gpu], "skipped": self.skipped,
                "arm64": {f: r.model_dump(mode="json") for f, r in self.arm64.items()}}


def validate_bundle(path: Path, *, artifact: str | None = None, threads: int | None = None,
                    timeout_s: float = DEFAULT_TIMEOUT_S, progress: Callable[[str], None] | None = None,
                    gpu: bool = False, arm64: Arm64Request | None = None) -> ValidationResult:
    """Validate a bundle directory or a bundle .zip. Raises BundleError / RuntimeCheckError /
    RuntimeUnavailable (EmulatorUnavailable for --gpu without lavapipe); a parity failure is
    reported in the result (exit_code 1), not raised. gpu: also run each float .tflite through
    LiteRT's GPU accelerator on lavapipe (steps/gpu_check.py)."""
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="edgepack-validate-") as scratch:
            root, payload = extract_bundle_zip(path, Path(scratch))
            return _validate_dir(root, path, artifact, threads, timeout_s, progress, payload, gpu, arm64)
    if path.is_file():
        raise BundleError(f"{path}: neither a bundle directory nor a zip", "pass dist/<model>/<target> or its .zip")
    return _validate_dir(path, path, artifact, threads, timeout_s, progress, None, gpu, arm64)


# --- zip ---------------------------------------------------------------------------------

_DRIVE = re.compile(r"^[A-Za-z]:")


def check_zip_entries(archive: zipfile.ZipFile, zip_path: Path) -> None:
    """Refuse entries that would land outside the extraction dir, before extracting anything."""
    seen: set[str] = set()
    for info in archive.infolist():
        name = info.filename
        why = None
        if name.startswith(("/", "\\")) or _DRIVE.match(name):
            why = "is an absolute path"
        elif "\\" in name:
            why = "contains a backslash"
        elif ".." in PurePosixPath(name).parts:
            why = "has a '..' component"
        elif stat_is_symlink(info):
            why = "is a symlink"
        elif name in seen:
            why = "appears twice"
        if why:
            raise BundleError(f"{zip_path}: entry {name!r} {why}; refusing to extract",
                              "the archive was not written by edgepack or was tampered with; rebuild the bundle")
        seen.add(name)


def stat_is_symlink(info: zipfile.ZipInfo) -> bool:
    return info.create_system == 3 and (info.external_attr >> 16) & 0o170000 == 0o120000


def extract_bundle_zip(zip_path: Path, scratch: Path) -> tuple[Path, str]:
    """Check and extract; return the bundle root (the zip's top folder, or the zip root) and the
    payload digest of the zip's entries. The manifest inside is read first and every other entry
    must be a file it checksums, at the size it records: nothing else is extracted."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
        raise BundleError(f"{zip_path}: not a readable zip ({exc})", "copy or rebuild the archive") from None
    with archive:
        check_zip_entries(archive, zip_path)
        names = [i.filename for i in archive.infolist() if not i.is_dir()]
        if MANIFEST in names:
            prefix = ""
        else:
            tops = {n.split("/", 1)[0] for n in names}
            if len(tops) != 1 or f"{next(iter(tops))}/{MANIFEST}" not in names:
                raise BundleError(f"{zip_path}: no manifest.json at the top or in a single top folder",
                                  "pass a zip written by edgepack build")
            prefix = next(iter(tops)) + "/"
        manifest = read_zip_manifest(archive, zip_path, prefix)
        keep = check_zip_against_manifest(archive.infolist(), manifest, zip_path, prefix)
        try:
            for info in keep:
                archive.extract(info, scratch)
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as exc:  # CRC errors, truncation
            raise BundleError(f"{zip_path}: cannot extract ({exc})", "copy or rebuild the archive") from None
        root = scratch / prefix.rstrip("/") if prefix else scratch
        digest = zip_payload_sha256(archive, prefix)
    return root, digest


# --- files -------------------------------------------------------------------------------

def verify_files(root: Path, manifest: Manifest) -> int:
    """Check the size and sha256 of every file the manifest lists (each confined to the bundle:
    no symlink, device or FIFO); the golden files a check reads must be among them. Returns how many."""
    if manifest.package is None:
        raise BundleError(f"{root}: the manifest is not sealed (no package section)", "rebuild the bundle")
    entries = checksummed_paths(manifest)
    needed = [manifest.golden.inputs, manifest.golden.reference_outputs]
    for art in manifest.artifacts:
        if art.golden is not None:
            needed += [art.golden.inputs, art.golden.outputs]
    for relative in needed:
        confined(root, relative)
        if relative not in entries:
            raise BundleError(f"{root / relative}: not checksummed by the manifest",
                              "every file validate reads must be in package.files; rebuild the bundle")
    for relative in sorted(entries):
        entry, path = entries[relative], confined(root, relative)
        size = path.stat().st_size
        if size != entry.bytes:
            raise BundleError(f"{path}: {size:,} bytes, the manifest records {entry.bytes:,}",
                              "the file was modified or damaged since the build; copy or rebuild the bundle")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise BundleError(f"{path}: checksum mismatch (sha256 {actual[:16]}..., manifest {entry.sha256[:16]}...)",
                              "the file was modified or damaged since the build; copy or rebuild the bundle")
    return len(entries)


def runnable(art: ArtifactEntry) -> bool:
    return bool(art.file and art.files and art.golden and art.io and art.parity)


# --- running -----------------------------------------------------------------------------

def _require_runtime(runtime: str, file: str) -> None:
    if not any(importlib.util.find_spec(m) is not None for m in RUNTIME_MODULES[runtime]):
        raise RuntimeUnavailable(f"{file} needs {runtime}, which is not installed here",
                                 f"pip install {RUNTIME_PACKAGES[runtime]}")


def _io_key(t: TensorIO | dict) -> tuple:
    d = t if isinstance(t, dict) else t.to_dict()
    return d["name"], d["dtype"], list(d["shape"]), d.get("scale"), d.get("zero_point")


def check_artifact(root: Path, manifest: Manifest, art: ArtifactEntry, threads: int,
                   timeout_s: float) -> ArtifactCheck:
    runtime = RUNTIME_FOR_FORMAT.get(art.format)
    if runtime is None:
        raise BundleError(f"{art.file}: unknown format {art.format!r}", "validate with the edgepack that built it")
    _require_runtime(runtime, art.file)
    golden = Golden.load(root, manifest, art)
    in_specs, out_specs, output_names = golden.in_specs, golden.out_specs, golden.output_names
    feeds, ref_rows, host = golden.feeds, golden.reference, golden.host
    with RuntimeSession(runtime, confined(root, art.file), threads, timeout_s) as session:
        got_in, got_out = [_io_key(t) for t in session.inputs], [_io_key(t) for t in session.outputs]
        if got_in != [_io_key(t) for t in in_specs] or got_out != [_io_key(t) for t in out_specs]:
            raise RuntimeCheckError(
                f"{art.file}: its IO in {runtime} {session.info.get('version', '')} ({got_in} -> {got_out}) "
                f"differs from the manifest ({[_io_key(t) for t in in_specs]} -> {[_io_key(t) for t in out_specs]})",
                f"validate with the runtime version that built it ({art.runtime} {art.runtime_version})")
        native = [session.run(x) for x in feeds]
        version = str(session.info.get("version", ""))
    outputs = [from_native(o, out_specs) for o in native]
    parity = compare(ref_rows, outputs, art.parity.get("thresholds") or {}, output_names, golden.score_outputs(art),
                     recorded_masks(root, manifest, art.parity.get("outputs") or [], len(ref_rows)))
    return ArtifactCheck(file=art.file, format=art.format, precision=art.precision, runtime=runtime,
                         runtime_version=version, parity=parity, host_agreement=agreement(native, host, out_specs))


def check_on_emulated_gpu(root: Path, manifest: Manifest, art: ArtifactEntry, threads: int, timeout_s: float,
                          say: Callable[[str], None]) -> GpuValidation:
    """A float .tflite through LiteRT's GPU accelerator on lavapipe, from the bundle alone: judged
    against the reference and against the build host's CPU-interpreter outputs, with the
    thresholds and GPU precision the build recorded (else the artifact's own thresholds and its
    precision as the GPU's arithmetic)."""
    _require_runtime("litert", art.file)
    golden = Golden.load(root, manifest, art)
    recorded = art.emulated_gpu
    thresholds = (recorded.parity if recorded is not None and recorded.parity else art.parity).get("thresholds") or {}
    precision = recorded.precision if recorded is not None and recorded.precision else art.precision
    job = GpuJob(confined(root, art.file), golden.feeds, golden.reference, golden.host_rows(), golden.output_names,
                 (golden.in_specs, golden.out_specs), golden.score_outputs(art),
                 sum((art.export.get("ops") or {}).values()) or None)
    record = check_on_gpu(job, precision=precision, tolerance=thresholds, threads=threads, timeout_s=timeout_s,
                          required=True, say=say)
    return GpuValidation(file=art.file, record=record)


def _validate_dir(root: Path, source: Path, artifact: str | None, threads: int | None, timeout_s: float,
                  progress: Callable[[str], None] | None, zip_payload: str | None, gpu: bool,
                  arm64: Arm64Request | None = None) -> ValidationResult:
    say = progress or (lambda message: None)
    manifest = load_bundle_manifest(root)
    count = verify_files(root, manifest)
    say(f"sha256 of {count} file(s) match the manifest")
    if zip_payload is not None and manifest.package is not None and zip_payload != manifest.package.payload_sha256:
        # Every listed file matched and no entry is unlisted, so the manifest's own digest is wrong.
        raise BundleError(f"{source}: payload_sha256 of the entries ({zip_payload[:16]}...) differs from the "
                          f"manifest's ({manifest.package.payload_sha256[:16]}...)", "rebuild the bundle")
    candidates = [a for a in manifest.artifacts if runnable(a)]
    if artifact is not None:
        chosen = [a for a in candidates if a.file == artifact]
        if not chosen:
            raise BundleError(f"{source}: no artifact {artifact!r}",
                              "choose one of: " + (", ".join(a.file for a in candidates) or "(none)"))
        candidates = chosen
    if not candidates:
        raise BundleError(f"{source}: the manifest lists no shipped artifact to validate", "rebuild the bundle")
    profile_threads = int(manifest.target.profile.get("device", {}).get("threads", 1))
    threads = threads or max(1, min(profile_threads, os.cpu_count() or 1))
    result = ValidationResult(source=source, manifest=manifest, files_verified=count)
    result.skipped = [f"{a.file or a.name + '.' + a.format}: status {a.status}, nothing to run"
                      for a in manifest.artifacts if not runnable(a) and artifact is None]
    on_gpu = [a for a in candidates if a.format == "tflite" and a.precision in GPU_CHECK_PRECISIONS] if gpu else []
    if gpu and not on_gpu:
        raise BundleError(f"{source}: --gpu runs float .tflite artifacts (fp16 or fp32) and this bundle has none"
                          + (f" named {artifact!r}" if artifact else ""), "validate without --gpu")
    for art in candidates:
        say(f"running {art.file} in {RUNTIME_FOR_FORMAT.get(art.format, art.format)}")
        result.artifacts.append(check_artifact(root, manifest, art, threads, timeout_s))
    for art in on_gpu:
        result.gpu.append(check_on_emulated_gpu(root, manifest, art, threads, timeout_s, say))
    if gpu:
        result.skipped += [f"{a.file}: --gpu runs float .tflite artifacts only" for a in candidates if a not in on_gpu]
    if arm64 is not None:
        settings = arm64.settings(manifest)
        result.arm64 = check_bundle(root, manifest, settings, say=say, only=artifact)
        if all(r.status == "skipped" for r in result.arm64.values()):
            reasons = "; ".join(sorted({r.reason or "" for r in result.arm64.values()}))
            raise BundleError(f"{source}: --arm64 has nothing to run: {reasons or 'no artifact'}",
                              "pass --executorch for .pte files, or validate without --arm64")
    return result


@dataclass
class Arm64Request:
    """`validate --arm64`: the CPU models (default: the profile's arm64_check, else A53 + A76) and
    whether .pte files run too (ExecuTorch under emulation is opt-in)."""

    cpus: list[str] | None = None
    executorch: bool = False

    def settings(self, manifest: Manifest) -> Arm64CheckSettings:
        recorded = manifest.target.profile.get("arm64_check") or {}
        try:
            settings = Arm64CheckSettings.model_validate(recorded)
        except ValidationError:  # a bundle from another edgepack: its settings are advice only
            settings = Arm64CheckSettings()
        runtimes = list(settings.runtimes) + (["executorch"] if self.executorch and "executorch" not in
                                              settings.runtimes else [])
        try:
            return settings.model_copy(update={"cpus": Arm64CheckSettings(cpus=self.cpus or settings.cpus).cpus,
                                               "runtimes": runtimes, "required": True, "count_instructions": False})
        except ValidationError as exc:
            raise BundleError(f"--cpu: {exc.errors()[0]['msg']}", "name qemu-aarch64 CPU models, e.g. "
                              "cortex-a53,cortex-a76") from None
