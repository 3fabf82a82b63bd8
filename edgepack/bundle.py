"""The bundle on disk: manifest (pydantic + JSON Schema), golden I/O, atomic write.

A bundle is built in a temp dir beside its destination and renamed into place, so a failed
or interrupted build never leaves half a bundle and never removes the last good one.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MANIFEST_SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "manifest.schema.json"


def _parity_record(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """The parts of a recorded parity that validate reads must have their recorded shape: thresholds
    a mapping of numbers, outputs a list of objects that name their output. A bundle is hostile
    input, and a wrong type here must be a manifest error, not a crash mid-check."""
    if value is None:
        return value
    thresholds = value.get("thresholds")
    if thresholds is not None and not (isinstance(thresholds, dict) and all(
            v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in thresholds.values())):
        raise ValueError("parity.thresholds must map threshold names to numbers")
    outputs = value.get("outputs")
    if outputs is not None and not (isinstance(outputs, list) and all(
            isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs)):
        raise ValueError("parity.outputs must be a list of objects, each with its output's name")
    return value


ParityRecord = Annotated[dict[str, Any] | None, AfterValidator(_parity_record)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TensorSpec(_Strict):
    name: str
    shape: list[int]
    dtype: str
    scale: float | None = None
    zero_point: int | None = None


class FileEntry(_Strict):
    path: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ArtifactIO(_Strict):
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class GoldenFiles(_Strict):
    inputs: str
    outputs: str


class ReproducibilityCheck(_Strict):
    """Whether exporting the same model twice gives the same bytes (package.check_reproducible)."""

    reproducible: bool
    method: str
    files: list[str] = Field(default_factory=list)
    differing: list[str] = Field(default_factory=list)
    detail: str | None = None


_Text = Annotated[str, Field(max_length=400)]
_Ms = Annotated[float, Field(ge=0.0)]


class DeviceFigures(BaseModel):
    """Latency figures one device run measured: the fields a device report's ``latency`` and
    the manifest's ``device_latency`` share (one schema for both). Finite, non-negative and
    bounded: a report is untrusted input."""

    model_config = ConfigDict(allow_inf_nan=False)
    tool: _Text
    runtime: _Text | None = None
    runtime_version: _Text | None = None
    threads: int | None = Field(default=None, ge=1, le=1024)
    warmup: int | None = Field(default=None, ge=0, le=10_000_000)
    runs: int | None = Field(default=None, ge=1, le=100_000_000)
    p50_ms: _Ms | None = None
    p90_ms: _Ms | None = None
    min_ms: _Ms | None = None
    mean_ms: _Ms | None = None


class DeviceLatency(DeviceFigures):
    """Latency measured on a real device (``edgepack ingest`` of a device_report.json)."""

    model_config = ConfigDict(extra="forbid")
    source: Literal["device"] = "device"
    device: dict[str, Any]
    budget_statistic: Literal["p50_ms", "mean_ms"]
    parity_passed: bool | None = None
    budgets: dict[str, Any] | None = None
    report_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


# --- the device report (written by device/validate.py or device/run_android.sh) ------------

REPORT_KIND = "edgepack-device-report"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # newer kits may add fields


class ReportLatency(DeviceFigures):
    model_config = ConfigDict(extra="ignore")
    source: Literal["device"]


class ReportArtifact(_Lenient):
    file: _Text
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    # passed / parity-failed: validate.py checked parity; measured: latency only (benchmark tools)
    status: Literal["passed", "parity-failed", "measured", "skipped", "error"]
    reason: Annotated[str, Field(max_length=4000)] | None = None
    runtime: _Text | None = None
    runtime_version: _Text | None = None
    parity: dict[str, Any] | None = None
    latency: ReportLatency | None = None


class DeviceReport(_Lenient):
    schema_version: Literal[1]
    kind: Literal["edgepack-device-report"]
    created_by: _Text
    created_at: _Text | None = None
    bundle: dict[str, Any] | None = None
    device: dict[str, Any] = {}
    artifacts: list[ReportArtifact] = Field(default_factory=list, max_length=256)
    error: Annotated[str, Field(max_length=4000)] | None = None


class EmulatedGpuCheck(_Strict):
    """A .tflite run on a GPU code path without a phone: LiteRT's GPU accelerator (fp16 shaders)
    on an emulated Vulkan GPU (steps/gpu_check.py). Not a phone GPU driver; emulated time is not
    device time."""

    status: Literal["passed", "failed", "skipped"]
    reason: str | None = None  # why it was skipped or failed
    accelerator: str | None = None  # LiteRT GPU accelerator: WebGPU (Dawn) on Vulkan
    precision: Literal["fp16", "fp32"] | None = None  # the GPU's arithmetic
    driver: dict[str, Any] | None = None  # name, version, device, packages, not_a_phone_gpu_driver
    fully_accelerated: bool | None = None
    # ops LiteRT's GPU accelerator left to the CPU (op -> its reasons): on a phone, the slow part
    fallback_ops: dict[str, list[str]] = Field(default_factory=dict)
    ops: dict[str, int | None] | None = None  # total, on_gpu, on_cpu
    parity: ParityRecord = None  # vs the float reference, thresholds of tolerances[tolerance]
    cpu_agreement: dict[str, Any] | None = None  # vs the LiteRT CPU interpreter's outputs, same thresholds
    seconds: dict[str, Any] | None = None  # emulated on the build host's CPU, labelled so


class EmulatedArm64Run(_Strict):
    """The device kit run on one emulated arm64 CPU model (steps/arm64_check.py)."""

    cpu: str  # qemu's -cpu model, e.g. cortex-a76
    status: Literal["passed", "failed"]
    reason: str | None = None
    features: list[str] = Field(default_factory=list)  # what the guest's /proc/cpuinfo lists
    kernel_family: dict[str, Any] = Field(default_factory=dict)  # family, from_feature, inferred: true
    runtime: str | None = None
    runtime_version: str | None = None
    parity: dict[str, Any] | None = None  # vs the float reference, the build's thresholds
    bit_identical: bool | None = None  # outputs equal the build host's (golden/<file>.outputs.npz), every value
    host_agreement: dict[str, Any] | None = None  # per output: identical, max_abs_diff, mismatched_values
    seconds: dict[str, Any] | None = None  # wall time of the emulated run, labelled: not device time
    # with a build cache: hit (the outputs were stored by an earlier run and judged again here), key,
    # when and on which host the run was emulated (its seconds are that run's)
    cache: dict[str, Any] | None = None


class EmulatedArm64Check(_Strict):
    """An artifact run on real arm64 code under qemu-aarch64 user mode, per CPU model. Records no
    latency: emulated time is not device time."""

    status: Literal["passed", "failed", "skipped"]
    reason: str | None = None
    emulator: dict[str, Any] | None = None  # qemu version and package, the guest's Python, its wheels
    runs: list[EmulatedArm64Run] = Field(default_factory=list)
    # executed aarch64 instructions per inference, with the float sibling's under the same CPU model
    instructions: dict[str, Any] | None = None


class ArtifactEntry(_Strict):
    name: str
    format: str
    precision: str
    # ok; parity-failed / budget-exceeded / slower-than-float fail the build; failed: no artifact
    # (export or runtime error, with --keep-going); replaced-by-float: profile said keep_float;
    # not-validated: exported and shipped, but its runtime cannot run it on the build host (the
    # config's device_only says why, e.g. a Vulkan .pte), so it has no parity, latency or golden
    # outputs: it does not fail the build, and the notes say it is unchecked.
    status: Literal["ok", "parity-failed", "budget-exceeded", "slower-than-float", "replaced-by-float", "failed",
                    "not-validated"]
    error: str | None = None
    file: str | None = None
    files: list[FileEntry] = Field(default_factory=list)
    bytes: int | None = None
    zip_bytes: int | None = None
    sha256: str | None = None
    runtime: str | None = None
    runtime_version: str | None = None
    config: dict[str, Any]
    export: dict[str, Any] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    io: ArtifactIO | None = None
    golden: GoldenFiles | None = None
    parity: ParityRecord = None
    latency: dict[str, Any] | None = None
    size: dict[str, Any] | None = None
    accuracy: dict[str, float] | None = None
    budgets: dict[str, Any] | None = None
    reproducible: ReproducibilityCheck | None = None
    device_latency: DeviceLatency | None = None
    emulated_gpu: EmulatedGpuCheck | None = None
    emulated_arm64: EmulatedArm64Check | None = None


class ModelInfo(_Strict):
    name: str
    source: str
    source_sha256: str
    params: int
    nonzero_params: int
    macs: int
    bytes: int
    notes: list[str] = Field(default_factory=list)


class TargetInfo(_Strict):
    name: str
    source: str
    profile_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    profile: dict[str, Any]


class ReferenceInfo(_Strict):
    format: Literal["onnx"] = "onnx"
    precision: Literal["fp32"] = "fp32"
    runtime: Literal["onnxruntime"] = "onnxruntime"
    runtime_version: str
    bytes: int
    torch_parity: dict[str, Any]
    latency: dict[str, Any] | None = None


class GoldenInfo(_Strict):
    inputs: str
    reference_outputs: str
    samples: int = Field(ge=1)
    # where the parity set came from: the first calibration samples, then the held-out ones
    calibration_samples: int | None = Field(default=None, ge=0)
    holdout_samples: int | None = Field(default=None, ge=0)


class PackageInfo(_Strict):
    """What the bundle ships besides manifest.json, and a digest of it that is stable across builds."""

    files: list[FileEntry]
    payload_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    payload_sha256_method: str
    kit: list[str] = Field(default_factory=list)
    device_report_schema_version: int = 1


class DeviceMeasurement(_Strict):
    """One device_report.json merged by ``edgepack ingest``."""

    report: str
    report_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_by: str
    created_at: str | None = None
    ingested_at: str
    device: dict[str, Any]
    passed: bool
    failures: list[str] = Field(default_factory=list)
    artifacts: list[dict[str, Any]] = Field(default_factory=list)


class Manifest(_Strict):
    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    status: Literal["passed", "failed"]
    failures: list[str] = Field(default_factory=list)
    warnings: list[str] = Field(default_factory=list)
    edgepack_version: str
    model: ModelInfo
    target: TargetInfo
    io: ArtifactIO
    stages: list[dict[str, Any]] = Field(default_factory=list)
    reference: ReferenceInfo
    artifacts: list[ArtifactEntry]
    accuracy: dict[str, Any] = Field(default_factory=dict)
    golden: GoldenInfo
    toolchain: dict[str, str]
    host: dict[str, Any]
    package: PackageInfo | None = None
    device_measurements: list[DeviceMeasurement] = Field(default_factory=list)
    # wall time of each build step, in the order the build took them (host-dependent)
    timings: list[dict[str, Any]] = Field(default_factory=list)
    # the build cache: enabled, its directory, per export (file, key, hit) and whether all hit
    cache: dict[str, Any] = Field(default_factory=dict)
    # the build's peak memory on the build host (PSS of its process tree) and how it was sampled
    resources: dict[str, Any] = Field(default_factory=dict)


def manifest_json_schema() -> dict:
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "edgepack bundle manifest"
    return schema


def load_json_schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_entry(path: Path, root: Path) -> FileEntry:
    return FileEntry(path=path.relative_to(root).as_posix(), bytes=path.stat().st_size, sha256=sha256_file(path))


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Deterministic .npz (fixed zip timestamps come from numpy; keys keep insertion order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def stack_samples(samples: list[list[np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    """Per-sample arrays -> one array per name, a row per sample (the golden .npz layout)."""
    return {name: np.stack([s[i] for s in samples]) for i, name in enumerate(names)}


def write_manifest(path: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False) + "\n"
    path.write_text(text)


# --- atomic placement --------------------------------------------------------------------

def staging_dir(dest: Path) -> Path:
    """A fresh temp dir beside ``dest`` (same filesystem, so the final rename is atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    return path


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2). Returns False where unsupported."""
    try:  # the symbols this process already has (libc's among them): find_library("c") runs ldconfig
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return False
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def commit_dir(staged: Path, dest: Path) -> None:
    """Put ``staged`` at ``dest`` whole. Readers see the old bundle or the new one, never a mix;
    when two builds race, the last one to commit wins whole."""
    if not dest.exists():
        try:
            os.rename(staged, dest)
            return
        except OSError as exc:  # another build landed first: swap with it instead
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if _exchange(staged, dest):
        shutil.rmtree(staged)  # ``staged`` now holds the previous bundle
        return
    # No atomic exchange on this system: move the old bundle aside, then rename.
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(dest, old)
    except FileNotFoundError:
        old = None
    os.rename(staged, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def commit_file(staged: Path, dest: Path) -> None:
    os.replace(staged, dest)
