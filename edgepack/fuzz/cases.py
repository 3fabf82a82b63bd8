"""One fuzz case per kind of thing a bundle carries, each damaged and handed to the command that
reads it, with the outcome classified by the exit code that command gives.

    artifact   an artifact's bytes, checksums rewritten so the runtime loads it      -> validate
    golden     a golden .npz's bytes, checksums rewritten                            -> validate
    manifest   manifest.json's bytes, or one value of it changed (type, NaN, depth)  -> validate
    zip        the bundle's zip: bytes, an unlisted entry, a lying size, '..' names  -> validate ZIP
    report     a device report: bytes, or one value changed                          -> ingest
    link       a bundle file or folder swapped for a symlink to an identical copy
               outside the bundle: anything but exit 2 means a file outside was read  -> validate
"""

from __future__ import annotations

import json
import random
import shutil
import time
import traceback
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import EdgepackError
from .mutate import JSON_MUTATIONS, MUTATIONS, mutate, mutate_json

KINDS = ("artifact", "golden", "manifest", "zip", "report", "link")
WEIGHTS = {"artifact": 30, "golden": 15, "manifest": 20, "zip": 15, "report": 15, "link": 5}
OUTCOMES = ("0", "1", "2", "3", "internal")


@dataclass
class Case:
    case: int
    kind: str
    bundle: str
    file: str
    format: str
    mutation: str
    detail: str
    outcome: str = ""
    message: str = ""
    seconds: float = 0.0
    violation: str = ""  # a link case that did not end in a bundle error: something outside was read


@dataclass
class Base:
    """What cases start from: a built bundle, its zip, a valid device report for it."""

    bundle: Path
    artifacts: list[tuple[str, str]]  # (file, format) validate can run
    golden: list[str]
    zip_path: Path
    report: dict


def prepare_base(bundle: Path, work: Path) -> Base:
    from ..package import write_zip

    manifest = json.loads((bundle / "manifest.json").read_text())
    runnable = [a for a in manifest["artifacts"]
                if a.get("file") and a.get("files") and a.get("golden") and a.get("io") and a.get("parity")]
    golden = sorted({manifest["golden"]["inputs"], manifest["golden"]["reference_outputs"]}
                    | {p for a in runnable for p in (a["golden"]["inputs"], a["golden"]["outputs"])})
    zip_path = work / "base" / f"{bundle.parent.name}-{bundle.name}.zip"
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    write_zip(bundle, zip_path)
    report = {"schema_version": 1, "kind": "edgepack-device-report", "created_by": "device/validate.py",
              "bundle": {"model": manifest["model"]["name"], "target": manifest["target"]["name"]},
              "device": {"label": "fuzz device", "machine": "aarch64"},
              "artifacts": [{"file": a["file"], "sha256": a["sha256"], "status": "passed",
                             "parity": {"passed": True, "outputs": []},
                             "latency": {"source": "device", "tool": "device/validate.py", "threads": 1,
                                         "runs": 20, "warmup": 2, "p50_ms": 1.5, "p90_ms": 2.0, "min_ms": 1.0,
                                         "mean_ms": 1.6}} for a in runnable]}
    return Base(bundle, [(a["file"], a["format"]) for a in runnable], golden, zip_path, report)


def reseal(bundle: Path, relative: str) -> None:
    """Record ``relative``'s new sha256 and size in the manifest, as if the build had written it."""
    from ..bundle import sha256_file
    from ..package import payload_sha256

    path = bundle / relative
    digest, size = sha256_file(path), path.stat().st_size
    manifest_path = bundle / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for art in manifest["artifacts"]:
        for entry in art.get("files") or []:
            if entry["path"] == relative:
                entry.update(sha256=digest, bytes=size)
                art["bytes"] = sum(e["bytes"] for e in art["files"])
                if art.get("file") == relative:
                    art["sha256"] = digest
    package = manifest.get("package")
    if package:
        for entry in package.get("files", []):
            if entry["path"] == relative:
                entry.update(sha256=digest, bytes=size)
        package["payload_sha256"] = payload_sha256(bundle, [e["path"] for e in package.get("files", [])])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


# --- running a command in process, as the CLI would ----------------------------------------

def _guarded(call) -> tuple[str, str]:
    try:
        return call()
    except EdgepackError as exc:
        return str(exc.exit_code), exc.message
    except Exception as exc:  # the point of fuzzing: anything else is a bug, recorded, never fatal
        return "internal", f"{type(exc).__name__}: {exc} | " + traceback.format_exc(limit=-3).replace("\n", " | ")


def validate_inprocess(target: Path, file: str | None, timeout_s: float) -> tuple[str, str]:
    """What `edgepack validate TARGET [--artifact FILE]` exits with, and its message."""
    from ..steps.validate import validate_bundle

    def call():
        result = validate_bundle(target, artifact=file, threads=1, timeout_s=timeout_s)
        failed = [check.file for check in result.artifacts if not check.passed]
        return str(result.exit_code), ("parity failed: " + ", ".join(failed)) if failed else "passed"

    return _guarded(call)


def ingest_inprocess(bundle: Path, report: Path) -> tuple[str, str]:
    """What `edgepack ingest BUNDLE REPORT` exits with, and its message."""
    from ..steps.ingest import ingest_report

    def call():
        result = ingest_report(bundle, report)
        return str(result.exit_code), "; ".join(result.messages) or "ingested"

    return _guarded(call)


# --- the cases -----------------------------------------------------------------------------

