"""build(spec, profile) -> bundle. The only place that knows the order of the steps.

    spec --stages--> float model --ONNX--> reference (onnxruntime)
         --exporter per artifact--> file --its runtime (child process)--> parity, latency, accuracy
         --> manifest + golden I/O, written atomically to dist/<model>/<target>/
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import bundle as bundle_mod
from . import package
from .costmodel import estimate_latency
from .bundle import ArtifactEntry, ArtifactIO, FileEntry, GoldenFiles, GoldenInfo, Manifest, ModelInfo, ReferenceInfo, TargetInfo
from .errors import (check_interrupted, EXIT_EXPORT_OR_RUNTIME, EXIT_OK, EXIT_PARITY_OR_BUDGET, EdgepackError, ExportError,
                     RuntimeCheckError, RuntimeUnavailable)
from .export import RUNTIME_FOR_FORMAT, registry as exporter_registry
from .export.base import ExportContext
from .export.onnx import export_float_onnx
from .fallback import FallbackStep, run_fallback, supports_fallback, with_float_layers
from .measure import latency_summary, zip_bytes
from .modelstats import model_stats
from .parity import compare, headline
from .runtimes.base import from_native, to_native
from .runtimes import session as session_mod
from .runtimes.session import RuntimeSession
from .spec import ModelSpec, calibration_list, guarded_evaluate
from .stage import StageContext, run_stages, torch_outputs_fn

# Used to check the reference export against torch eager when the profile has no fp32 entry.
DEFAULT_FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999}
MAX_CALIBRATION = 1024
TOOLCHAIN_PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "onnxscript", "executorch", "torchao",
                      "litert-torch", "ai-edge-litert", "ai-edge-quantizer", "torch-pruning")


@dataclass
class BuildOptions:
    out_dir: Path = Path("dist")
    keep_going: bool = False
    progress: Callable[[str], None] | None = None
    runtime_timeout_s: float = 300.0
    # Export every artifact twice and record whether the bytes are identical (doubles export time).
    check_reproducible: bool = True
    # Also write dist/<model>-<target>.zip (deterministic) beside the bundle directory.
    write_zip: bool = True
    # Test hook: called with the step name before each step; raising there simulates a failure.
    step_hook: Callable[[str], None] | None = None


@dataclass
class BuildResult:
    manifest: Manifest
    bundle_dir: Path
    exit_code: int
    messages: list[str] = field(default_factory=list)
    zip_path: Path | None = None


def edgepack_version() -> str:
    try:
        return importlib.metadata.version("edgepack")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def toolchain_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "edgepack": edgepack_version()}
    for name in TOOLCHAIN_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": platform.machine(), "system": platform.system(), "cpu": cpu, "cpu_count": os.cpu_count()}


def _np_inputs(sample: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in sample]


def _stack(samples: list[list[np.ndarray]], names: list[str]) -> dict[str, np.ndarray]:
    return {name: np.stack([s[i] for s in samples]) for i, name in enumerate(names)}


class _Builder:
    def __init__(self, spec: ModelSpec, profile, profile_source: str, options: BuildOptions):
        self.spec, self.profile, self.options = spec, profile, options
        self.profile_source = profile_source
        self.threads = min(profile.device.threads, os.cpu_count() or 1)
        self.failures: list[str] = []
        self.warnings: list[str] = []
        self.timings: list[dict[str, Any]] = []
        self._step_started: tuple[str, float] | None = None
        self.exit_code = EXIT_OK
        self.score_outputs = list(spec.score_outputs) if spec.score_outputs is not None else None
        # evaluate is user code: whatever it raises becomes a SpecError naming it.
        self.evaluate = guarded_evaluate(spec.evaluate, spec.source or spec.name) if spec.evaluate else None

    def say(self, message: str) -> None:
        check_interrupted()
        self._lap(message)
        if self.options.progress:
            self.options.progress(message)

    def _lap(self, next_step: str | None) -> None:
        """Close the step in progress (its wall time goes to the manifest's timings)."""
        now = time.perf_counter()
        if self._step_started is not None:
            name, started = self._step_started
            self.timings.append({"step": name, "seconds": round(now - started, 2)})
        self._step_started = (next_step, now) if next_step is not None else None

    def step(self, name: str) -> None:
        check_interrupted()
        if self.options.step_hook:
            self.options.step_hook(name)

    def fail(self, message: str, code: int) -> None:
        self.failures.append(message)
        self.exit_code = max(self.exit_code, code)

    # -- the build ------------------------------------------------------------------------
    def run(self, staged: Path, scratch: Path) -> Manifest:
        spec, profile = self.spec, self.profile
        self._lap("reading the spec's calibration and held-out samples")
        for runtime in dict.fromkeys(["onnxruntime"] + [RUNTIME_FOR_FORMAT[a.format] for a in profile.artifacts
                                                         if not a.device_only]):
            session_mod.prestart(runtime, self.threads)
        torch.manual_seed(0)
        np.random.seed(0)
        example = spec.example_inputs
        calibration = calibration_list(spec.calibration, f"{spec.source}: calibration", example, MAX_CALIBRATION)
        holdout = (calibration_list(spec.holdout, f"{spec.source}: holdout", example, profile.parity.holdout_samples)
                   if spec.holdout is not None else [])
        input_names = spec.resolved_input_names()
        with torch.no_grad():
            first = spec.model(*example)
        n_outputs = len(first) if isinstance(first, (tuple, list)) else 1
        output_names = spec.resolved_output_names(n_outputs)

        self.step("stages")
        if profile.stages:
            self.say(f"compressing: {len(profile.stages)} stage(s)")
        stage_ctx = StageContext(example_inputs=example, calibration=calibration, teacher=spec.model,
                                 train_data=spec.train_data, loss=spec.loss, evaluate=self.evaluate,
                                 student=spec.student)
        model, records = run_stages(spec.model, list(profile.stages), stage_ctx,
                                    on_stage=lambda t: self.say(f"stage {t}"))

        self.step("reference")
        self.say("exporting the float reference to ONNX")
        try:
            ref_files = export_float_onnx(model, example, scratch / "reference" / "reference.onnx", input_names,
                                          output_names)
        except ExportError as exc:
            raise ExportError(f"the float reference (ONNX, what every artifact is checked against): {exc.message}",
                              "every build exports the float model to ONNX to check the artifacts; replace the op "
                              "with one ONNX supports (run with --debug for the full error)") from exc
        parity_samples = calibration[: profile.parity.calibration_samples] + holdout
        parity_inputs = [_np_inputs(s) for s in parity_samples]
        with RuntimeSession("onnxruntime", ref_files[0], self.threads, self.options.runtime_timeout_s) as ref:
            reference = [ref.run(x) for x in parity_inputs]
            ref_bench = ref.bench(parity_inputs[0], profile.latency.warmup, profile.latency.runs)
            ref_version = ref.info.get("version", "")
        torch_outputs = [[o.numpy() for o in torch_outputs_fn(model)(s)] for s in parity_samples]
        fp32_tol = (profile.tolerances["fp32"].model_dump() if "fp32" in profile.tolerances else DEFAULT_FP32_TOLERANCE)
        torch_parity = compare(reference, torch_outputs, fp32_tol, output_names, self.score_outputs)
        if not torch_parity.passed:
            self.fail("the float ONNX reference does not match the torch model: " + torch_parity.summary(),
                      EXIT_PARITY_OR_BUDGET)
        ref_bytes = sum(p.stat().st_size for p in ref_files)

        self.step("golden")
        golden_dir = staged / "golden"
        bundle_mod.save_npz(golden_dir / "inputs.npz", _stack(parity_inputs, input_names))
        bundle_mod.save_npz(golden_dir / "reference_outputs.npz", _stack(reference, output_names))

        accuracy: dict[str, Any] = {}
        if self.evaluate is not None:
            self.say("evaluating the float model")
            accuracy["float"] = _metrics(self.evaluate(torch_outputs_fn(spec.model)))
            if profile.stages:
                accuracy["compressed_float"] = _metrics(self.evaluate(torch_outputs_fn(model)))

        export_ctx = ExportContext(model=model, example_inputs=example, calibration=calibration,
                                   input_names=input_names, output_names=output_names, workdir=staged,
                                   threads=self.threads, train_data=spec.train_data, loss=spec.loss,
                                   reference_onnx=ref_files[0], extras=stage_ctx.extras)
        artifacts = []
        for config in profile.artifacts:
            self.step(f"artifact:{config.file_name}")
            artifacts.append(self.build_artifact(config, export_ctx, staged, parity_inputs, reference,
                                                 output_names, ref_bytes))
        self.step("float-comparison")
        self.compare_with_float(list(profile.artifacts), artifacts, export_ctx, scratch, parity_inputs[0], staged)

        self._lap(None)
        base_stats = model_stats(spec.model, example)
        ref_lat = latency_summary(ref_bench["times_ms"])
        ref_lat.update({"threads": self.threads, "warmup": profile.latency.warmup})
        manifest = Manifest(
            status="passed" if not self.failures else "failed",
            failures=self.failures,
            warnings=self.warnings,
            edgepack_version=edgepack_version(),
            model=ModelInfo(name=spec.name, source=spec.source, source_sha256=spec.source_sha256,
                            notes=list(spec.notes), **base_stats),
            target=TargetInfo(name=profile.name, source=self.profile_source, profile_sha256=profile.sha256(),
                              profile=profile.model_dump(mode="json")),
            io=ArtifactIO(
                inputs=[{"name": n, "shape": list(t.shape), "dtype": str(t.numpy().dtype)} for n, t in zip(input_names, example)],
                outputs=[{"name": n, "shape": list(o.shape), "dtype": str(o.dtype)} for n, o in zip(output_names, reference[0])],
            ),
            stages=[r.to_dict() for r in records],
            reference=ReferenceInfo(runtime_version=ref_version, bytes=ref_bytes, torch_parity=torch_parity.to_dict(),
                                    latency=ref_lat),
            artifacts=artifacts,
            accuracy=accuracy,
            golden=GoldenInfo(inputs="golden/inputs.npz", reference_outputs="golden/reference_outputs.npz",
                              samples=len(parity_inputs)),
            toolchain=toolchain_versions(),
            host=host_info(),
            timings=self.timings,
        )
        self.step("manifest")
        bundle_mod.write_manifest(staged / "manifest.json", manifest)
        return manifest

    def build_artifact(self, config, ctx: ExportContext, staged: Path, parity_inputs, reference, output_names,
                       ref_bytes: int) -> ArtifactEntry:
        args = (ctx, staged, parity_inputs, reference, output_names, ref_bytes)
        fallback = self.profile.on_parity_failure == "fallback" and supports_fallback(config)
        # With a fallback possible, the bytes are checked once, on the artifact that is kept.
        entry, summary = self.export_validate(config, *args,
                                              check_reproducible=self.options.check_reproducible and not fallback)
        if entry.status == "parity-failed" and self.profile.on_parity_failure == "fallback":
            if fallback:
                entry, summary = self.fallback(config, entry, summary, *args)
            else:
                entry.notes.append(f"on_parity_failure: fallback does not apply to {config.format} "
                                   f"{config.precision} (static int8 made with the pt2e recipe only)")
        label = f"{config.file_name} ({config.format}, {config.precision})"
        if entry.status == "parity-failed":
            self.fail(f"{label}: parity failed\n" + summary, EXIT_PARITY_OR_BUDGET)
        elif entry.status == "budget-exceeded":
            self.fail(f"{label}: budget exceeded: " + "; ".join(entry.budgets["failures"]), EXIT_PARITY_OR_BUDGET)
        return entry

    def fallback(self, config, failed: ArtifactEntry, failed_summary: str, ctx: ExportContext, staged: Path, parity_inputs, reference,
                 output_names, ref_bytes: int) -> tuple[ArtifactEntry, str]:
        """on_parity_failure: fallback. Keep the most harmful layers in fp32, a group per step,
        until parity passes or a limit or budget stops it; the entry kept says what each step cost."""
        args = (ctx, staged, parity_inputs, reference, output_names, ref_bytes)

        def step_of(entry: ArtifactEntry, summary: str, float_layers: list[str]) -> FallbackStep:
            return FallbackStep(float_layers, entry.status != "parity-failed", entry.bytes or 0,
                                (entry.latency or {}).get("p50_ms"), parity=headline(entry.parity),
                                artifact=(entry, summary))

        def try_config(candidate) -> FallbackStep:
            self.say(f"fallback: {config.file_name} with {len(candidate.float_layers)} layer(s) in fp32")
            entry, summary = self.export_validate(candidate, *args, check_reproducible=False)
            if entry.status == "failed":
                raise ExportError(f"{config.file_name}: fallback step with float_layers "
                                  f"{list(candidate.float_layers)} failed: {entry.error}",
                                  "set on_parity_failure: fail and put the layers in float_layers by hand")
            return step_of(entry, summary, list(candidate.float_layers))

        self.say(f"{config.file_name}: parity failed; ranking layers for the fp32 fallback")
        initial = step_of(failed, failed_summary, list(getattr(config, "float_layers", ())))
        result = run_fallback(config, ctx, try_config, settings=self.profile.fallback, budgets=self.profile.budgets,
                              initial=initial)
        final = result.final or initial
        entry, summary = final.artifact
        if final is not result.steps[-1]:
            # The files on disk belong to a later step (over budget): rebuild the one kept.
            self.say(f"fallback: rebuilding {config.file_name} with the {len(final.float_layers)} layer(s) kept")
            entry, summary = self.export_validate(with_float_layers(config, final.float_layers), *args,
                                                  check_reproducible=self.options.check_reproducible)
        elif self.options.check_reproducible:
            export = exporter_registry()[config.format].module.export
            kept = with_float_layers(config, final.float_layers)
            entry.reproducible = package.check_reproducible(export, kept, ctx, [staged / f.path for f in entry.files])
        entry.export["fallback"] = result.to_dict()
        if result.float_layers:
            entry.notes.append(f"on_parity_failure: fallback kept {len(result.float_layers)} layer(s) in fp32 "
                               f"({', '.join(result.float_layers)}): {result.reason}")
        else:
            entry.notes.append(f"on_parity_failure: fallback: {result.reason}")
        return entry, summary

    def export_validate(self, config, ctx: ExportContext, staged: Path, parity_inputs, reference, output_names,
                        ref_bytes: int, check_reproducible: bool) -> tuple[ArtifactEntry, str]:
        """Export one artifact, run it in its runtime and judge it: (entry, parity summary).
        Parity and budget results are in entry.status; the caller records them as failures."""
        profile = self.profile
        entry = exporter_registry()[config.format]
        label = f"{config.file_name} ({config.format}, {config.precision})"
        base = {"name": config.name, "format": config.format, "precision": config.precision,
                "config": config.model_dump(mode="json")}
        self.say(f"exporting {label}")
        try:
            result = entry.module.export(config, _isolated(ctx))
        except (ExportError, RuntimeUnavailable) as exc:
            if not self.options.keep_going:
                raise
            self.fail(f"{label}: {exc.message}", EXIT_EXPORT_OR_RUNTIME)
            return ArtifactEntry(status="failed", error=exc.message, **base), ""
        files = result.files
        main = files[0]
        reproducible = None
        if check_reproducible:
            self.say(f"exporting {config.file_name} again to check the bytes are reproducible")
            reproducible = package.check_reproducible(entry.module.export, config, ctx, files)
        if config.device_only:
            # Shipped for the device, never run here: no parity, latency or golden outputs claimed.
            self.warnings.append(f"{config.file_name}: {config.device_only}")
            total_bytes = sum(p.stat().st_size for p in files)
            return ArtifactEntry(
                status="not-validated", file=main.name, files=[bundle_mod.file_entry(p, staged) for p in files],
                bytes=total_bytes, zip_bytes=zip_bytes(files), sha256=bundle_mod.sha256_file(main),
                runtime=result.runtime, export=result.details, notes=result.notes,
                size={"bytes": total_bytes, "float_reference_bytes": ref_bytes,
                      "ratio_to_float": round(total_bytes / ref_bytes, 4)},
                reproducible=reproducible, **base), ""
        self.say(f"validating {label} in {result.runtime}")
        try:
            with RuntimeSession(RUNTIME_FOR_FORMAT[config.format], main, self.threads,
                                self.options.runtime_timeout_s) as session:
                native_inputs = [to_native(x, session.inputs) for x in parity_inputs]
                native_outputs = [session.run(x) for x in native_inputs]
                outputs = [from_native(o, session.outputs) for o in native_outputs]
                bench = session.bench(native_inputs[0], profile.latency.warmup, profile.latency.runs)
                accuracy = None
                if self.evaluate is not None:
                    accuracy = _metrics(self.evaluate(_session_fn(session)))
                io = ArtifactIO(inputs=[t.to_dict() for t in session.inputs],
                                outputs=[t.to_dict() for t in session.outputs])
                load_ms, info = session.load_ms, session.info
        except RuntimeCheckError as exc:
            if not self.options.keep_going:
                raise
            self.fail(f"{label}: {exc.message}", EXIT_EXPORT_OR_RUNTIME)
            for path in files:
                path.unlink(missing_ok=True)
            return ArtifactEntry(status="failed", error=exc.message, **base), ""

        if info.get("delegation"):  # measured in the runtime: what its default delegate took
            result.details["delegation"] = info["delegation"]
            left = info["delegation"].get("undelegated_ops")
            if left:
                result.notes.append(f"{result.runtime}: ops left outside {info['delegation']['delegate'] or 'a delegate'}"
                                    f" (run by the runtime's own kernels): {left}")
        tolerance = profile.tolerance_for(config.precision).model_dump()
        parity = compare(reference, outputs, tolerance, output_names, self.score_outputs)
        golden_in = f"golden/{config.file_name}.inputs.npz"
        golden_out = f"golden/{config.file_name}.outputs.npz"
        bundle_mod.save_npz(staged / golden_in, _stack(native_inputs, [t.name for t in io.inputs]))
        bundle_mod.save_npz(staged / golden_out, _stack(native_outputs, [t.name for t in io.outputs]))

        total_bytes = sum(p.stat().st_size for p in files)
        latency = latency_summary(bench["times_ms"])
        latency.update({"source": "host", "runtime": result.runtime, "threads": self.threads,
                        "warmup": profile.latency.warmup, "load_ms": round(load_ms, 3),
                        "peak_rss_mb": round(bench["peak_rss_mb"], 1)})
        latency["device_estimate"] = estimate_latency(ctx.reference_onnx, config.precision, profile.device)
        budgets = _check_budgets(profile.budgets, total_bytes, latency["p50_ms"])
        status = "ok"
        if not parity.passed:
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
            parity=parity.to_dict(), latency=latency,
            size={"bytes": total_bytes, "float_reference_bytes": ref_bytes,
                  "ratio_to_float": round(total_bytes / ref_bytes, 4)},
            accuracy=accuracy, budgets=budgets, reproducible=reproducible, **base,
        ), parity.summary()



    def compare_with_float(self, configs, entries: list[ArtifactEntry], ctx: ExportContext, scratch: Path,
                           feeds: list[np.ndarray], staged: Path) -> None:
        """Record each quantized artifact's host latency against a float sibling of its format,
        measured side by side in this build, and apply the profile's slower_than_float policy."""
        policy = self.profile.slower_than_float
        floats = {(c.format): e for c, e in zip(configs, entries) if c.precision == "fp32" and e.status == "ok"}
        baselines: dict[str, Path] = {}
        for config, entry in zip(configs, entries):
            if config.precision == "fp32" or entry.latency is None:
                continue
            sibling = floats.get(config.format)
            if sibling is not None:
                float_path, source = staged / _main_path(sibling), f"artifact {sibling.file}"
            else:
                if config.format not in baselines:
                    baselines[config.format] = self.export_float_baseline(config, ctx, scratch)
                float_path, source = baselines[config.format], "fp32 baseline exported for this comparison (not shipped)"
            comparison = self.side_by_side(config.format, staged / _main_path(entry), float_path, feeds)
            speedup = comparison["float_p50_ms"] / comparison["p50_ms"]
            entry.latency["float_comparison"] = {**comparison, "speedup_vs_float": round(speedup, 3),
                                                 "ratio_to_float": round(1 / speedup, 3), "float_source": source}
            if speedup > 1.0:
                continue
            finding = (f"{entry.file}: {config.precision} is not faster than float on this host "
                       f"(p50 {comparison['p50_ms']:.3f} ms vs {comparison['float_p50_ms']:.3f} ms side by side, "
                       f"{speedup:.2f}x)")
            if policy == "warn":
                self.warnings.append(finding + "; host latency is not device latency")
                entry.notes.append(finding)
            elif policy == "fail" and entry.status == "ok":
                entry.status = "slower-than-float"
                self.fail(finding + " (profile: slower_than_float: fail)", EXIT_PARITY_OR_BUDGET)
            elif policy == "keep_float" and entry.status == "ok":
                for item in entry.files:
                    (staged / item.path).unlink(missing_ok=True)
                for golden in (entry.golden.inputs, entry.golden.outputs):
                    (staged / golden).unlink(missing_ok=True)
                entry.status, entry.files, entry.golden = "replaced-by-float", [], None
                entry.notes.append(finding + f"; not shipped, use {sibling.file} (profile: slower_than_float: keep_float)")
                self.warnings.append(entry.notes[-1])

    def side_by_side(self, fmt: str, path: Path, float_path: Path, feeds: list[np.ndarray]) -> dict:
        """p50 of an artifact and of its float sibling, both loaded at once (two runtime
        workers) and run in alternating rounds, so a host that slows down or speeds up during
        the build (other jobs, CPU frequency, caches) affects both alike. Measuring each right
        after its own load, minutes apart, gave MobileNetV2's int8 ONNX 1.17x over fp32 in one
        build and 1.52x in a side-by-side benchmark on the same host."""
        settings = self.profile.latency
        runtime, timeout = RUNTIME_FOR_FORMAT[fmt], self.options.runtime_timeout_s
        times: dict[str, list[float]] = {"quantized": [], "float": []}
        with RuntimeSession(runtime, path, self.threads, timeout) as quantized, \
                RuntimeSession(runtime, float_path, self.threads, timeout) as floating:
            sessions = {"quantized": quantized, "float": floating}
            native = {name: to_native(feeds, session.inputs) for name, session in sessions.items()}
            for name, session in sessions.items():  # warm both before either is timed
                session.bench(native[name], settings.warmup, 1)
            round_speedups = []
            for round_index in range(settings.comparison_rounds):
                order = ("quantized", "float") if round_index % 2 == 0 else ("float", "quantized")
                medians = {}
                for name in order:
                    block = sessions[name].bench(native[name], 1, settings.runs)["times_ms"]
                    times[name] += block
                    medians[name] = float(np.median(block))
                round_speedups.append(round(medians["float"] / medians["quantized"], 3))
        # The spread of the per-round ratios shows how far this host's timing moved during the
        # comparison: a ratio near a policy threshold should be read against it.
        return {"p50_ms": latency_summary(times["quantized"])["p50_ms"],
                "float_p50_ms": latency_summary(times["float"])["p50_ms"],
                "round_speedups": round_speedups,
                "method": f"both loaded at once, {settings.comparison_rounds} alternating rounds x "
                          f"{settings.runs} runs each, {self.threads} threads"}

    def export_float_baseline(self, config, ctx: ExportContext, scratch: Path) -> Path:
        entry = exporter_registry()[config.format]
        baseline = entry.config.model_validate({"format": config.format, "precision": "fp32",
                                                "name": f"{config.name}-float-baseline"})
        workdir = scratch / f"float-baseline-{config.format}"
        workdir.mkdir(exist_ok=True)
        self.say(f"exporting an fp32 {config.format} baseline to compare {config.file_name}'s latency")
        return entry.module.export(baseline, _isolated(ctx, workdir=workdir)).files[0]


