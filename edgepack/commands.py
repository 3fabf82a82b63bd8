"""What each command does and prints (cli.py parses the command line and runs one of these).
Every function takes the parsed arguments and the Terminal, and returns the exit code."""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from .cache import BuildCache
from .errors import EdgepackError
from .measure import lane_jobs, process_age_seconds
from .tables import (arm64_table, bundles_table, diagnosis_table, fleet_table, gpu_table, print_manifest,
                     validation_table)
from .terminal import BuildProgress, Terminal, build_log_path, error_json, previous_timings

# `diagnose` says "nothing to keep in float" only with at least this much SQNR to spare.
WIDE_MARGIN_DB = 3.0


def cmd_build(args, term: Terminal) -> int:
    """One spec for one or more targets (--target a --target b): the spec is loaded once and,
    through the build cache, the float reference and evaluation are made once. A target that
    raises is recorded and the others still build (one target: the error ends the run, as any
    command's; --debug: it always does). Exit: the worst."""
    if lane_jobs(args.jobs) > 1:
        # Before torch loads libgomp (which reads it once), unless the environment says otherwise:
        # with the second export process on the same cores, OpenMP threads that spin while they
        # wait starve it (EfficientNet-Lite0 android-arm64 with it: 179 s spinning, 133-135 s
        # passive; alone on a quiet 2-core host passive cost 7%: 147-149 s against 136 s).
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .export import check_installed
    from .pipeline import bundle_path
    from .spec import load_spec
    from .target import load_target

    targets = list(dict.fromkeys(args.target))
    profiles = [load_target(target, settings=args.set) for target in targets]
    for profile in profiles:
        check_installed(profile)  # before loading the spec: a missing extra is named at once
    startup_seconds = process_age_seconds()  # the build's wall time starts with the process
    started = time.perf_counter()
    spec = load_spec(args.spec)
    spec_loaded = time.perf_counter()
    spec_seconds = spec_loaded - started
    for note in spec.notes:
        term.err.print(f"[yellow]note:[/] {escape(note)}")
    several = len(profiles) > 1
    results = []  # a BuildResult, or the EdgepackError a target raised
    for target, profile in zip(targets, profiles):
        if several and not args.quiet:
            term.err.print(f"[bold]{spec.name} for {profile.name}[/] ({len(results) + 1}/{len(profiles)})")
        first = not results
        try:
            results.append(_build_one(args, term, spec, target, profile, spec_seconds if first else None,
                                      startup_seconds if first else None, spec_loaded if first else None))
        except EdgepackError as exc:
            if not several or args.debug:
                raise
            term.print_error(exc.kind, exc.message, exc.hint, where=f"target {profile.name}: ")
            results.append(exc)
    built = [r for r in results if not isinstance(r, EdgepackError)]
    if not several:
        term.bundle_dir = results[0].bundle_dir
    elif built:  # the log of the whole run goes beside the bundles, named after every target
        term.bundle_dir = bundle_path(Path(args.out), spec.name, "+".join(p.name for p in profiles))
    # else no bundle directory may exist: the log is kept as a failed single-target build's is
    codes = [r.exit_code for r in results]
    if several and not args.quiet:
        term.err.print(f"[bold]{len(built)} of {len(results)} targets built[/]: " + ", ".join(
            f"{escape(p.name)} " + ("[green]passed[/]" if code == 0 else f"[red]exit {code}[/]")
            for p, code in zip(profiles, codes)))
    if args.json:
        log = build_log_path(term.bundle_dir) if term.bundle_dir is not None else term.log_path
        entries = [{"target": {"name": p.name}, **error_json(r.kind, r.message, r.hint, r.exit_code, log)}
                   if isinstance(r, EdgepackError) else r.manifest.model_dump(mode="json")
                   for p, r in zip(profiles, results)]
        term.write_json(entries if several else entries[0])
    return max(codes)


