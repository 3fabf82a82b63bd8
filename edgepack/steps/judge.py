"""Judge one artifact: export it, run it in its own runtime on the parity set, compare with the
float reference, check the budgets, write its golden I/O, and, when the profile says
``on_parity_failure: fallback``, keep its worst layers in fp32 until parity passes.

    judge = ArtifactJudge(profile, ctx, staged, reference, findings, say, threads, ...)
    entry = judge.judge(config)          # an ArtifactEntry for the manifest

With ``on_static_int8_failure: dynamic``, a static int8 artifact that still fails parity is
exported again as int8-dynamic, judged by the int8 thresholds, and shipped if it passes.

The entry's status says parity-failed / budget-exceeded; judge() records those (and, with
--keep-going, export or runtime errors) in ``findings``, which the build turns into its exit
code. The order of a build is pipeline.py's; this module knows one artifact at a time.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import bundle as bundle_mod
from .. import package
from ..analysis.fallback import FallbackStep, run_fallback, supports_fallback, try_record, with_float_layers
from ..bundle import ArtifactEntry, ArtifactIO, GoldenFiles, ReproducibilityCheck, stack_samples
from ..cache import BuildCache, computed, digest_files
from ..costmodel import estimate_latency
from ..errors import (EXIT_EXPORT_OR_RUNTIME, EXIT_OK, EXIT_PARITY_OR_BUDGET, ExportError,
                      NothingToQuantize, RuntimeCheckError)
from ..export import RUNTIME_FOR_FORMAT, registry as exporter_registry
from ..export.base import ExportContext, ExportResult
from ..measure import latency_summary, zip_bytes
from ..parity import compare, headline
from ..runtimes import forkserver
from ..target import GPU_CHECK_PRECISIONS
from .gpu_check import GpuJob, judge_on_gpu
from .gpu_check import summary as gpu_summary
from .lane import defer_reproducibility
from .runs import run_artifact


@dataclass
class Findings:
    """What a build found so far: failures (each with the exit code it implies) and warnings."""

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    exit_code: int = EXIT_OK

    debug: bool = False  # --debug: a recorded failure also prints its traceback

    def fail(self, message: str, code: int, exc: BaseException | None = None) -> None:
        self.failures.append(message)
        self.exit_code = max(self.exit_code, code)
        if self.debug and exc is not None:
            traceback.print_exception(exc)


@dataclass
class Reference:
    """The float reference on the parity set: what every artifact is judged against."""

    inputs: list[list[np.ndarray]]  # per sample, the model-level inputs
    outputs: list[list[np.ndarray]]  # per sample, the float ONNX outputs (onnxruntime)
    output_names: list[str]
    bytes: int  # the float ONNX's bytes, for size ratios
    # output name -> (input name, per-sample masks): judged only where the mask is nonzero
    masks: dict[str, tuple[str, list[np.ndarray]]] | None = None


def isolated(ctx: ExportContext, **changes: Any) -> ExportContext:
    """The context with a private copy of the model: exporters are plugins, and whatever one
    does to the module it is given (torch.export shares its parameters with the graph it
    captures), every artifact must start from the model the reference was made from."""
    return dataclasses.replace(ctx, model=copy.deepcopy(ctx.model), **changes)


# on_static_int8_failure: dynamic ships the int8-dynamic form only if it is at most this much larger
# than the static artifact: XNNPACK's dynamic quantizer leaves convolutions fp32, so a CNN's
# "int8-dynamic" .pte is mostly float (MobileNetV2: 3.9x the static .pte's bytes), while a
# transformer's is as small as its static form (all-MiniLM-L6-v2: 1.00x .pte, 0.99x .tflite and .onnx).
DYNAMIC_MAX_GROWTH = 1.25


@dataclass
class ArtifactJudge:
    profile: Any  # TargetProfile
    ctx: ExportContext
    staged: Path  # the bundle being built
    reference: Reference
    findings: Findings
    say: Callable[[str], None]
    threads: int
    timeout_s: float = 300.0
    keep_going: bool = False
    check_reproducible: bool = True
    evaluate: Callable[..., dict[str, float]] | None = None
    score_outputs: list[str] | None = None
    cache: BuildCache | None = None
    cache_parts: dict[str, Any] = field(default_factory=dict)  # the build's inputs, for every export key
    evaluate_key: str | None = None  # the spec file's sha256: evaluate() through an artifact is replayed only with it
    cache_log: list[dict[str, Any]] = field(default_factory=list)  # per export: file, key, hit
    lane: Any = None  # ExportLane (steps/lane.py): fp32 baselines and second exports run there
    deferred: list[tuple] = field(default_factory=list)  # (entry, lane job, workdir, cache key) to compare
    paused: list[tuple] = field(default_factory=list)  # runtime servers an export stopped, started after its run

    def export(self, config: Any, ctx: ExportContext, check_reproducible: bool = False,
               pause_runtimes: bool = True) -> tuple[ExportResult, ReproducibilityCheck | None]:
        """Export ``config`` into ``ctx.workdir``, through the build cache when there is one: a
        stored export (same model bytes, inputs, settings, toolchain and edgepack source) is copied
        in instead, with its reproducibility result. An export run here stops the other runtimes'
        idle servers (ready_runtimes) unless ``pause_runtimes`` is False; one queued on the lane
        (steps/lane.py) is waited for."""
        export = exporter_registry()[config.format].module.export

        def check(result: ExportResult) -> ReproducibilityCheck | None:
            if not check_reproducible:
                return None
            self.say(f"exporting {config.file_name} again to check the bytes are reproducible")
            return package.check_reproducible(export, config, ctx, result.files)

        if self.cache is None:
            result = self._export_now(export, config, ctx, pause_runtimes)
            return result, check(result)
        key = self.export_key(config)
        with self.cache.claim("export", key) as slot:
            if slot.entry is not None:
                record = slot.entry.record
                files = []
                for source in slot.entry.files:
                    files.append(Path(ctx.workdir) / source.name)
                    shutil.copyfile(source, files[-1])
                result = ExportResult(files=files, runtime=record["runtime"], details=record["details"],
                                      notes=list(record["notes"]))
                stored = record.get("reproducible") or self.stored_reproducibility(key)
                repro = ReproducibilityCheck.model_validate(stored) if stored else check(result)
            else:
                result = self._export_now(export, config, ctx, pause_runtimes)
                repro = check(result)
                if all(Path(f).parent.resolve() == Path(ctx.workdir).resolve() for f in result.files):
                    slot.store(result.files, {"runtime": result.runtime, "details": result.details,
                                              "notes": result.notes,
                                              "reproducible": repro.model_dump(mode="json") if repro else None})
        self.cache_log.append({"file": config.file_name, "precision": config.precision, "key": key,
                               "hit": slot.hit})
        if slot.hit:
            self.say(f"{config.file_name}: cached export (key {key[:12]})")
        return result, repro

    def export_key(self, config: Any) -> str:
        return self.cache.key({**self.cache_parts, "kind": "export", "config": config.model_dump(mode="json")})

    def is_cached(self, config: Any) -> bool:
        return self.cache is not None and self.cache.get("export", self.export_key(config)) is not None

    def stored_reproducibility(self, key: str) -> dict | None:
        """The reproducibility result the lane found for the export stored under ``key``."""
        entry = self.cache.get("reproducible", key)
        return entry.record.get("reproducible") if entry is not None else None

    def _export_now(self, export: Callable, config: Any, ctx: ExportContext, pause_runtimes: bool) -> ExportResult:
        """The export itself: taken from the lane when it was queued there, else run here with
        the runtime servers readied around it (ready_runtimes)."""
        if self.lane is not None and self.lane.has(config.file_name):
            return self.lane.result(config.file_name)
        stopped = self.ready_runtimes(config, pause_runtimes)
        try:
            return export(config, isolated(ctx))
        finally:  # with a lane, the artifact's timed run follows at once: they start after it
            self.paused.extend(stopped)
            if self.lane is None:
                self.start_paused()

    def start_paused(self) -> None:
        forkserver.start_servers(self.paused)
        self.paused.clear()

    def ready_runtimes(self, config: Any, pause_others: bool = True) -> list[tuple[str, int, dict[str, str], str]]:
        """Before an export: start the artifact's runtime server, so its import (10-16 s for
        ExecuTorch) overlaps the export, and (``pause_others``) stop the idle servers of the
        others, so the export has their memory; the caller starts those again once it is done.
        MobileNetV2 android-arm64: the ExecuTorch server (~310 MB PSS) otherwise idles through the
        .tflite export, where the build's tree PSS peaks (2,153 MB before)."""
        runtime = None if config.device_only else RUNTIME_FOR_FORMAT[config.format]
        stopped = forkserver.stop_idle_servers(keep=runtime) if pause_others else []
        if runtime is not None:
            forkserver.prestart(runtime, self.threads)
        return stopped

    def judge(self, config: Any) -> ArtifactEntry:
        """Export, validate and judge one artifact (with the fallback if the profile asks)."""
        fallback = self.profile.on_parity_failure == "fallback" and supports_fallback(config)
        # With a fallback possible, the bytes are checked once, on the artifact that is kept. With
        # a lane, the second export runs there, after the artifact is judged (defer_reproducibility).
        defer = self.lane is not None and self.check_reproducible and not fallback
        entry, summary = self.export_validate(config, self.check_reproducible and not fallback and not defer)
        if entry.status == "parity-failed" and self.profile.on_parity_failure == "fallback":
            if fallback:
                entry, summary = self.fallback(config, entry, summary)
            else:
                entry.notes.append(f"on_parity_failure: fallback does not apply to {config.format} "
                                   f"{config.precision} (static int8 made with the pt2e recipe only)")
        dynamic = config.int8_dynamic_form() if self.profile.on_static_int8_failure == "dynamic" else None
        if entry.status == "parity-failed" and dynamic is not None:
            entry, summary = self.try_dynamic(config, dynamic, entry, summary)
        label = f"{entry.file or config.file_name} ({config.format}, {entry.precision})"
        if entry.status == "parity-failed":
            self.findings.fail(f"{label}: parity failed\n" + summary, EXIT_PARITY_OR_BUDGET)
        elif entry.status == "budget-exceeded":
            self.findings.fail(f"{label}: budget exceeded: " + "; ".join(entry.budgets["failures"]),
                               EXIT_PARITY_OR_BUDGET)
        if defer and entry.reproducible is None and entry.files and entry.status != "failed":
            defer_reproducibility(self, entry)
        return entry

    def fallback(self, config: Any, failed: ArtifactEntry, failed_summary: str) -> tuple[ArtifactEntry, str]:
        """on_parity_failure: fallback. Keep the most harmful layers in fp32, a group per step,
        until parity passes or a limit or budget stops it; the entry kept says what each step cost."""

        def step_of(entry: ArtifactEntry, summary: str, float_layers: list[str]) -> FallbackStep:
            return FallbackStep(float_layers, entry.status != "parity-failed", entry.bytes or 0,
                                (entry.latency or {}).get("p50_ms"), parity=headline(entry.parity),
                                artifact=(entry, summary))

        def try_config(candidate: Any) -> FallbackStep:
            self.say(f"fallback: {config.file_name} with {len(candidate.float_layers)} layer(s) in fp32")
            entry, summary = self.export_validate(candidate, check_reproducible=False)
            if entry.status == "failed":
                raise ExportError(f"{config.file_name}: fallback step with float_layers "
                                  f"{list(candidate.float_layers)} failed: {entry.error}",
                                  "set on_parity_failure: fail and put the layers in float_layers by hand")
            return step_of(entry, summary, list(candidate.float_layers))

        self.say(f"{config.file_name}: parity failed; ranking layers for the fp32 fallback")
        initial = step_of(failed, failed_summary, list(getattr(config, "float_layers", ())))
        result = run_fallback(config, self.ctx, try_config, settings=self.profile.fallback,
                              budgets=self.profile.budgets, initial=initial)
        final = result.final or initial
        entry, summary = final.artifact
        if final is not result.steps[-1]:
            # The files on disk belong to a later step (over budget): rebuild the one kept.
            self.say(f"fallback: rebuilding {config.file_name} with the {len(final.float_layers)} layer(s) kept")
            entry, summary = self.export_validate(with_float_layers(config, final.float_layers),
                                                  check_reproducible=self.check_reproducible)
        elif self.check_reproducible:
            export = exporter_registry()[config.format].module.export
            kept = with_float_layers(config, final.float_layers)
            entry.reproducible = package.check_reproducible(export, kept, self.ctx,
                                                            [self.staged / f.path for f in entry.files])
        entry.export["fallback"] = result.to_dict()
        if result.float_layers:
            entry.notes.append(f"on_parity_failure: fallback kept {len(result.float_layers)} layer(s) in fp32 "
                               f"({', '.join(result.float_layers)}): {result.reason}")
        else:
            entry.notes.append(f"on_parity_failure: fallback: {result.reason}")
        return entry, summary

    def try_dynamic(self, config: Any, dynamic: Any, failed: ArtifactEntry,
                    failed_summary: str) -> tuple[ArtifactEntry, str]:
        """on_static_int8_failure: dynamic. Export ``dynamic`` (the artifact as int8-dynamic) beside the
        bundle and judge it by the int8 thresholds; when its parity passes it replaces the static one,
        else the static entry stays. The entry kept records both tries under
        ``export.dynamic_fallback``; the build warns when the dynamic one ships."""
        self.say(f"{config.file_name}: static int8 failed parity; trying it as int8-dynamic")
        with tempfile.TemporaryDirectory(prefix="edgepack-dynamic-") as scratch:
            aside = dataclasses.replace(self, staged=Path(scratch), findings=Findings(debug=self.findings.debug),
                                        ctx=dataclasses.replace(self.ctx, workdir=Path(scratch)))
            entry, summary = aside.export_validate(dynamic, self.check_reproducible, tolerance="int8")
            # parity passed (a budget still judges it), and int8-dynamic it is (not an fp32 stand-in)
            passed = entry.status in ("ok", "budget-exceeded") and entry.precision == dynamic.precision
            growth = (entry.bytes or 0) / max(1, failed.bytes or 0)
            refused = (f"{growth:.2f}x the static int8 artifact's bytes (> {DYNAMIC_MAX_GROWTH}): its dynamic "
                       f"recipe left much of the model in float" if passed and growth > DYNAMIC_MAX_GROWTH else None)
            passed = passed and refused is None
            if passed:
                for item in failed.files:
                    (self.staged / item.path).unlink(missing_ok=True)
                for source in sorted(Path(scratch).rglob("*")):  # the artifact and its golden files
                    if source.is_file():
                        target = self.staged / source.relative_to(scratch)
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(source, target)
                self.findings.warnings.extend(aside.findings.warnings)
        tried = [try_record(failed), try_record(entry)]
        if refused:
            tried[1]["failures"].append(refused)
        static, shipped = headline(failed.parity), headline(entry.parity)
        if passed:
            finding = (f"{config.file_name}: static int8 failed parity (cosine min {static['cosine_min']:.4f}, "
                       f"SQNR {static['sqnr_db']:.1f} dB); shipped int8-dynamic (int8 weights, activations quantized "
                       f"per call; {entry.size['ratio_to_float']:.2f}x the float bytes), which passed the int8 "
                       f"thresholds (cosine min {shipped['cosine_min']:.4f}, SQNR {shipped['sqnr_db']:.1f} dB) "
                       f"(profile: on_static_int8_failure: dynamic)")
            self.say(finding)
            self.findings.warnings.append(finding)
            kept, kept_summary = entry, summary
        else:
            finding = ("on_static_int8_failure: dynamic: int8-dynamic did not pass either: "
                       + ("; ".join(tried[1]["failures"]) or entry.status))
            kept, kept_summary = failed, failed_summary
        kept.export["dynamic_fallback"] = {
            "passed": passed, "shipped": kept.precision, "tolerance": "int8", "tried": tried,
            "reason": "int8-dynamic passed the int8 thresholds" if passed else finding.split(": ", 2)[-1]}
        kept.notes.append(finding)
        return kept, kept_summary

    def _ship_float(self, config: Any, why: str, check_reproducible: bool) -> tuple[ArtifactEntry, str]:
        """unquantizable: keep_float. The artifact's fp32 form of the same format and name, judged
        by the fp32 tolerance, with a note and a warning saying what was asked and why."""
        exporter = exporter_registry()[config.format]
        float_config = exporter.config.model_validate({"format": config.format, "name": config.name,
                                                       "precision": "fp32"})
        finding = (f"{config.file_name}: {config.precision} had nothing to quantize ({why}); shipped fp32 "
                   f"(profile: unquantizable: keep_float)")
        self.say(finding)
        entry, summary = self.export_validate(float_config, check_reproducible)
        entry.notes.append(finding)
        self.findings.warnings.append(finding)
        return entry, summary

    def export_validate(self, config: Any, check_reproducible: bool,
                        tolerance: str | None = None) -> tuple[ArtifactEntry, str]:
        """Export one artifact, run it in its runtime and judge it (by ``tolerances[tolerance]``,
        default its precision's): (entry, parity summary). Parity and budget results are in
        entry.status; judge() records them as failures."""
        profile, staged = self.profile, self.staged
        label = f"{config.file_name} ({config.format}, {config.precision})"
        base = {"name": config.name, "format": config.format, "precision": config.precision,
                "config": config.model_dump(mode="json")}
        self.say(f"exporting {label}")
        try:
            result, reproducible = self.export(config, self.ctx, check_reproducible)
        except NothingToQuantize as exc:
            if profile.unquantizable != "keep_float" or config.precision == "fp32":
                self.findings.fail(f"{label}: {exc.message}", EXIT_EXPORT_OR_RUNTIME, exc)
                return ArtifactEntry(status="failed", error=exc.message, **base), ""
            return self._ship_float(config, exc.message, check_reproducible)
        except ExportError as exc:
            # Recorded, never raised: the build writes its .failed report with what passed
            # (pipeline.py stops at the first failed artifact unless --keep-going).
            self.findings.fail(f"{label}: {exc.message}", EXIT_EXPORT_OR_RUNTIME, exc)
            return ArtifactEntry(status="failed", error=exc.message, **base), ""
        files = result.files
        main = files[0]
        total_bytes = sum(p.stat().st_size for p in files)
        size = {"bytes": total_bytes, "float_reference_bytes": self.reference.bytes,
                "ratio_to_float": round(total_bytes / self.reference.bytes, 4)}
        if config.device_only:
            # Shipped for the device, never run here: no parity, latency or golden outputs claimed.
            self.findings.warnings.append(f"{config.file_name}: {config.device_only}")
            return ArtifactEntry(
                status="not-validated", file=main.name, files=[bundle_mod.file_entry(p, staged) for p in files],
                bytes=total_bytes, zip_bytes=zip_bytes(files), sha256=bundle_mod.sha256_file(main),
                runtime=result.runtime, export=result.details, notes=result.notes, size=size,
                reproducible=reproducible, **base), ""
        self.say(f"validating {label} in {result.runtime}")
        try:
            ran = run_artifact(self, RUNTIME_FOR_FORMAT[config.format], files)
            self.start_paused()
        except RuntimeCheckError as exc:
            self.findings.fail(f"{label}: {exc.message}", EXIT_EXPORT_OR_RUNTIME, exc)
            for path in files:
                path.unlink(missing_ok=True)
            return ArtifactEntry(status="failed", error=exc.message, **base), ""
        if ran.cache is not None and ran.cache["hit"]:
            self.say(f"{config.file_name}: cached run in {result.runtime} (key {ran.cache['key'][:12]}), judged again")
        native_inputs, native_outputs, outputs = ran.native_inputs, ran.native_outputs, ran.model_outputs
        bench, accuracy, info, io_specs = ran.bench, ran.accuracy, ran.info, (ran.inputs, ran.outputs)
        io = ArtifactIO(inputs=[t.to_dict() for t in ran.inputs], outputs=[t.to_dict() for t in ran.outputs])

        if info.get("delegation"):  # measured in the runtime: what its default delegate took
            result.details["delegation"] = info["delegation"]
            left = info["delegation"].get("undelegated_ops")
            if left:
                result.notes.append(f"{result.runtime}: ops left outside {info['delegation']['delegate'] or 'a delegate'}"
                                    f" (run by the runtime's own kernels): {left}")
        thresholds = profile.tolerance_for(tolerance or config.precision).model_dump()
        parity = compare(self.reference.outputs, outputs, thresholds, self.reference.output_names, self.score_outputs,
                         self.reference.masks)
        golden_in = f"golden/{config.file_name}.inputs.npz"
        golden_out = f"golden/{config.file_name}.outputs.npz"
        bundle_mod.save_npz(staged / golden_in, stack_samples(native_inputs, [t.name for t in io.inputs]))
        bundle_mod.save_npz(staged / golden_out, stack_samples(native_outputs, [t.name for t in io.outputs]))

        emulated_gpu = None
        if profile.gpu_check.enabled and config.format == "tflite" and config.precision in GPU_CHECK_PRECISIONS:
            job = GpuJob(main, native_inputs, self.reference.outputs, outputs, self.reference.output_names, io_specs,
                         self.score_outputs, sum((result.details.get("ops") or {}).values()) or None)
            emulated_gpu = judge_on_gpu(self, label, job, config.precision, cpu_passed=parity.passed)
        gpu_failed = emulated_gpu is not None and emulated_gpu.status == "failed" and emulated_gpu.parity is not None

        latency = latency_summary(bench["times_ms"])
        latency.update({"source": "host", "runtime": result.runtime, "threads": self.threads,
                        "warmup": profile.latency.warmup, "load_ms": round(bench["load_ms"], 3),
                        "peak_rss_mb": round(bench["peak_rss_mb"], 1)})
        if ran.latency_cache is not None:
            latency["cache"] = ran.latency_cache
        if ran.cache is not None:
            latency["outputs_cache"] = ran.cache  # not latency, but where the outputs it ran on came from
        # a function of the reference's bytes and the device: cached, as reading the graph imports onnx (1.3 s)
        latency["device_estimate"] = computed(
            self.cache, "estimate", {"reference": digest_files([Path(self.ctx.reference_onnx)]),
                                     "precision": config.precision, "device": profile.device.model_dump(mode="json")},
            lambda: estimate_latency(self.ctx.reference_onnx, config.precision, profile.device))
        budgets = profile.budgets.check(total_bytes, latency["p50_ms"], ratio_to_float=size["ratio_to_float"])
        if config.precision != "fp32" and size["ratio_to_float"] > 1.0:
            finding = (f"{config.file_name}: {config.precision} is {size['ratio_to_float']:.2f}x the float model's "
                       f"bytes: the recipe grew it (an op it cannot quantize compactly); a profile budget "
                       f"max_ratio_to_float fails such an artifact")
            result.notes.append(finding)
            self.findings.warnings.append(finding)
        status = "ok"
        if not parity.passed or gpu_failed:
            status = "parity-failed"
        elif budgets and not budgets["passed"]:
            status = "budget-exceeded"
        return ArtifactEntry(
            status=status, file=main.name,
            files=[bundle_mod.file_entry(p, staged) for p in files],
            bytes=total_bytes, zip_bytes=zip_bytes(files), sha256=bundle_mod.sha256_file(main),
            runtime=result.runtime, runtime_version=str(info.get("version", "")),
            export=result.details, notes=result.notes, io=io,
            golden=GoldenFiles(inputs=golden_in, outputs=golden_out),
            parity=parity.to_dict(), latency=latency, size=size,
            accuracy=accuracy, budgets=budgets, reproducible=reproducible, emulated_gpu=emulated_gpu, **base,
        ), parity.summary() + (f"\n{gpu_summary(emulated_gpu)}" if gpu_failed else "")