def _damage_json(text: str, rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.3:
        mutation = rng.choice(MUTATIONS)
        data, detail = mutate(text.encode(), mutation, rng)
        return data.decode("utf-8", errors="surrogateescape"), mutation, detail
    mutation = rng.choice(JSON_MUTATIONS)
    changed, detail = mutate_json(text, mutation, rng)
    return changed, mutation, detail


def _damage_zip(source: Path, target: Path, rng: random.Random) -> tuple[str, str]:
    choice = rng.choice(["bytes", "bytes", "unlisted-entry", "lying-size", "escape-name", "duplicate-name"])
    if choice == "bytes":
        mutation = rng.choice(MUTATIONS)
        data, detail = mutate(source.read_bytes(), mutation, rng)
        target.write_bytes(data)
        return f"zip-{mutation}", detail
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as new, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a duplicate name is the point of one of these cases
        infos = old.infolist()
        top = infos[0].filename.split("/", 1)[0]
        victim = rng.choice([i for i in infos if not i.filename.endswith("manifest.json")])
        for info in infos:
            data = old.read(info)
            if choice == "lying-size" and info is victim:
                data += b"\0" * rng.choice([1, 1 << 20, 32 << 20])
            new.writestr(info.filename, data)
        if choice == "unlisted-entry":
            new.writestr(f"{top}/{rng.choice(['extra.bin', 'golden/x.npz', 'device/evil.py'])}",
                         b"\0" * rng.choice([10, 1 << 20, 64 << 20]))
        elif choice == "escape-name":
            new.writestr(rng.choice(["../escape.txt", "/abs.txt", f"{top}/../../up.txt"]), b"x")
        elif choice == "duplicate-name":
            new.writestr(victim.filename, b"a different file")
    return f"zip-{choice}", f"{choice} ({victim.filename})"


def _plant_link(work: Path, rng: random.Random, base: Base, outside: Path) -> tuple[str, str]:
    manifest = json.loads((work / "manifest.json").read_text())
    paths = sorted({e["path"] for e in (manifest.get("package") or {}).get("files", [])}
                   | {e["path"] for a in manifest["artifacts"] for e in a.get("files") or []})
    victim = rng.choice(paths + ["manifest.json", "golden"])
    copy = outside / victim.replace("/", "_")
    if (work / victim).is_dir():
        shutil.copytree(work / victim, copy)
        shutil.rmtree(work / victim)
    else:
        shutil.copy2(work / victim, copy)
        (work / victim).unlink()
    (work / victim).symlink_to(copy, target_is_directory=copy.is_dir())
    return victim, f"{victim} -> an identical copy outside the bundle"


def run_case(number: int, seed: int, base: Base, scratch: Path, timeout_s: float, kinds: tuple[str, ...],
             keep: Path | None = None, validate=validate_inprocess) -> Case:
    rng = random.Random(f"edgepack-fuzz:{seed}:{number}")
    kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
    work = keep if keep is not None else scratch / f"case-{number}"
    shutil.copytree(base.bundle, work, dirs_exist_ok=True)
    case = Case(case=number, kind=kind, bundle=str(base.bundle), file="", format="", mutation="", detail="")
    started = time.monotonic()
    try:
        if kind == "artifact":
            case.file, case.format = base.artifacts[rng.randrange(len(base.artifacts))]
            case.mutation = rng.choice(MUTATIONS)
            data, case.detail = mutate((work / case.file).read_bytes(), case.mutation, rng)
            (work / case.file).write_bytes(data)
            reseal(work, case.file)
            case.outcome, message = validate(work, case.file, timeout_s)
        elif kind == "golden":
            case.file, case.format = rng.choice(base.golden), "npz"
            case.mutation = rng.choice(MUTATIONS)
            data, case.detail = mutate((work / case.file).read_bytes(), case.mutation, rng)
            (work / case.file).write_bytes(data)
            reseal(work, case.file)
            case.outcome, message = validate(work, None, timeout_s)
        elif kind == "manifest":
            case.file, case.format = "manifest.json", "json"
            text, case.mutation, case.detail = _damage_json((work / "manifest.json").read_text(), rng)
            (work / "manifest.json").write_bytes(text.encode("utf-8", errors="surrogateescape"))
            case.outcome, message = validate(work, None, timeout_s)
        elif kind == "zip":
            case.file, case.format = base.zip_path.name, "zip"
            target = work.parent / f"{work.name}.zip"
            case.mutation, case.detail = _damage_zip(base.zip_path, target, rng)
            try:
                case.outcome, message = validate(target, None, timeout_s)
            finally:
                target.unlink(missing_ok=True)
        elif kind == "report":
            case.file, case.format = "device_report.json", "json"
            text, case.mutation, case.detail = _damage_json(json.dumps(base.report), rng)
            report = work.parent / f"{work.name}.report.json"
            report.write_bytes(text.encode("utf-8", errors="surrogateescape"))
            try:
                case.outcome, message = ingest_inprocess(work, report)
            finally:
                report.unlink(missing_ok=True)
        else:  # link
            outside = work.parent / f"{work.name}.outside"
            outside.mkdir(exist_ok=True)
            try:
                case.file, case.detail = _plant_link(work, rng, base, outside)
                case.format, case.mutation = "symlink", "symlink-out"
                case.outcome, message = validate(work, None, timeout_s)
            finally:
                shutil.rmtree(outside, ignore_errors=True)
            if case.outcome != "2":
                case.violation = "read a file outside the bundle"
        case.message = message if case.outcome == "internal" else message.splitlines()[0] if message else ""
    finally:
        case.seconds = round(time.monotonic() - started, 3)
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return case