def _build_one(args, term: Terminal, spec, target: str, profile, spec_seconds: float | None,
               startup_seconds: float | None = None, clock_start: float | None = None):
    from .pipeline import BuildOptions, build, bundle_path

    dest = bundle_path(Path(args.out), spec.name, profile.name)
    progress = None
    if not args.quiet:
        previous = previous_timings(dest / "manifest.json") or previous_timings(
            dest.with_name(dest.name + ".failed") / "manifest.json")
        progress = BuildProgress(term.err, previous)
        if not args.no_repro_check and any(a.format in ("pte", "tflite") for a in profile.artifacts):
            term.err.print("[dim]each artifact is exported twice to check its bytes are reproducible (about a "
                           "quarter of an Android build; a cached export reuses its check); --no-repro-check "
                           "skips that[/]")
    options = BuildOptions(out_dir=Path(args.out), keep_going=args.keep_going, progress=progress,
                           check_reproducible=not args.no_repro_check, write_zip=not args.no_zip, debug=args.debug,
                           cache=None if args.no_cache else BuildCache.from_env(), spec_seconds=spec_seconds,
                           startup_seconds=startup_seconds, clock_start=clock_start, jobs=args.jobs)
    try:
        result = build(spec, profile, str(target) + "".join(f" --set {s}" for s in args.set or []), options)
    finally:
        if progress is not None:
            progress.close()
    manifest = result.manifest
    if not args.json and not args.quiet:
        print_manifest(manifest, term.out)
    for warning in manifest.warnings:
        term.err.print(f"[yellow]warning:[/] {escape(warning)}")
    counted = f" ({len(manifest.warnings)} warning{'s' if len(manifest.warnings) != 1 else ''})" \
        if manifest.warnings else ""
    took = f" in {progress.elapsed:.1f} s" if progress is not None else ""
    cached = _cached_note(manifest.cache)
    if result.exit_code:
        for message in result.messages:
            term.err.print(f"[bold red]failed:[/] {escape(message)}")
        term.err.print(f"report written to {result.bundle_dir}{took}{counted}; the last good bundle was left untouched")
    elif not args.quiet:
        term.err.print(f"[green]bundle:[/] {result.bundle_dir}" + (f"  zip: {result.zip_path}" if result.zip_path else "")
                       + took + cached + counted)
    return result


def _cached_note(cache: dict) -> str:
    """What a build took from the build cache, for its last line: every export, and the host
    latency and emulated arm64 runs when all of them came from it too."""
    if not cache.get("hit"):
        return ""
    parts = ["every export"]
    latency = cache.get("latency") or []
    if latency and all(entry["hit"] for entry in latency):
        parts.append(f"host latency (measured {min(entry['measured_at'] for entry in latency)})")
    runs = cache.get("arm64_runs") or []
    if runs and all(run["hit"] for run in runs):
        parts.append(f"{len(runs)} emulated arm64 run{'s' if len(runs) != 1 else ''}")
    return ", cached: " + ", ".join(parts)


def cmd_diagnose(args, term: Terminal) -> int:
    """edgepack diagnose SPEC --target T [--out DIR] [--samples N] [--top K] [--json]"""
    from .analysis.diagnose import DIAGNOSIS_SAMPLES, run_diagnosis
    from .errors import ExportError
    from .spec import load_spec
    from .target import load_target

    err = term.err
    profile = load_target(args.target, settings=args.set)
    spec = load_spec(args.spec)
    out_dir = Path(getattr(args, "out", None) or Path("dist") / spec.name / f"{profile.name}.diagnosis")
    quiet = getattr(args, "quiet", False)
    try:
        report = run_diagnosis(spec, profile, out_dir, samples=getattr(args, "samples", None) or DIAGNOSIS_SAMPLES,
                               progress=None if quiet else (lambda m: err.print(f"[dim]{m}[/]")))
    except EdgepackError:
        raise
    except Exception as exc:  # torch.export / PT2E on user models: name the step, keep the cause for --debug
        raise ExportError(f"diagnose {spec.name} on {profile.name}: quantizing the model with the profile's int8 "
                          f"recipe (torch.export + PT2E) failed: {type(exc).__name__}: {str(exc)[:300]}",
                          "run `edgepack build` to see which format fails, or --debug for the traceback") from exc
    if getattr(args, "json", False):
        term.write_json(report)
        return 0
    if not report.get("quantizer", "executorch").startswith("executorch"):
        err.print(f"[yellow]note:[/] executorch is not installed: diagnosed with {report['quantizer']}, the same "
                  f"recipe through an older copy of the XNNPACK quantizer; per-layer figures can differ by a few dB "
                  f"from a .pte build (pip install 'edgepack[executorch]')")
    table = diagnosis_table(report, f"{spec.name} on {profile.name}", getattr(args, "top", None) or 10)
    term.out.print(table)
    margin, thresholds = report.get("margin_db"), report.get("thresholds") or {}
    passes = margin is not None and margin >= 0 and report["output"]["cosine_min"] >= (thresholds.get("min_cosine") or -1)
    if passes and margin >= WIDE_MARGIN_DB:
        err.print(f"passes with {margin:.1f} dB margin over the profile's SQNR threshold "
                  f"({thresholds.get('min_sqnr_db')} dB) and its cosine threshold; nothing to keep in float")
    elif report["float_groups"]:
        lead = f"passes with only {margin:.1f} dB margin; for more, keep" if passes else "to keep"
        err.print(f"{lead} the worst in fp32: float_layers: {report['float_groups'][0]}  "
                  f"({escape(report['float_group_reasons'][0])})")
    err.print(f"report: {report['files']['json']}  chart: {report['files']['chart']}")
    return 0


