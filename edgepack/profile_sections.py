"""The sections of a target profile (target.py assembles them into TargetProfile): the device,
parity tolerances, budgets, and the fallback, parity-sample, latency, GPU-check and arm64-check
settings.
Each is a strict pydantic model: unknown keys and out-of-range values are errors."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from . import costmodel
from .emulators import qemu

Precision = Literal["fp32", "fp16", "int8", "int8-dynamic", "int4-weight"]
PRECISIONS: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-dynamic", "int4-weight")


Int8Isa = Literal["avx2", "avx512_vnni", "avx_vnni", "amx_int8", "dotprod", "i8mm"]
VNNI_ISA = ("avx512_vnni", "avx_vnni", "amx_int8")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CpuSpec(_Strict):
    """The arm64 CPU the runtime's threads run on: what the calibrated latency estimate needs
    (costmodel.calibrated_ms; fitted on published phone latencies, costmodel_fit.json)."""

    core: str = Field(description="core type the fit knows, e.g. cortex-a76 (costmodel_fit.json 'cores')")
    ghz: list[Annotated[float, Field(gt=0, le=6)]] = Field(min_length=1, max_length=64,
                                                           description="clock of each core a thread runs on")
    int8_kernels: Literal["sdot", "smlal"] = Field(
        default="sdot", description="int8 kernel family the runtime runs: sdot (dot product) or smlal (NEON, without)")

    @field_validator("core")
    @classmethod
    def _known_core(cls, core: str) -> str:
        known = sorted(costmodel.load_fit()["cores"])
        if core not in known:
            raise ValueError(f"the latency fit knows the cores {known}, not {core!r}")
        return core


class DeviceSpec(_Strict):
    arch: str = Field(description="CPU architecture, e.g. arm64-v8a, x86_64")
    cores: int = Field(ge=1)
    threads: int = Field(ge=1, description="threads the runtimes use, on the device and in host checks")
    peak_gops: dict[Literal["fp32", "fp16", "int8", "int4"], Annotated[float, Field(gt=0)]] = Field(
        description="peak giga-ops/s per precision (1 MAC = 2 ops), for the latency estimate")
    memory_gbps: float = Field(gt=0, description="sustained memory bandwidth, GB/s")
    ram_mb: int = Field(gt=0)
    accelerator: str | None = None
    int8_isa: list[Int8Isa] | None = Field(
        default=None, description="the int8 instructions the device class has (x86: avx2, avx512_vnni, avx_vnni, "
        "amx_int8; arm64: dotprod, i8mm); the int8 recipe follows them and the manifest says whether the build "
        "host has the same, so host latency from another class is labelled as such")

    cpu: CpuSpec | None = None  # arm64 cores for the calibrated latency estimate (else the roofline)

    @property
    def has_vnni(self) -> bool:
        """u8 x s8 dot products accumulate in int32 (no int16 saturation): reduce_range is not needed."""
        return bool(set(self.int8_isa or ()) & set(VNNI_ISA))


class Tolerance(_Strict):
    """Parity thresholds. Every threshold given must hold; float paths use atol/rtol,
    quantized paths use cosine, SQNR and top-1 agreement."""

    atol: float | None = Field(default=None, ge=0)
    rtol: float | None = Field(default=None, ge=0)
    min_cosine: float | None = Field(default=None, ge=-1.0, le=1.0)
    min_sqnr_db: float | None = Field(default=None, ge=-50.0, le=200.0)
    min_top1_agreement: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _something_checked(self) -> "Tolerance":
        if all(v is None for v in self.model_dump().values()):
            raise ValueError("a tolerance must set at least one threshold")
        if (self.atol is None) != (self.rtol is None):
            raise ValueError("atol and rtol go together: set both or neither")
        return self


# Float artifacts are judged by these when the profile has no fp32 tolerance (the reference check,
# an fp32 artifact shipped because int8 had nothing to quantize).
DEFAULT_FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999}


class Budgets(_Strict):
    """Per-artifact limits, and the one rule that judges them (build, fallback steps, ingest)."""

    max_bytes: int | None = Field(default=None, gt=0, description="per artifact, all its files")
    max_latency_ms: float | None = Field(default=None, gt=0, description="p50, per artifact")
    max_ratio_to_float: float | None = Field(
        default=None, gt=0, description="per artifact: its bytes over the float model's (ONNX) bytes; 1.0 "
                                        "fails any artifact the recipe made larger than float")

    def failures(self, total_bytes: int | None, latency_ms: float | None, latency_label: str = "host p50",
                 ratio_to_float: float | None = None) -> list[str]:
        """What ``total_bytes`` / ``latency_ms`` / ``ratio_to_float`` exceed. A budget never passes
        on missing data: a limit whose figure is None (or not a finite number) fails, saying so."""
        found = []
        if self.max_ratio_to_float is not None:
            if ratio_to_float is None or not math.isfinite(ratio_to_float):
                found.append("no size ratio to judge max_ratio_to_float against")
            elif ratio_to_float > self.max_ratio_to_float:
                found.append(f"{ratio_to_float:.3f}x the float bytes > max_ratio_to_float {self.max_ratio_to_float}")
        if self.max_bytes is not None:
            if total_bytes is None:
                found.append("no size to judge max_bytes against")
            elif total_bytes > self.max_bytes:
                found.append(f"{total_bytes} bytes > max_bytes {self.max_bytes}")
        if self.max_latency_ms is not None:
            if latency_ms is None or not math.isfinite(latency_ms):
                found.append(f"no {latency_label} latency to judge max_latency_ms against")
            elif latency_ms > self.max_latency_ms:
                found.append(f"{latency_label} {latency_ms:.3f} ms > max_latency_ms {self.max_latency_ms}")
        return found

    def check(self, total_bytes: int | None, latency_ms: float | None, /, latency_source: str = "host",
              latency_label: str = "host p50", ratio_to_float: float | None = None, **figures: Any) -> dict | None:
        """The manifest's budgets record (None when the profile sets no budget): the limits, where
        the latency came from, ``figures`` (e.g. the statistic used), passed and failures."""
        if self.max_bytes is None and self.max_latency_ms is None and self.max_ratio_to_float is None:
            return None
        failures = self.failures(total_bytes, latency_ms, latency_label, ratio_to_float)
        record = {"max_bytes": self.max_bytes, "max_latency_ms": self.max_latency_ms}
        if self.max_ratio_to_float is not None:
            record.update(max_ratio_to_float=self.max_ratio_to_float, ratio_to_float=ratio_to_float)
        return {**record, "latency_source": latency_source, **figures, "passed": not failures, "failures": failures}


class FallbackSettings(_Strict):
    """How far the int8 fallback may go (on_parity_failure: fallback; analysis/fallback.py)."""

    max_steps: int = Field(default=6, ge=1, le=64, description="re-exports at most")
    group_size: int = Field(default=2, ge=1, le=64, description="layers moved to fp32 per step")
    max_float_layers: int | None = Field(default=None, ge=1, description="never keep more layers in fp32")
    diagnosis_samples: int = Field(default=4, ge=1, le=256, description="calibration samples the ranking uses")


class ParitySettings(_Strict):
    calibration_samples: int = Field(default=16, ge=0, le=10_000, description="calibration samples in the parity set")
    holdout_samples: int = Field(default=16, ge=0, le=10_000, description="held-out samples in the parity set")

    @model_validator(mode="after")
    def _nonempty(self) -> "ParitySettings":
        if self.calibration_samples + self.holdout_samples == 0:
            raise ValueError("the parity set needs at least one sample")
        return self


class LatencySettings(_Strict):
    warmup: int = Field(default=5, ge=0, le=10_000)
    runs: int = Field(default=30, ge=20, le=100_000)
    # A quantized artifact vs its float sibling: both loaded at once, timed in alternating rounds
    # of ``runs`` each (steps/speed.py).
    comparison_rounds: int = Field(default=6, ge=2, le=1_000)


class GpuCheckSettings(_Strict):
    """Run each float .tflite through LiteRT's GPU accelerator, the code path a phone's GPU runs,
    on Mesa's lavapipe (a Vulkan driver on the build host's CPU, set up on first use), and judge
    it against the float reference and against the CPU interpreter (steps/gpu_check.py)."""

    enabled: bool = False
    # fp16: the GPU accelerator's default arithmetic, as on phones; fp32 (enforce_f32): a tight
    # functional check (1.1e-5 from the CPU interpreter on the digits CNN, vs 2.6e-2 for fp16).
    precision: Literal["fp16", "fp32"] = "fp16"
    # the entry of `tolerances` that judges the GPU outputs (default: fp16 when the GPU computes in
    # fp16 or the artifact has fp16 weights, else fp32)
    tolerance: Precision | None = None
    # when the emulator cannot be set up (download refused, host not Linux x86-64 / Debian 12):
    # true fails the build (exit 2); false records `skipped: <reason>` and warns
    required: bool = True

    def tolerance_key(self, artifact_precision: str) -> str:
        if self.tolerance is not None:
            return self.tolerance
        return "fp16" if "fp16" in (self.precision, artifact_precision) else "fp32"


GPU_CHECK_PRECISIONS = ("fp16", "fp32")  # .tflite artifacts of these precisions take the GPU check
Arm64Runtime = Literal["litert", "onnxruntime", "executorch"]
Arm64Cpu = Literal[qemu.CPU_MODELS]  # type: ignore[valid-type]


class Arm64CheckSettings(_Strict):
    """Run the bundle's own device kit (device/validate.py) on real arm64 code under qemu-aarch64,
    once per CPU model, after the bundle is sealed (steps/arm64_check.py): parity against the float
    reference, bit-identity with the build host's outputs, the kernel family the CPU's features
    select. Emulated time is never recorded as latency."""

    enabled: bool = False
    # A low-end class without dot product (A53/A55 cores: NEON SMLAL int8 kernels) and a current
    # one with it (A76: SDOT). cortex-a710 adds i8mm (SMMLA) kernels; max adds SME.
    cpus: list[Arm64Cpu] = Field(default_factory=lambda: ["cortex-a53", "cortex-a76"], min_length=1)
    # ExecuTorch is opt-in: PyPI's aarch64 torch is the CUDA build (2.7 GB of wheels, one emulated
    # import ~52 s)
    runtimes: list[Arm64Runtime] = Field(default_factory=lambda: ["litert", "onnxruntime"], min_length=1)
    # Artifacts of these precisions must give the build host's outputs bit for bit (integer kernels
    # differ per instruction set but not in their results: measured identical on a53/a76/a710/max);
    # others record how far they are (float accumulation order differs: ~1e-5 on logits).
    identical: list[Precision] = Field(default_factory=lambda: ["int8"])
    # Executed aarch64 instructions per inference of each artifact and of its float sibling, under
    # count_cpu: needs the plugin-enabled qemu (`edgepack arm64-setup --counts`, built once, minutes)
    count_instructions: bool = False
    count_cpu: Arm64Cpu = "cortex-a76"
    count_inferences: int = Field(default=4, ge=1, le=1000, description="per inference = (c(2N) - c(N)) / N")
    timeout_s: float = Field(default=900.0, gt=0, le=86_400, description="per emulated run of the kit")
    # when the emulator cannot be set up (download refused, host not Linux x86-64): true fails the
    # build (exit 2); false records `skipped: <reason>` and warns
    required: bool = True

    @field_validator("cpus", "runtimes")
    @classmethod
    def _no_repeats(cls, values: list) -> list:
        if len(set(values)) != len(values):
            raise ValueError(f"names {values} repeat")
        return values
