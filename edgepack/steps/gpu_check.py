"""The GPU code path of a mobile-GPU .tflite, checked without a phone: the artifact runs through
LiteRT's GPU accelerator (WebGPU via Dawn, on Vulkan: fp16 shaders, the kernels a phone's GPU
runs) on Mesa's lavapipe, a Vulkan driver that runs on the build host's CPU.

    record = check_on_gpu(job, precision="fp16", tolerance=..., threads=2, timeout_s=300, required=True, say=print)

Judged twice under the same thresholds (the profile's tolerances for the GPU's precision): against
the float reference, like every artifact, and against the LiteRT CPU interpreter's outputs of the
same file, so a GPU kernel that disagrees with the CPU one is caught even when both stay near the
reference. The record (bundle.EmulatedGpuCheck) says which accelerator and driver ran it, that it
is not a phone GPU driver, whether every op ran on the GPU and which fell back to the CPU, and the
emulated seconds (first run, which compiles the shaders unless Mesa's cache has them, and later
runs): host CPU time, not device time.

Used by the build (steps/judge.py, per artifact, when the profile's gpu_check is enabled) and by
`edgepack validate BUNDLE --gpu` (steps/validate.py, from the bundle alone). lavapipe is set up on
first use (emulators/lavapipe.py); when it cannot be, ``required`` decides: raise the
EmulatorUnavailable (exit 2) or return a record with status skipped and the reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..bundle import EmulatedGpuCheck
from ..emulators import lavapipe
from ..errors import EXIT_EXPORT_OR_RUNTIME, EmulatorUnavailable, RuntimeCheckError
from ..parity import ParityReport, compare
from ..runtimes.base import TensorIO, from_native
from ..runtimes.litert_gpu import ACCELERATOR
from ..runtimes.session import RuntimeSession

RUNTIME = "litert_gpu"
TIME_LABEL = ("emulated: LiteRT's GPU kernels on lavapipe, on the build host's CPU; not device time. first_run "
              "includes compiling the shaders (unless Mesa's on-disk shader cache already had them)")


@dataclass
class GpuJob:
    """One .tflite and what it is judged against, per sample."""

    path: Path
    feeds: list[list[np.ndarray]]  # exactly what the artifact takes (its golden inputs)
    reference: list[list[np.ndarray]]  # the float reference's outputs (model level)
    cpu_outputs: list[list[np.ndarray]]  # the LiteRT CPU interpreter's outputs of the same file
    output_names: list[str]  # the model's output names, in order
    io: tuple[list[TensorIO], list[TensorIO]]  # the artifact's inputs and outputs, as the interpreter saw them
    score_outputs: list[str] | None = None  # class-score outputs (None: decide from the shapes)
    total_ops: int | None = None  # ops in the .tflite's graph, when known


def check_on_gpu(job: GpuJob, *, precision: str, tolerance: dict, threads: int, timeout_s: float, required: bool,
                 say: Callable[[str], None]) -> EmulatedGpuCheck:
    """Run the job on LiteRT's GPU accelerator over lavapipe and judge it (see the module doc).
    Raises RuntimeCheckError when the accelerator or the driver fails; EmulatorUnavailable when
    lavapipe cannot be set up and ``required``."""
    try:
        driver = lavapipe.ensure(say)
    except EmulatorUnavailable as exc:
        if required:
            raise
        return EmulatedGpuCheck(status="skipped", reason=f"{exc.message} (hint: {exc.hint})", accelerator=ACCELERATOR,
                                precision=precision)
    name = job.path.name
    say(f"running {name} on LiteRT's GPU accelerator ({precision}) over {driver.device.get('driver_info')}")
    times = []
    with RuntimeSession(RUNTIME, job.path, threads, timeout_s, env=driver.environment(),
                        options={"precision": precision}) as session:
        _check_io(name, job.io, session)
        native = []
        for feeds in job.feeds:
            started = time.perf_counter()
            native.append(session.run(feeds))
            times.append(time.perf_counter() - started)
        load_s, info = session.load_ms / 1000, session.info
    outputs = [from_native(o, session.outputs) for o in native]
    parity = compare(job.reference, outputs, tolerance, job.output_names, job.score_outputs)
    agreement = compare(job.cpu_outputs, outputs, tolerance, job.output_names, job.score_outputs)
    passed = parity.passed and agreement.passed
    fully = bool(info.get("fully_accelerated"))
    on_cpu = 0 if fully else info.get("ops_on_cpu")
    on_gpu = job.total_ops if fully else info.get("ops_on_gpu")
    device = info.get("vulkan_device") or {}
    return EmulatedGpuCheck(
        status="passed" if passed else "failed",
        reason=None if passed else _failure(parity, agreement),
        accelerator=f"{info.get('accelerator', ACCELERATOR)} (ai-edge-litert {info.get('version', '')})",
        precision=precision,
        driver={**driver.describe(), "seen_by_the_runtime": {"device": device.get("name"),
                                                             "driver_info": device.get("driver_info"),
                                                             "dawn_adapter": info.get("adapter")}},
        fully_accelerated=fully, fallback_ops=info.get("fallback_ops") or {},
        ops={"total": job.total_ops, "on_gpu": on_gpu, "on_cpu": on_cpu},
        parity=parity.to_dict(), cpu_agreement=agreement.to_dict(),
        seconds={"label": TIME_LABEL, "load": round(load_s, 3), "first_run": round(times[0], 4) if times else None,
                 "later_runs_p50": round(float(np.median(times[1:])), 4) if len(times) > 1 else None,
                 "later_runs": max(0, len(times) - 1)},
    )


def _check_io(name: str, expected: tuple[list[TensorIO], list[TensorIO]], session: RuntimeSession) -> None:
    def key(specs: list[TensorIO]) -> list[tuple]:
        return [(t.name, t.dtype, list(t.shape)) for t in specs]

    inputs, outputs = expected
    if key(session.inputs) != key(inputs) or key(session.outputs) != key(outputs):
        raise RuntimeCheckError(
            f"{name}: its IO on LiteRT's GPU accelerator ({key(session.inputs)} -> {key(session.outputs)}) differs from "
            f"the CPU interpreter's ({key(inputs)} -> {key(outputs)})",
            "the GPU check takes float-IO .tflite files (fp16 or fp32 weights); report this with the message")


def _failure(parity: ParityReport, agreement: ParityReport) -> str:
    parts = []
    if not parity.passed:
        parts.append("vs the float reference: " + "; ".join(f for o in parity.outputs for f in o.failures))
    if not agreement.passed:
        parts.append("vs the CPU interpreter: " + "; ".join(f for o in agreement.outputs for f in o.failures))
    return " | ".join(parts)


def summary(record: EmulatedGpuCheck) -> str:
    """One paragraph for a build's failure list or a validate table note."""
    if record.status == "skipped":
        return f"GPU path skipped: {record.reason}"
    text = f"GPU path ({record.precision} on {(record.driver or {}).get('name', 'an emulated GPU')}): {record.status}"
    if record.reason:
        text += f": {record.reason}"
    if record.fallback_ops:
        text += f"; ops left to the CPU: {', '.join(record.fallback_ops)}"
    return text