def cmd_targets(args, term: Terminal) -> int:
    from .target import dump_profile, known_targets, load_target

    if args.action == "show":
        if not args.name:
            raise EdgepackError("targets show needs a NAME", "run `edgepack targets` to list them")
        profile = load_target(args.name, settings=args.set)
        if args.json:
            term.write_json(profile.model_dump(mode="json"))
        else:
            term.raw_stdout.write(dump_profile(profile))
        return 0
    names = known_targets()
    if args.json:
        rows = []
        for name in names:
            profile = load_target(name)
            rows.append({"name": name, "description": profile.description,
                         "formats": [f"{a.format}:{a.precision}" for a in profile.artifacts]})
        term.write_json(rows)
        return 0
    table = Table(title="targets")
    for column in ("name", "artifacts", "description"):
        table.add_column(column)
    for name in names:
        profile = load_target(name)
        table.add_row(name, ", ".join(f"{a.file_name} ({a.precision})" for a in profile.artifacts), profile.description)
    term.out.print(table)
    return 0


def cmd_inspect(args, term: Terminal) -> int:
    """A bundle directory or its zip: the checked manifest. A model folder (dist/<model>): its bundles."""
    import tempfile
    import zipfile

    from .intake import load_bundle_manifest
    from .steps.validate import extract_bundle_zip, verify_files

    path = Path(args.bundle)
    if path.is_file() and zipfile.is_zipfile(path):
        with tempfile.TemporaryDirectory(prefix="edgepack-inspect-") as scratch:
            root, _ = extract_bundle_zip(path, Path(scratch))
            manifest = load_bundle_manifest(root)
            verify_files(root, manifest)
    elif path.is_dir() and not (path / "manifest.json").exists() and any(path.glob("*/manifest.json")):
        rows = []
        for candidate in sorted(path.glob("*/manifest.json")):
            try:
                found = load_bundle_manifest(candidate.parent)
                rows.append({"bundle": str(candidate.parent), "target": found.target.name, "status": found.status,
                             "artifacts": [a.file for a in found.artifacts if a.file]})
            except EdgepackError as exc:
                rows.append({"bundle": str(candidate.parent), "target": candidate.parent.name, "status": "unreadable",
                             "artifacts": [], "error": exc.message})
        if args.json:
            term.write_json(rows)
        else:
            term.out.print(bundles_table(path, rows))
        return 0
    else:
        manifest = load_bundle_manifest(path)
        verify_files(path, manifest)  # a bundle whose files don't match is not shown as valid
    if args.json:
        term.write_json(manifest.model_dump(mode="json"))
    else:
        print_manifest(manifest, term.out)
    return 0


