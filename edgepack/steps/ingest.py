"""Merge a device_report.json (from device/validate.py or device/run_android.sh) into a bundle.

    edgepack ingest dist/<model>/<target> device_report.json

For each artifact the report measured (matched by file name and sha256), the manifest gets
``artifacts[].device_latency`` (source "device", the tool, the device, p50/p90/min/mean) and the
profile's budgets are checked again with the device figure (p50, or the mean when the tool
reports only a mean). The report itself is summarised in ``device_measurements``.

A report the kit wrote under an emulator (device.emulated, latency source "emulated": what
`validate --arm64` runs under qemu) is refused (exit 2): emulated time is not device latency.

A device parity failure or a budget exceeded on the device marks the artifact and the manifest
failed and exits 1; a runtime error on the device exits 3. Ingest adds failures, it never
clears one recorded by the build or an earlier ingest: rebuild to start again. Ingesting the
same report twice replaces its earlier entry. manifest.json is rewritten atomically and is
checked against the JSON Schema before it is written; payload_sha256 does not cover it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import ValidationError

from ..bundle import DeviceLatency, DeviceMeasurement, DeviceReport, Manifest, load_json_schema
from ..intake import (MAX_REPORT_BYTES, brief_parity, clean_device, load_bundle_manifest, parse_json, printable,
                      read_limited)
from ..errors import EXIT_EXPORT_OR_RUNTIME, EXIT_OK, EXIT_PARITY_OR_BUDGET, BundleError
from ..package import write_manifest_atomic
from ..target import Budgets

@dataclass
class IngestResult:
    manifest: Manifest
    measurement: DeviceMeasurement
    exit_code: int
    messages: list[str] = field(default_factory=list)


def read_report(path: Path) -> tuple[DeviceReport, str]:
    """A device report, read as untrusted input: a regular file of at most MAX_REPORT_BYTES,
    JSON without NaN/Infinity and nested at most MAX_JSON_DEPTH deep, every figure finite and
    in range; its device description and parity figures kept bounded and printable."""
    path = Path(path)
    raw = read_limited(path, MAX_REPORT_BYTES, "device report")
    data = parse_json(raw, str(path), "device report")
    emulated = _emulated(data)
    if emulated:
        raise BundleError(f"{path}: measured under an emulator ({printable(emulated, 200)}), not on a device: emulated "
                          f"time is not device latency, so it is not merged as a device measurement",
                          "run device/validate.py on the phone itself; `edgepack validate BUNDLE --arm64` records "
                          "emulated arm64 runs (parity, bit-identity) in the manifest without latency")
    try:
        report = DeviceReport.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BundleError(f"{path}: not an edgepack device report: {where}: {printable(err['msg'], 200)}",
                          "pass the device_report.json written by device/validate.py or run_android.sh") from None
    report.device = clean_device(report.device)
    for artifact in report.artifacts:
        artifact.parity = brief_parity(artifact.parity)
        artifact.reason = printable(artifact.reason, 1000) if artifact.reason is not None else None
    if report.error is not None:
        report.error = printable(report.error, 1000)
    return report, hashlib.sha256(raw).hexdigest()


def _emulated(data: Any) -> str | None:
    """What emulated the report's run (the kit sets device.emulated and latency source "emulated"
    under qemu), else None."""
    if not isinstance(data, dict):
        return None
    device = data.get("device") if isinstance(data.get("device"), dict) else {}
    if device.get("emulated"):
        marker = device["emulated"]
        return str(marker.get("by") if isinstance(marker, dict) else marker)
    for art in data.get("artifacts") if isinstance(data.get("artifacts"), list) else []:
        latency = art.get("latency") if isinstance(art, dict) else None
        if isinstance(latency, dict) and latency.get("source") == "emulated":
            return str(latency.get("label") or "an emulator")
    return None


def _label(device: dict[str, Any]) -> str:
    return str(device.get("label") or device.get("model") or device.get("machine") or "device")


def _parity_failures(parity: dict[str, Any] | None) -> str:
    if not parity:
        return "no figures in the report"
    bits = [f"{o.get('name')}: " + "; ".join(o.get("failures") or []) for o in parity.get("outputs") or []
            if not o.get("passed", True)]
    return ", ".join(bits) or "see the report"


def ingest_report(bundle_dir: Path, report_path: Path) -> IngestResult:
    root = Path(bundle_dir)
    manifest = load_bundle_manifest(root)
    report, report_sha = read_report(report_path)
    report_path = Path(report_path)
    if report.error:
        raise BundleError(f"{report_path}: the device run stopped before measuring: {report.error}",
                          "fix that on the device and run device/validate.py again")
    if report.bundle:
        for key, mine in (("model", manifest.model.name), ("target", manifest.target.name)):
            theirs = report.bundle.get(key)
            if theirs is not None and theirs != mine:
                raise BundleError(f"{report_path}: measured {key} {printable(repr(theirs), 100)}, this bundle is {key} {mine!r}",
                                  "ingest the report into the bundle it was made from")
    by_file = {a.file: a for a in manifest.artifacts if a.file}
    try:
        budgets = Budgets.model_validate(manifest.target.profile.get("budgets") or {})
    except ValidationError as exc:
        raise BundleError(f"{root / 'manifest.json'}: target.profile.budgets is not a valid budgets block: "
                          f"{exc.errors()[0]['msg']}", "rebuild the bundle") from None
    label = _label(report.device)
    failures: list[str] = []
    summaries: list[dict[str, Any]] = []
    exit_code = EXIT_OK
    updated = {}
    for rep in report.artifacts:
        art = by_file.get(rep.file)
        if art is None:
            raise BundleError(f"{report_path}: reports {printable(repr(rep.file), 100)}, which this bundle does not ship",
                              "ingest the report into the bundle it was made from")
        if rep.sha256 and art.sha256 and rep.sha256 != art.sha256:
            raise BundleError(f"{report_path}: measured a different {printable(rep.file, 100)} (sha256 {rep.sha256[:16]}..., "
                              f"bundle {art.sha256[:16]}...)", "ingest the report into the bundle it was made from")
        summary: dict[str, Any] = {"file": rep.file, "status": rep.status, "runtime": rep.runtime,
                                   "runtime_version": rep.runtime_version}
        summaries.append(summary)
        if rep.status == "skipped":
            summary["reason"] = rep.reason
            continue
        mine: list[str] = []
        if rep.status == "error":
            summary["reason"] = rep.reason
            mine.append(f"{rep.file}: the runtime failed on {label}: {rep.reason}")
            exit_code = max(exit_code, EXIT_EXPORT_OR_RUNTIME)
        parity_passed = {"passed": True, "parity-failed": False}.get(rep.status)
        if rep.parity is not None:
            summary["parity"] = rep.parity
        if parity_passed is False:
            mine.append(f"{rep.file}: parity failed on {label}: {_parity_failures(rep.parity)}")
            exit_code = max(exit_code, EXIT_PARITY_OR_BUDGET)
        entry = art
        lat = rep.latency
        if lat is not None and (lat.p50_ms is not None or lat.mean_ms is not None):
            statistic = "p50_ms" if lat.p50_ms is not None else "mean_ms"
            value = float(getattr(lat, statistic))
            budget = budgets.check(art.bytes, value, latency_source="device",
                                   latency_label=f"device {statistic[:-3]}", statistic=statistic, latency_ms=value)
            over = budget["failures"] if budget else []
            if over:
                mine.append(f"{rep.file}: budget exceeded on {label} ({lat.tool}): " + "; ".join(over))
                exit_code = max(exit_code, EXIT_PARITY_OR_BUDGET)
            device_latency = DeviceLatency(
                tool=lat.tool, device=report.device, runtime=lat.runtime or rep.runtime,
                runtime_version=lat.runtime_version or rep.runtime_version, threads=lat.threads,
                warmup=lat.warmup, runs=lat.runs, p50_ms=lat.p50_ms, p90_ms=lat.p90_ms, min_ms=lat.min_ms,
                mean_ms=lat.mean_ms, budget_statistic=statistic, parity_passed=parity_passed, budgets=budget,
                report_sha256=report_sha)
            summary["latency"] = lat.model_dump()
            summary["budgets"] = budget
            entry = entry.model_copy(update={"device_latency": device_latency})
        elif rep.status in ("passed", "measured"):
            summary["note"] = "no latency in the report"
        # A runtime error on the device fails the manifest but keeps the artifact's host verdict.
        if entry.status == "ok" and parity_passed is False:
            entry = entry.model_copy(update={"status": "parity-failed"})
        elif entry.status == "ok" and summary.get("budgets") and not summary["budgets"]["passed"]:
            entry = entry.model_copy(update={"status": "budget-exceeded"})
        failures += mine
        updated[rep.file] = entry
    if not any(s["status"] != "skipped" for s in summaries):
        raise BundleError(f"{report_path}: measured nothing (every artifact was skipped or none was listed)",
                          "install a runtime on the device (see device/README.md) and run the kit again")

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    measurement = DeviceMeasurement(report=report_path.name, report_sha256=report_sha, created_by=report.created_by,
                                    created_at=report.created_at, ingested_at=now, device=report.device,
                                    passed=not failures, failures=failures, artifacts=summaries)
    manifest_failures = list(manifest.failures)
    for message in failures:
        text = f"device: {message}"
        if text not in manifest_failures:
            manifest_failures.append(text)
    new = manifest.model_copy(update={
        "artifacts": [updated.get(a.file, a) if a.file else a for a in manifest.artifacts],
        "device_measurements": [m for m in manifest.device_measurements if m.report_sha256 != report_sha]
        + [measurement],
        "failures": manifest_failures,
        "status": "failed" if manifest_failures else manifest.status,
    })
    data = json.loads(new.model_dump_json())
    try:
        jsonschema.validate(data, load_json_schema())
    except jsonschema.ValidationError as exc:  # a bug here, not in the user's files: say so plainly
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise BundleError(f"ingest produced a manifest that fails the schema at {where}: {exc.message[:200]}",
                          "manifest.json was left unchanged; report this as an edgepack bug") from None
    new = Manifest.model_validate(data)
    write_manifest_atomic(root, new)
    return IngestResult(manifest=new, measurement=measurement, exit_code=exit_code, messages=failures)
