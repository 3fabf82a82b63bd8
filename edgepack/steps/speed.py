"""A quantized artifact against a float sibling of its format, timed side by side in one build,
and the profile's ``slower_than_float`` policy (fail | warn | keep_float) applied to the result.

The float sibling is the profile's own fp32 artifact of that format when it has one, else an fp32
baseline exported only for this comparison (not shipped). Host latency is not device latency:
the figure the policy judges is this host's, and the manifest says so.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import ArtifactEntry
from ..cache import measured
from ..errors import EXIT_PARITY_OR_BUDGET, ExportError, RuntimeCheckError
from ..export import RUNTIME_FOR_FORMAT, registry as exporter_registry
from ..measure import latency_summary
from ..runtimes.base import to_native
from ..runtimes.session import RuntimeSession
from .judge import ArtifactJudge
from .lane import baseline_formats
from .runs import latency_parts


def compare_with_float(judge: ArtifactJudge, configs: list[Any], entries: list[ArtifactEntry],
                       scratch: Path) -> dict[str, Path]:
    """Record each quantized artifact's host latency against a float sibling of its format,
    measured side by side in this build, and apply the profile's slower_than_float policy.
    Returns the fp32 baselines exported for it (format -> path in scratch; the arm64 check
    counts their instructions)."""
    policy = judge.profile.slower_than_float
    staged, feeds = judge.staged, judge.reference.inputs[0]
    floats = {c.format: e for c, e in zip(configs, entries) if e.precision == "fp32" and e.status == "ok"}
    baselines: dict[str, Path | str] = {}  # format -> the baseline's path, or why there is none
    for config, entry in zip(configs, entries):
        if entry.precision == "fp32" or entry.latency is None:
            continue
        sibling = floats.get(config.format)
        try:
            if sibling is not None:
                float_path, source = staged / main_path(sibling), f"artifact {sibling.file}"
            else:
                if config.format not in baselines:
                    baselines[config.format] = export_float_baseline(judge, config, scratch)
                if isinstance(baselines[config.format], str):
                    raise ExportError(baselines[config.format])
                float_path, source = baselines[config.format], "fp32 baseline exported for this comparison (not shipped)"
            judge.say(f"timing {entry.file} against its fp32 sibling, side by side")
            comparison = side_by_side(judge, config.format, staged / main_path(entry), float_path, feeds)
        except (ExportError, RuntimeCheckError) as exc:
            # An auxiliary measurement: its failure never sinks an artifact that passed.
            if sibling is None:
                baselines.setdefault(config.format, exc.message)
            reason = exc.message.splitlines()[0]
            entry.latency["float_comparison"] = {"unavailable": reason}
            judge.findings.warnings.append(f"{entry.file}: no speed comparison with float: {reason}")
            continue
        speedup = comparison["float_p50_ms"] / comparison["p50_ms"]
        entry.latency["float_comparison"] = {**comparison, "speedup_vs_float": round(speedup, 3),
                                             "ratio_to_float": round(1 / speedup, 3), "float_source": source}
        if speedup > 1.0:
            continue
        finding = (f"{entry.file}: {entry.precision} is not faster than float on this host "
                   f"(p50 {comparison['p50_ms']:.3f} ms vs {comparison['float_p50_ms']:.3f} ms side by side, "
                   f"{speedup:.2f}x)")
        if policy == "warn":
            judge.findings.warnings.append(finding + "; host latency is not device latency")
            entry.notes.append(finding)
        elif policy == "fail" and entry.status == "ok":
            entry.status = "slower-than-float"
            judge.findings.fail(finding + " (profile: slower_than_float: fail)", EXIT_PARITY_OR_BUDGET)
        elif policy == "keep_float" and entry.status == "ok":
            for item in entry.files:
                (staged / item.path).unlink(missing_ok=True)
            for golden in (entry.golden.inputs, entry.golden.outputs):
                (staged / golden).unlink(missing_ok=True)
            entry.status, entry.files, entry.golden = "replaced-by-float", [], None
            entry.notes.append(finding + f"; not shipped, use {sibling.file} (profile: slower_than_float: keep_float)")
            judge.findings.warnings.append(entry.notes[-1])
    return {fmt: path for fmt, path in baselines.items() if isinstance(path, Path)}


def side_by_side(judge: ArtifactJudge, fmt: str, path: Path, float_path: Path, feeds: list[np.ndarray]) -> dict:
    """The comparison below, measured once per pair of files and host with a build cache (its
    ``cache`` says when and where); --no-cache measures again."""
    runtime = RUNTIME_FOR_FORMAT[fmt]
    parts = latency_parts([path, float_path], runtime, judge.threads, judge.profile.latency, feeds,
                          rounds=judge.profile.latency.comparison_rounds)
    figures, note = measured(judge.cache, "latency-pair", parts,
                             lambda: _measure_side_by_side(judge, runtime, path, float_path, feeds))
    return {**figures, "cache": note} if note is not None else figures


def _measure_side_by_side(judge: ArtifactJudge, runtime: str, path: Path, float_path: Path,
                          feeds: list[np.ndarray]) -> dict:
    """p50 of an artifact and of its float sibling, both loaded at once (two runtime
    workers) and run in alternating rounds, so a host that slows down or speeds up during
    the build (other jobs, CPU frequency, caches) affects both alike. Measuring each right
    after its own load, minutes apart, gave MobileNetV2's int8 ONNX 1.17x over fp32 in one
    build and 1.52x in a side-by-side benchmark on the same host."""
    settings, timeout = judge.profile.latency, judge.timeout_s
    times: dict[str, list[float]] = {"quantized": [], "float": []}
    with RuntimeSession(runtime, path, judge.threads, timeout) as quantized, \
            RuntimeSession(runtime, float_path, judge.threads, timeout) as floating:
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
                      f"{settings.runs} runs each, {judge.threads} threads"}


def _baseline(config: Any, scratch: Path) -> tuple[Any, Path]:
    """The fp32 config of ``config``'s format exported for the comparison only (never shipped),
    and the directory it goes to."""
    entry = exporter_registry()[config.format]
    baseline = entry.config.model_validate({"format": config.format, "precision": "fp32",
                                            "name": f"{config.name}-float-baseline"})
    return baseline, scratch / f"float-baseline-{config.format}"


def prefetch_float_baselines(judge: ArtifactJudge, configs: list[Any], scratch: Path) -> None:
    """Queue on the judge's lane (steps/lane.py) the fp32 baselines compare_with_float will
    want: one per format with a quantized artifact run here and no fp32 artifact beside it, and
    not in the build cache. compare_with_float then waits for them instead of exporting."""
    wanted = baseline_formats(configs)
    for config in configs:
        if config.precision == "fp32" or config.device_only or config.format not in wanted:
            continue
        baseline, workdir = _baseline(config, scratch)
        if not judge.lane.has(baseline.file_name) and not judge.is_cached(baseline):
            judge.lane.submit(baseline.file_name, baseline, workdir)


def export_float_baseline(judge: ArtifactJudge, config: Any, scratch: Path) -> Path:
    """An fp32 artifact of ``config``'s format, for the comparison only (never shipped)."""
    baseline, workdir = _baseline(config, scratch)
    workdir.mkdir(exist_ok=True)
    judge.say(f"exporting an fp32 {config.format} baseline to compare {config.file_name}'s latency"
              + (" (in the second process)" if judge.lane is not None and judge.lane.has(baseline.file_name) else ""))
    # An fp32 export takes less memory than the int8 ones (no calibration); the idle servers it
    # would stop are the ones the comparisons right after run in.
    return judge.export(baseline, dataclasses.replace(judge.ctx, workdir=workdir), pause_runtimes=False)[0].files[0]


def main_path(entry: ArtifactEntry) -> str:
    """The bundle-relative path of an entry's main file (the one a runtime loads)."""
    return next(item.path for item in entry.files if Path(item.path).name == entry.file)