def cmd_validate(args, term: Terminal) -> int:
    from .steps.validate import Arm64Request, validate_bundle

    if (args.cpu or args.executorch) and not args.arm64:
        raise EdgepackError("--cpu and --executorch go with --arm64", "add --arm64")
    progress = None if args.json else (lambda message: term.err.print(f"[dim]·[/] {escape(message)}"))
    result = validate_bundle(Path(args.bundle), artifact=args.artifact, threads=args.threads,
                             timeout_s=args.timeout, progress=progress, gpu=args.gpu,
                             arm64=Arm64Request(args.cpu, args.executorch) if args.arm64 else None)
    if args.json:
        term.write_json(result.to_dict())
        return result.exit_code
    table = validation_table(result)
    term.out.print(table)
    if result.gpu:
        term.out.print(gpu_table([(g.file, g.record) for g in result.gpu], "GPU path, re-run on this host"))
    if result.arm64:
        term.out.print(arm64_table(list(result.arm64.items()), "device kit on arm64 code under qemu-aarch64 "
                                                               "(emulated; not device time)"))
        for file, record in result.arm64.items():
            if record.status == "failed":
                term.err.print(f"[bold red]arm64 failure:[/] {file}: " + escape(record.reason or ""))
    for note in result.skipped:
        term.err.print(f"[yellow]skipped:[/] {escape(note)}")
    for check in result.artifacts:
        if not check.passed:
            term.err.print(f"[bold red]parity failure:[/] {check.file}\n" + escape(check.parity.summary()))
    if result.manifest.status != "passed":
        term.err.print(f"[bold red]this bundle's build failed[/] (parity re-checked here: "
                          f"{'passed' if result.parity_passed else 'failed'}); the build recorded:")
        for failure in result.manifest.failures:
            term.err.print("  " + escape(failure.splitlines()[0]))
    for check in result.gpu:
        if not check.passed:
            term.err.print(f"[bold red]GPU path failure:[/] {check.file}: " + escape(check.record.reason or ""))
    if result.exit_code == 0:
        ran = [r for r in result.arm64.values() if r.runs]
        gpu = (f", {len(result.gpu)} on the GPU path" if result.gpu else "") + (
            f", {len(ran)} on {len(ran[0].runs)} emulated arm64 CPU(s)" if ran else "")
        term.err.print(f"[green]passed:[/] {len(result.artifacts)} artifact(s){gpu}, "
                          f"{result.files_verified} file(s) verified")
    return result.exit_code


def cmd_gpu_setup(args, term: Terminal) -> int:
    from .emulators import lavapipe

    driver = lavapipe.ensure(say=None if args.json else (lambda m: term.err.print(f"[dim]·[/] {escape(m)}")))
    if args.json:
        term.write_json({**driver.describe(), "environment": driver.environment()})
    else:
        described = driver.describe()
        term.err.print(f"[green]ready:[/] {described['name']} {described['package_version']}: {described['device']}, "
                          f"{described['driver_info']}, Vulkan {described['vulkan_api']} (in {driver.directory.parent})")
    return 0


def cmd_arm64_setup(args, term: Terminal) -> int:
    from .emulators import arm64_python, qemu_counting

    say = None if args.json else (lambda m: term.err.print(f"[dim]·[/] {escape(m)}"))
    runtimes = ("executorch", "litert", "onnxruntime") if args.executorch else ("litert", "onnxruntime")
    guest = arm64_python.ensure(arm64_python.runtime_pins({}, runtimes), runtimes, say)
    described = {**guest.describe(), "site": str(guest.site), "sysroot": str(guest.sysroot)}
    if args.counts:
        described["counting"] = qemu_counting.ensure(say).describe()
    if args.json:
        term.write_json(described)
    else:
        term.err.print(f"[green]ready:[/] {escape(described['emulator'])}; {escape(described['python'])}; "
                       f"{escape(', '.join(guest.pins))}" + ("; instruction counting" if args.counts else ""))
    return 0


def cmd_ingest(args, term: Terminal) -> int:
    from .intake import printable
    from .steps.ingest import ingest_report

    result = ingest_report(Path(args.bundle), Path(args.report))
    if args.json:
        term.write_json(result.manifest.model_dump(mode="json"))
    else:
        # Everything below comes from the report (untrusted): printed without control characters.
        device = result.measurement.device
        term.err.print(escape(f"device: {printable(device.get('label') or device.get('machine') or 'unknown')} "
                                  f"({printable(result.measurement.created_by)})"))
        for summary in result.measurement.artifacts:
            line = f"  {summary['file']}: {summary['status']}"
            latency = summary.get("latency")
            if latency:
                figure = latency.get("p50_ms") if latency.get("p50_ms") is not None else latency.get("mean_ms")
                which = "p50" if latency.get("p50_ms") is not None else "mean"
                line += f", {which} {figure:.3f} ms ({latency.get('tool')}, {latency.get('threads')} thread(s))"
            if summary.get("budgets"):
                line += ", within budget" if summary["budgets"]["passed"] else ", OVER BUDGET"
            term.err.print(escape(printable(line, 1000)))
    for message in result.messages:
        term.err.print(f"[bold red]failed:[/] {escape(printable(message, 2000))}")
    term.err.print(f"manifest updated: {Path(args.bundle) / 'manifest.json'}")
    return result.exit_code


