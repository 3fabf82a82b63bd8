"""build(spec, profile) -> bundle. The only place that knows the order of the steps.

    spec --stages--> float model --ONNX--> reference (onnxruntime)
         --exporter per artifact--> file --its runtime (child process)--> parity, latency, accuracy
            (steps/judge.py, one artifact at a time)
         --> each quantized artifact against its float sibling (steps/speed.py)
         --> manifest + golden I/O, written atomically to dist/<model>/<target>/
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import bundle as bundle_mod
from . import package
from .bundle import ArtifactIO, GoldenInfo, Manifest, ModelInfo, ReferenceInfo, TargetInfo, stack_samples
from .cache import (BuildCache, cache_summary, cached_model_stats, digest_arrays, digest_files, latency_log,
                    model_fingerprint, with_arm64_runs)
from .compress import run_stages
from .errors import (check_interrupted, EXIT_EXPORT_OR_RUNTIME, EXIT_PARITY_OR_BUDGET, EdgepackError, ExportError,
                     RuntimeCheckError, UntraceableModel)
from .export import RUNTIME_FOR_FORMAT, check_installed
from .export.base import ExportContext
from .export.onnx_float import export_float_onnx
from .measure import PeakTreePss, latency_summary
from .parity import compare
from .quant.calibrate import shared_calibration
from .provenance import edgepack_version, host_info, host_matches, toolchain_versions
from .runtimes import forkserver
from .spec import MAX_CALIBRATION, ModelSpec, as_numpy, calibration_list, guarded_evaluate
from .stage import StageContext, torch_outputs_fn
from .steps.judge import ArtifactJudge, Findings, Reference
from .steps.lane import ExportLane, lane_wanted, with_reproducibility
from .steps.runs import metrics, run_reference, torch_outputs as run_torch
from .steps.arm64_check import check_bundle, switched_off as arm64_switched_off
from .steps.speed import compare_with_float, prefetch_float_baselines

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
    # Print the traceback of an export or runtime failure the build records (it still goes on).
    debug: bool = False
    # The build cache (exports, reproducibility results, the float evaluation); None: none.
    cache: BuildCache | None = None
    # Seconds the caller spent loading the spec (the first step of the manifest's timings).
    spec_seconds: float | None = None
    # seconds from the process's start to reading the profile (the CLI: Python, imports, profiles)
    startup_seconds: float | None = None
    # time.perf_counter() when the caller's timed steps ended (the spec loaded): the build's first
    # step starts there, so no time falls between the steps of the manifest's timings
    clock_start: float | None = None
    # Export processes: 2 runs the fp32 baselines and the reproducibility re-exports in a second
    # process beside the build (steps/lane.py); 1 runs every export in the build's own; None:
    # measure.lane_jobs decides (2 from 4 CPUs).
    jobs: int | None = None


@dataclass
class BuildResult:
    manifest: Manifest
    bundle_dir: Path
    exit_code: int
    messages: list[str] = field(default_factory=list)  # the failures, as the CLI prints them
    zip_path: Path | None = None

    @property
    def passed(self) -> bool:
        return self.exit_code == 0

    @property
    def warnings(self) -> list[str]:
        return list(self.manifest.warnings)


class _Builder:
    def __init__(self, spec: ModelSpec, profile, profile_source: str, options: BuildOptions):
        self.spec, self.profile, self.options = spec, profile, options
        self.profile_source = profile_source
        self.threads = min(profile.device.threads, os.cpu_count() or 1)
        self.findings = Findings(debug=options.debug)
        self.timings: list[dict[str, Any]] = [
            {"step": step, "seconds": round(seconds, 3)}
            for step, seconds in (("starting edgepack (Python, imports) and reading the profile", options.startup_seconds),
                                  ("loading the spec", options.spec_seconds)) if seconds is not None]
        self.float_baselines: dict[str, Path] = {}  # format -> fp32 baseline exported to time a quantized artifact
        self.judge: ArtifactJudge | None = None
        self.lane: ExportLane | None = None  # the second export process (steps/lane.py), if any
        self.arm64_off = profile.arm64_check.enabled and arm64_switched_off()  # a bad value fails before any work
        self._step_started: tuple[str, float] | None = ("preparing the build (cache, staging directory)",
                                                         options.clock_start or time.perf_counter())
        self.score_outputs = list(spec.score_outputs) if spec.score_outputs is not None else None
        # evaluate is user code: whatever it raises becomes a SpecError naming it.
        self.evaluate = guarded_evaluate(spec.evaluate, spec.source or spec.name) if spec.evaluate else None

    def say(self, message: str) -> None:
        check_interrupted()
        self.lap(message)
        if self.options.progress:
            self.options.progress(message)

    def lap(self, next_step: str | None) -> None:
        """Close the step in progress (its wall time goes to the manifest's timings)."""
        now = time.perf_counter()
        if self._step_started is not None:
            name, started = self._step_started
            self.timings.append({"step": name, "seconds": round(now - started, 3)})
        self._step_started = (next_step, now) if next_step is not None else None

    def _reference(self, model, example, directory: Path, input_names, output_names) -> list[Path]:
        """The float model as ONNX, from the build cache when the same model (weights, structure,
        module sources), inputs and toolchain made one before."""
        cache = self.options.cache
        if cache is None:
            return export_float_onnx(model, example, directory / "reference.onnx", input_names, output_names)
        key = cache.key({"kind": "reference", "model": model_fingerprint(model), "names": [input_names, output_names],
                         "example": digest_arrays([as_numpy(example)]), "toolchain": toolchain_versions()})
        with cache.claim("reference", key) as slot:
            if slot.entry is None:
                forkserver.prestart("onnxruntime", self.threads)  # its import overlaps the export
                files = export_float_onnx(model, example, directory / "reference.onnx", input_names, output_names)
                slot.store(files, {})
                return files
        directory.mkdir(parents=True, exist_ok=True)
        for source in slot.entry.files:
            shutil.copyfile(source, directory / source.name)
        self.say("float reference: cached")
        return [directory / source.name for source in slot.entry.files]

    def _float_accuracy(self, model) -> dict[str, Any]:
        """The spec's evaluate() on the float model (and the compressed one), cached by both models'
        fingerprints and the spec file."""
        def compute() -> dict[str, Any]:
            found = {"float": metrics(self.evaluate(torch_outputs_fn(self.spec.model)))}
            if self.profile.stages:
                found["compressed_float"] = metrics(self.evaluate(torch_outputs_fn(model)))
            return found

        cache = self.options.cache
        if cache is None or not self.spec.source_sha256:  # evaluate() from a Python session: no file to key
            return compute()
        key = cache.key({"kind": "evaluate", "spec": self.spec.source_sha256,
                         "float": model_fingerprint(self.spec.model),
                         "compressed": model_fingerprint(model) if self.profile.stages else None})
        with cache.claim("evaluate", key) as slot:
            if slot.entry is None:
                slot.store([], {"accuracy": compute()})
        return dict(slot.entry.record["accuracy"])

    def step(self, name: str) -> None:
        check_interrupted()
        if self.options.step_hook:
            self.options.step_hook(name)

    # -- the build ------------------------------------------------------------------------
    def run(self, staged: Path, scratch: Path) -> Manifest:
        with PeakTreePss() as memory, shared_calibration():
            manifest = self._run(staged, scratch)
        manifest = manifest.model_copy(update={"resources": memory.record()})
        self.step("manifest")
        bundle_mod.write_manifest(staged / "manifest.json", manifest)
        return manifest

    def _run(self, staged: Path, scratch: Path) -> Manifest:
        spec, profile = self.spec, self.profile
        self.say("reading the spec's calibration and held-out samples")
        if self.options.cache is None:  # the reference's and the first artifact's; judge.py starts the rest
            for runtime in dict.fromkeys(["onnxruntime"] + [RUNTIME_FOR_FORMAT[a.format] for a in profile.artifacts
                                                             if not a.device_only][:1]):
                forkserver.prestart(runtime, self.threads)
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
            ref_files = self._reference(model, example, scratch / "reference", input_names, output_names)
        except UntraceableModel as exc:
            raise UntraceableModel(f"the float reference (ONNX): {exc.message}", exc.hint) from exc
        except ExportError as exc:
            raise ExportError(f"the float reference (ONNX, what every artifact is checked against): {exc.message}",
                              "every build exports the float model to ONNX to check the artifacts; replace the op "
                              "with one ONNX supports (run with --debug for the full error)") from exc
        parity_samples = calibration[: profile.parity.calibration_samples] + holdout
        parity_inputs = [as_numpy(s) for s in parity_samples]
        masks = {output: (mask, [x[input_names.index(mask)] for x in parity_inputs])
                 for output, mask in (spec.output_masks or {}).items()}
        if not holdout:
            self.findings.warnings.append(
                "parity ran on calibration samples only: the spec gives no held-out samples, so the parity "
                "figures show how the artifact does on the data it was calibrated on; add `holdout` to the spec")
        self.say("running the float reference on the parity set and comparing it with torch")
        reference, ref_version, ref_bench, ref_cache = run_reference(
            self.options.cache, ref_files, parity_inputs, self.threads, self.options.runtime_timeout_s, profile.latency)
        torch_outputs = run_torch(self.options.cache, model, parity_samples, parity_inputs)
        fp32_tol = profile.tolerance_for("fp32").model_dump()
        torch_parity = compare(reference, torch_outputs, fp32_tol, output_names, self.score_outputs, masks)
        if not torch_parity.passed:
            self.findings.fail("the float ONNX reference does not match the torch model: " + torch_parity.summary(),
                               EXIT_PARITY_OR_BUDGET)
        ref_bytes = sum(p.stat().st_size for p in ref_files)

        self.step("golden")
        golden_dir = staged / "golden"
        bundle_mod.save_npz(golden_dir / "inputs.npz", stack_samples(parity_inputs, input_names))
        bundle_mod.save_npz(golden_dir / "reference_outputs.npz", stack_samples(reference, output_names))

        accuracy: dict[str, Any] = {}
        if self.evaluate is not None:
            self.say("evaluating the float model")
            accuracy.update(self._float_accuracy(model))

        # torch's thread count: calibration's sums, and so int8 bytes, depend on it (EfficientNet-Lite0)
        cache_parts = {"toolchain": toolchain_versions(), "torch_threads": torch.get_num_threads(),
                       "reference": digest_files(ref_files),
                       "inputs": digest_arrays([as_numpy(example)] + [as_numpy(s) for s in calibration]),
                       "names": [input_names, output_names], "extras": sorted(stage_ctx.extras)}
        export_ctx = ExportContext(model=model, example_inputs=example, calibration=calibration,
                                   input_names=input_names, output_names=output_names, workdir=staged,
                                   threads=self.threads, train_data=spec.train_data, loss=spec.loss,
                                   reference_onnx=ref_files[0], extras=stage_ctx.extras)
        judge = ArtifactJudge(profile=profile, ctx=export_ctx, staged=staged,
                              reference=Reference(parity_inputs, reference, output_names, ref_bytes, masks),
                              findings=self.findings, say=self.say, threads=self.threads,
                              timeout_s=self.options.runtime_timeout_s, keep_going=self.options.keep_going,
                              check_reproducible=self.options.check_reproducible, evaluate=self.evaluate,
                              score_outputs=self.score_outputs, cache=self.options.cache, cache_parts=cache_parts,
                              evaluate_key=spec.source_sha256 or None)
        self.judge = judge
        self._start_lane(judge, scratch)
        artifacts = []
        for index, config in enumerate(profile.artifacts):
            self.step(f"artifact:{config.file_name}")
            artifacts.append(judge.judge(config))
            left = profile.artifacts[index + 1:]
            if artifacts[-1].status == "failed" and left and not self.options.keep_going:
                # The report still goes to <target>.failed/ with what was built so far (exit 3).
                self.findings.fail(f"stopped after {config.file_name} failed: not built {', '.join(a.file_name for a in left)}"
                                   f" (--keep-going builds them anyway)", EXIT_EXPORT_OR_RUNTIME)
                break
        self.step("float-comparison")
        self.float_baselines = compare_with_float(judge, list(profile.artifacts), artifacts, scratch)

        self.lap("assembling the manifest (model statistics, host, toolchain)")
        base_stats = cached_model_stats(self.options.cache, spec.model, example)
        ref_lat = latency_summary(ref_bench["times_ms"])
        ref_lat.update({"threads": self.threads, "warmup": profile.latency.warmup})
        if ref_cache is not None:
            ref_lat["cache"] = ref_cache
        host = host_info()
        manifest = Manifest(
            status="passed" if not self.findings.failures else "failed",
            failures=self.findings.failures,
            warnings=self.findings.warnings,
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
                              samples=len(parity_inputs), calibration_samples=len(parity_samples) - len(holdout),
                              holdout_samples=len(holdout)),
            toolchain=toolchain_versions(),
            host={**host, "matches_target": host_matches(profile.device, host)},
            timings=self.timings,
            cache=cache_summary(self.options.cache, judge.cache_log, latency_log(ref_lat, artifacts)),
        )
        return manifest

    def _start_lane(self, judge: ArtifactJudge, scratch: Path) -> None:
        """The second export process (steps/lane.py) when the build has exports for it: the fp32
        baselines are queued at once (cached ones are not), the second exports as artifacts pass."""
        if lane_wanted(self.profile, self.options.check_reproducible):
            judge.lane = self.lane = ExportLane.start(judge.ctx, self.options.jobs)[0]
            if self.lane is not None:
                prefetch_float_baselines(judge, list(self.profile.artifacts), scratch)

    def collect_reproducibility(self, manifest: Manifest) -> Manifest:
        """The lane's reproducibility results into the manifest; then the lane stops."""
        try:
            if self.lane is not None and self.judge.deferred:
                self.lap("checking the second exports (made in a second process) are byte-identical")
                manifest = with_reproducibility(self.judge, manifest)
        finally:
            self.close_lane()
        return manifest

    def close_lane(self) -> None:
        if self.lane is not None:
            self.lane, lane = None, self.lane
            lane.close()

    def check_on_arm64(self, staged: Path, manifest: Manifest) -> Manifest:
        """The sealed bundle's device kit on real arm64 code under qemu, per CPU model (profile's
        arm64_check; steps/arm64_check.py); its records go into the manifest, which payload_sha256
        does not cover, so the seal holds."""
        settings = self.profile.arm64_check
        if not settings.enabled:
            return manifest
        try:
            records = check_bundle(staged, manifest, settings, say=self.say, floats=self.float_baselines,
                                   progress=self.options.progress or (lambda message: None), passed_only=True,
                                   off=self.arm64_off, cache=self.options.cache)
        except RuntimeCheckError as exc:
            self.findings.fail(f"on emulated arm64: {exc.message}", EXIT_EXPORT_OR_RUNTIME)
            records = {}
        artifacts = []
        for art in manifest.artifacts:
            record = records.get(art.file) if art.file else None
            if record is None:
                artifacts.append(art)
                continue
            update = {"emulated_arm64": record}
            if record.status == "failed":
                self.findings.fail(f"{art.file}: on emulated arm64: {record.reason}", EXIT_PARITY_OR_BUDGET)
                if art.status == "ok":
                    update["status"] = "parity-failed"
            elif record.status == "skipped" and not (record.reason or "").startswith(
                    ("opt-in", "its build status", "switched off")):  # asked for, or recorded elsewhere
                self.findings.warnings.append(f"{art.file}: arm64 check skipped: {record.reason}")
            artifacts.append(art.model_copy(update=update))
        return manifest.model_copy(update={
            "artifacts": artifacts, "failures": list(self.findings.failures), "warnings": list(self.findings.warnings),
            "status": "passed" if not self.findings.failures else "failed",
            "cache": with_arm64_runs(manifest.cache, records)})

    def finish(self, staged: Path, manifest: Manifest) -> Manifest:
        """Close the last step and write the manifest with every step's wall time. What follows
        (this write, the zip's manifest entry, the rename into place, the exit) is not in it."""
        self.lap(None)
        manifest = manifest.model_copy(update={"timings": list(self.timings)})
        package.write_manifest_atomic(staged, manifest)
        return manifest