def _main_path(entry: ArtifactEntry) -> str:
    """The bundle-relative path of an entry's main file (the one a runtime loads)."""
    return next(item.path for item in entry.files if Path(item.path).name == entry.file)


def _isolated(ctx: ExportContext, **changes) -> ExportContext:
    """The context with a private copy of the model: exporters are plugins, and whatever one
    does to the module it is given (torch.export shares its parameters with the graph it
    captures), every artifact must start from the model the reference was made from."""
    return dataclasses.replace(ctx, model=copy.deepcopy(ctx.model), **changes)


def _metrics(values: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def _session_fn(session: RuntimeSession):
    def fn(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        feeds = to_native(_np_inputs(inputs), session.inputs)
        outputs = from_native(session.run(feeds), session.outputs)
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    return fn


def _check_budgets(budgets, total_bytes: int, p50_ms: float) -> dict | None:
    if budgets.max_bytes is None and budgets.max_latency_ms is None:
        return None
    failures = []
    if budgets.max_bytes is not None and total_bytes > budgets.max_bytes:
        failures.append(f"{total_bytes} bytes > max_bytes {budgets.max_bytes}")
    if budgets.max_latency_ms is not None and p50_ms > budgets.max_latency_ms:
        failures.append(f"host p50 {p50_ms:.3f} ms > max_latency_ms {budgets.max_latency_ms}")
    return {"max_bytes": budgets.max_bytes, "max_latency_ms": budgets.max_latency_ms, "latency_source": "host",
            "passed": not failures, "failures": failures}


def bundle_path(out_dir: Path, model_name: str, target_name: str) -> Path:
    return Path(out_dir) / model_name / target_name


def build(spec: ModelSpec, profile, profile_source: str, options: BuildOptions | None = None) -> BuildResult:
    """Build, validate and package; place the bundle atomically.

    A passing build replaces dist/<model>/<target>/ whole. A build whose parity or budget
    fails writes its complete report to dist/<model>/<target>.failed/ and leaves the last
    good bundle untouched. A build that raises leaves nothing behind.
    """
    options = options or BuildOptions()
    dest = bundle_path(options.out_dir, spec.name, profile.name)
    builder = _Builder(spec, profile, profile_source, options)
    try:
        staged = bundle_mod.staging_dir(dest)
    except OSError as exc:
        raise EdgepackError(f"{dest.parent}: cannot write the bundle there: {exc.strerror or exc}",
                            "choose a writable --out directory") from exc
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-") as scratch:
            builder.run(staged, Path(scratch))
        builder.step("package")
        package.install_kit(staged)
        manifest = package.seal_bundle(staged)
        final = dest if manifest.status == "passed" else dest.with_name(dest.name + ".failed")
        zip_path = None
        if options.write_zip and manifest.status == "passed":
            # Zipped from the staged copy: a concurrent build cannot swap the directory mid-zip.
            zip_path = Path(options.out_dir) / f"{spec.name}-{profile.name}.zip"
            package.write_zip(staged, zip_path, root_name=zip_path.stem)
        builder.step("commit")
        bundle_mod.commit_dir(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return BuildResult(manifest=manifest, bundle_dir=final, exit_code=builder.exit_code, messages=builder.failures,
                       zip_path=zip_path)