def cmd_cache(args, term: Terminal) -> int:
    """edgepack cache info|clear [--json]"""
    cache = BuildCache.from_env()
    if cache is None:
        raise EdgepackError("the build cache is off (EDGEPACK_BUILD_CACHE=off)", "unset EDGEPACK_BUILD_CACHE to use it")
    if args.action == "clear":
        removed = cache.clear()
        if args.json:
            term.write_json({"directory": str(cache.root), "removed_entries": removed})
        else:
            term.err.print(f"removed {removed} entr{'y' if removed == 1 else 'ies'} from {cache.root}")
        return 0
    info = cache.info()
    if args.json:
        term.write_json(info)
        return 0
    table = Table(title=f"build cache: {info['directory']} (cap {info['max_bytes'] / 1e9:.1f} GB, "
                        "EDGEPACK_CACHE_MAX_GB)")
    for column in ("kind", "entries", "MB"):
        table.add_column(column, justify="left" if column == "kind" else "right")
    for kind, row in sorted(info["kinds"].items()):
        table.add_row(kind, str(row["entries"]), f"{row['bytes'] / 1e6:.1f}")
    table.add_row("total", str(info["entries"]), f"{info['bytes'] / 1e6:.1f}")
    term.out.print(table)
    return 0


def cmd_fleet(args, term: Terminal) -> int:
    """edgepack fleet MATRIX.yaml: every model x target on Ray; the exit code is the worst build's."""
    from .fleet import FleetOptions, run_fleet

    def finished(entry: dict, done: int, total: int) -> None:
        code = entry["exit_code"]
        line = (f"[dim][{done}/{total}][/] {escape(entry.get('model_name') or entry['model'])} on "
                f"{escape(entry['target_name'])}: [{'green' if code == 0 else 'red'}]{escape(str(entry['status']))}[/]"
                f" (exit {code})")
        if entry.get("wall_s") is not None:
            line += f" in {entry['wall_s']:.1f} s"
        if entry["attempts"] > 1:
            line += f", attempt {entry['attempts']}"
        problem = (entry.get("error") or {}).get("message") or "; ".join(entry.get("failures") or [])
        term.err.print(line + (f": {escape(problem.splitlines()[0][:200])}" if problem else ""))

    flags = [flag for flag, on in (("--no-repro-check", args.no_repro_check), ("--no-zip", args.no_zip),
                                   ("--keep-going", args.keep_going)) if on]
    options = FleetOptions(out=Path(args.out) if args.out else None, settings=list(args.set or []),
                           parallel=args.parallel, address=args.address, retries=args.retries,
                           timeout_s=args.timeout, build_flags=flags, say=None if args.quiet else finished)
    report = run_fleet(args.matrix, options)
    if args.json:
        term.write_json(report)
    elif not args.quiet:
        term.out.print(fleet_table(report))
    for warning in report["warnings"]:
        term.err.print(f"[yellow]warning:[/] {escape(warning)}")
    if report["counts"].get("interrupted"):
        term.err.print(f"[yellow]interrupted:[/] {report['counts']['interrupted']} build(s) stopped or never started; "
                       f"the bundles already built are in place")
    files = report["files"]
    term.err.print(f"report: {files['json']}  {Path(files['md']).name}  {Path(files['png']).name}"
                   f" ({report['wall_s']:.1f} s, exit {report['exit_code']})")
    return report["exit_code"]


COMMANDS = {"cache": cmd_cache, "build": cmd_build, "targets": cmd_targets, "inspect": cmd_inspect,
            "validate": cmd_validate, "ingest": cmd_ingest, "diagnose": cmd_diagnose, "gpu-setup": cmd_gpu_setup,
            "arm64-setup": cmd_arm64_setup, "fleet": cmd_fleet}