def bundle_path(out_dir: Path, model_name: str, target_name: str) -> Path:
    return Path(out_dir) / model_name / target_name


def build(spec: ModelSpec, profile, profile_source: str | None = None,
          options: BuildOptions | None = None) -> BuildResult:
    """Build, validate and package; place the bundle atomically.

    A passing build replaces dist/<model>/<target>/ whole. A build whose parity or budget
    fails writes its complete report to dist/<model>/<target>.failed/ and leaves the last
    good bundle untouched. A build that raises leaves nothing behind.
    """
    options = options or BuildOptions()
    check_installed(profile)
    dest = bundle_path(options.out_dir, spec.name, profile.name)
    # where the profile came from, for the manifest: the file load_target read, else the object
    source = profile_source or getattr(profile, "_source", "") or f"python: TargetProfile {profile.name!r}"
    builder = _Builder(spec, profile, source, options)
    model_dir_existed = dest.parent.exists()
    try:
        staged = bundle_mod.staging_dir(dest)
    except OSError as exc:
        raise EdgepackError(f"{dest.parent}: cannot write the bundle there: {exc.strerror or exc}",
                            "choose a writable --out directory") from exc
    zip_staged = zipper = zip_path = None
    try:
        with tempfile.TemporaryDirectory(prefix="edgepack-") as scratch:
            try:
                builder.run(staged, Path(scratch))
            except OSError as exc:
                raise package.scratch_full(exc, Path(scratch), dest.parent) or exc
            builder.step("package")
            builder.lap("packaging: device kit, checksums")
            package.install_kit(staged)
            manifest = package.seal_bundle(staged)
            # still inside the scratch directory: the instruction counts read its fp32 baselines
            builder.step("arm64")
            manifest = builder.check_on_arm64(staged, manifest)
            manifest = builder.collect_reproducibility(manifest)
            builder.lap("removing scratch files")
        if options.write_zip and manifest.status == "passed":
            # From the staged copy (no concurrent build swaps it mid-zip), in place only once the directory
            # is; the payload is compressed before the last manifest write, so the timings include it.
            builder.lap("writing the zip (deflate level 9)")
            zip_path = Path(options.out_dir) / f"{spec.name}-{profile.name}.zip"
            zip_staged = zip_path.with_name(f".{zip_path.name}.tmp-{os.getpid()}-{staged.name[-8:]}")
            zipper = package.ZipWriter(staged, zip_staged, root_name=zip_path.stem)
            zipper.add_payload()
        manifest = builder.finish(staged, manifest)
        final = dest if manifest.status == "passed" else dest.with_name(dest.name + ".failed")
        if zipper is not None:
            zipper.close()
        builder.step("commit")
        bundle_mod.commit_dir(staged, final)
        if zip_staged is not None:
            os.replace(zip_staged, zip_path)
    except BaseException:
        builder.close_lane()
        shutil.rmtree(staged, ignore_errors=True)
        if zipper is not None:
            zipper.abort()
        if zip_staged is not None:
            zip_staged.unlink(missing_ok=True)
        if not model_dir_existed:
            try:
                dest.parent.rmdir()  # only if empty: a concurrent build's bundle stays
            except OSError:
                pass
        raise
    return BuildResult(manifest=manifest, bundle_dir=final, exit_code=builder.findings.exit_code,
                       messages=builder.findings.failures, zip_path=zip_path)