def fallback_warning(file: str, record: EmulatedGpuCheck) -> str | None:
    """A build warning when LiteRT's GPU accelerator does not take the whole graph (on a phone,
    the CPU share is what makes a mobile-GPU artifact slow)."""
    if record.status == "skipped" or record.fully_accelerated:
        return None
    ops = record.ops or {}
    listed = ", ".join(f"{op} ({'; '.join(why) or 'no reason given'})" for op, why in record.fallback_ops.items())
    return (f"{file}: LiteRT's GPU accelerator runs {ops.get('on_gpu')} op(s) and leaves {ops.get('on_cpu')} to the "
            f"CPU: {listed or 'ops not named in its log'}")


def judge_on_gpu(judge: Any, label: str, job: GpuJob, precision: str, cpu_passed: bool) -> EmulatedGpuCheck:
    """The artifact on LiteRT's GPU accelerator over lavapipe (check_on_gpu); what it
    finds beyond a failed parity (ops left to the CPU, a skip) goes to the build's warnings."""
    settings = judge.profile.gpu_check
    if not cpu_passed:
        return EmulatedGpuCheck(status="skipped", precision=settings.precision,
                                reason="its parity in the CPU interpreter failed first")
    judge.say(f"checking {job.path.name} on a GPU code path (LiteRT's GPU accelerator on lavapipe)")
    try:
        record = check_on_gpu(job, precision=settings.precision,
                              tolerance=judge.profile.tolerance_for(settings.tolerance_key(precision)).model_dump(),
                              threads=judge.threads, timeout_s=judge.timeout_s, required=settings.required,
                              say=judge.say)
    except RuntimeCheckError as exc:
        if not judge.keep_going:
            raise
        judge.findings.fail(f"{label}: on LiteRT's GPU accelerator: {exc.message}", EXIT_EXPORT_OR_RUNTIME)
        return EmulatedGpuCheck(status="failed", precision=settings.precision, reason=f"runtime error: {exc.message}")
    if record.status == "skipped":
        judge.findings.warnings.append(f"{job.path.name}: {summary(record)}")
    warning = fallback_warning(job.path.name, record)
    if warning:
        judge.findings.warnings.append(warning)
    return record
