"""Command line. Exit codes (stable; README "Exit codes"):
0 ok; 1 parity or budget failure; 2 usage, spec, profile or bundle error; 3 export or runtime error;
130 interrupted.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, EdgepackError
from .tables import arm64_table, diagnosis_table, gpu_table, print_manifest, validation_table

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, like every other input error
        self.print_usage(sys.stderr)
        err_console.print(f"[bold red]error:[/] {message}")
        raise SystemExit(EXIT_USAGE)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0 and at most 86400")
    return value


def _thread_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: give between 1 and 1024 threads")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 1_000_000:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of at least 1")
    return value


def _cpu_list(text: str) -> list[str]:
    from .emulators.qemu import CPU_MODELS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: qemu-aarch64's CPU models are {', '.join(CPU_MODELS)}")
    return list(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgepack", description="Compress, export, validate and package a PyTorch model for a device.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    build = sub.add_parser("build", help="build a bundle for one target")
    build.add_argument("spec", help="models/x.py or package.module:function")
    build.add_argument("--target", "-t", required=True, help="target name (see `edgepack targets`) or a YAML path")
    build.add_argument("--out", default="dist", help="output root (default: dist)")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    build.add_argument("--no-repro-check", action="store_true",
                       help="skip exporting each artifact twice to check its bytes are reproducible")
    build.add_argument("--no-zip", action="store_true", help="do not write dist/<model>-<target>.zip")
    build.add_argument("--keep-going", action="store_true",
                       help="build the other formats when one fails (the exit code is still non-zero)")

    targets = sub.add_parser("targets", help="list target profiles, or show one resolved")
    targets.add_argument("action", nargs="?", choices=["show"], help="show one profile")
    targets.add_argument("name", nargs="?", help="target name or YAML path")
    targets.add_argument("--json", action="store_true")

    inspect = sub.add_parser("inspect", help="print a bundle's manifest as a table")
    inspect.add_argument("bundle", help="bundle directory (dist/<model>/<target>)")
    inspect.add_argument("--json", action="store_true")

    validate = sub.add_parser("validate", help="re-run parity from a bundle (directory or .zip) on this host")
    validate.add_argument("bundle", help="bundle directory (dist/<model>/<target>) or its .zip")
    validate.add_argument("--artifact", help="validate only this file, e.g. model.onnx")
    validate.add_argument("--threads", type=_thread_count,
                          help="runtime threads (default: the profile's, capped at the CPUs)")
    validate.add_argument("--timeout", type=_positive_seconds, default=300.0,
                          help="seconds a runtime may take per call")
    validate.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    validate.add_argument("--gpu", action="store_true",
                          help="also run each float .tflite on LiteRT's GPU accelerator over lavapipe (a CPU Vulkan "
                               "driver, set up in the cache on first use)")

    validate.add_argument("--arm64", action="store_true",
                          help="also run each artifact's device kit on arm64 code under qemu-aarch64, per CPU model "
                               "(qemu, an arm64 Python and the runtimes are set up in the cache on first use)")
    validate.add_argument("--cpu", type=_cpu_list, help="with --arm64: comma-separated qemu CPU models "
                                                        "(default: the profile's, else cortex-a53,cortex-a76)")
    validate.add_argument("--executorch", action="store_true",
                          help="with --arm64: .pte files too (2.7 GB of aarch64 wheels on first use)")

    arm64_setup = sub.add_parser("arm64-setup", help="set up qemu-aarch64, an arm64 Python and the runtimes for "
                                                     "--arm64, in the user's cache; does nothing when they are there")
    arm64_setup.add_argument("--executorch", action="store_true", help="the ExecuTorch runtime too (2.7 GB)")
    arm64_setup.add_argument("--counts", action="store_true",
                             help="build the plugin-enabled qemu that counts instructions (minutes; gcc, ninja)")
    arm64_setup.add_argument("--json", action="store_true", help="print what was set up as JSON on stdout")

    gpu_setup = sub.add_parser("gpu-setup", help="set up lavapipe (Mesa's CPU Vulkan driver) for the GPU check, "
                                                 "in the user's cache; does nothing when it is there")
    gpu_setup.add_argument("--json", action="store_true", help="print the driver's description as JSON on stdout")

    ingest = sub.add_parser("ingest", help="merge a device_report.json into a bundle's manifest")
    ingest.add_argument("bundle", help="bundle directory (dist/<model>/<target>)")
    ingest.add_argument("report", help="device_report.json from device/validate.py or device/run_android.sh")
    ingest.add_argument("--json", action="store_true", help="print the updated manifest as JSON on stdout")
    diagnose = sub.add_parser("diagnose", help="rank the layers int8 hurts most, per layer, for a target's recipe")
    diagnose.add_argument("spec", help="models/x.py or package.module:function")
    diagnose.add_argument("--target", "-t", required=True, help="target name or a YAML path (its int8 recipe)")
    diagnose.add_argument("--out", help="where diagnosis.json and diagnosis.png go "
                                        "(default: dist/<model>/<target>.diagnosis)")
    diagnose.add_argument("--samples", type=_count, help="calibration samples compared layer by layer (default: 8)")
    diagnose.add_argument("--top", type=_count, default=10, help="rows in the table (default: 10)")
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    diagnose.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    return parser


def _progress(args):
    if getattr(args, "quiet", False):
        return None
    return lambda message: err_console.print(f"[dim]·[/] {message}")


def cmd_build(args) -> int:
    from .pipeline import BuildOptions, build
    from .spec import load_spec
    from .target import load_target

    profile = load_target(args.target)
    spec = load_spec(args.spec)
    for note in spec.notes:
        err_console.print(f"[yellow]note:[/] {note}")
    options = BuildOptions(out_dir=Path(args.out), keep_going=args.keep_going, progress=_progress(args),
                           check_reproducible=not args.no_repro_check, write_zip=not args.no_zip)
    result = build(spec, profile, str(args.target), options)
    if args.json:
        sys.stdout.write(json.dumps(result.manifest.model_dump(mode="json"), indent=2) + "\n")
    elif not args.quiet:
        print_manifest(result.manifest, out_console)
    if result.exit_code:
        for message in result.messages:
            err_console.print(f"[bold red]failed:[/] {message}")
        err_console.print(f"report written to {result.bundle_dir}; the last good bundle was left untouched")
    elif not args.quiet:
        err_console.print(f"[green]bundle:[/] {result.bundle_dir}" + (f"  zip: {result.zip_path}" if result.zip_path else ""))
    return result.exit_code


def cmd_diagnose(args) -> int:
    """edgepack diagnose SPEC --target T [--out DIR] [--samples N] [--top K] [--json]"""
    from .analysis.diagnose import DIAGNOSIS_SAMPLES, run_diagnosis
    from .errors import ExportError
    from .spec import load_spec
    from .target import load_target

    err = err_console
    profile = load_target(args.target)
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
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    table = diagnosis_table(report, f"{spec.name} on {profile.name}", getattr(args, "top", None) or 10)
    out_console.print(table)
    if report["float_groups"]:
        err.print(f"to keep the worst in fp32: float_layers: {report['float_groups'][0]}  "
                  f"({report['float_group_reasons'][0]})")
    err.print(f"report: {report['files']['json']}  chart: {report['files']['chart']}")
    return 0


def cmd_targets(args) -> int:
    from .target import dump_profile, known_targets, load_target

    if args.action == "show":
        if not args.name:
            raise EdgepackError("targets show needs a NAME", "run `edgepack targets` to list them")
        profile = load_target(args.name)
        if args.json:
            sys.stdout.write(json.dumps(profile.model_dump(mode="json"), indent=2) + "\n")
        else:
            sys.stdout.write(dump_profile(profile))
        return 0
    names = known_targets()
    if args.json:
        rows = []
        for name in names:
            profile = load_target(name)
            rows.append({"name": name, "description": profile.description,
                         "formats": [f"{a.format}:{a.precision}" for a in profile.artifacts]})
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return 0
    table = Table(title="targets")
    for column in ("name", "artifacts", "description"):
        table.add_column(column)
    for name in names:
        profile = load_target(name)
        table.add_row(name, ", ".join(f"{a.file_name} ({a.precision})" for a in profile.artifacts), profile.description)
    out_console.print(table)
    return 0


def cmd_inspect(args) -> int:
    from .intake import load_bundle_manifest
    from .steps.validate import verify_files

    manifest = load_bundle_manifest(Path(args.bundle))
    verify_files(Path(args.bundle), manifest)  # a bundle whose files don't match is not shown as valid
    if args.json:
        sys.stdout.write(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    else:
        print_manifest(manifest, out_console)
    return 0


def cmd_validate(args) -> int:
    from .steps.validate import Arm64Request, validate_bundle

    if (args.cpu or args.executorch) and not args.arm64:
        raise EdgepackError("--cpu and --executorch go with --arm64", "add --arm64")
    progress = None if args.json else (lambda message: err_console.print(f"[dim]·[/] {_escape(message)}"))
    result = validate_bundle(Path(args.bundle), artifact=args.artifact, threads=args.threads,
                             timeout_s=args.timeout, progress=progress, gpu=args.gpu,
                             arm64=Arm64Request(args.cpu, args.executorch) if args.arm64 else None)
    if args.json:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        return result.exit_code
    table = validation_table(result)
    out_console.print(table)
    if result.gpu:
        out_console.print(gpu_table([(g.file, g.record) for g in result.gpu], "GPU path, re-run on this host"))
    if result.arm64:
        out_console.print(arm64_table(list(result.arm64.items()), "device kit on arm64 code under qemu-aarch64 "
                                                                  "(emulated; not device time)"))
        for file, record in result.arm64.items():
            if record.status == "failed":
                err_console.print(f"[bold red]arm64 failure:[/] {file}: " + _escape(record.reason or ""))
    for note in result.skipped:
        err_console.print(f"[yellow]skipped:[/] {_escape(note)}")
    for check in result.artifacts:
        if not check.passed:
            err_console.print(f"[bold red]parity failure:[/] {check.file}\n" + _escape(check.parity.summary()))
    if result.manifest.status != "passed":
        err_console.print(f"[bold red]this bundle's build failed[/] (parity re-checked here: "
                          f"{'passed' if result.parity_passed else 'failed'}); the build recorded:")
        for failure in result.manifest.failures:
            err_console.print("  " + _escape(failure.splitlines()[0]))
    for check in result.gpu:
        if not check.passed:
            err_console.print(f"[bold red]GPU path failure:[/] {check.file}: " + _escape(check.record.reason or ""))
    if result.exit_code == 0:
        ran = [r for r in result.arm64.values() if r.runs]
        gpu = (f", {len(result.gpu)} on the GPU path" if result.gpu else "") + (
            f", {len(ran)} on {len(ran[0].runs)} emulated arm64 CPU(s)" if ran else "")
        err_console.print(f"[green]passed:[/] {len(result.artifacts)} artifact(s){gpu}, "
                          f"{result.files_verified} file(s) verified")
    return result.exit_code


def cmd_gpu_setup(args) -> int:
    from .emulators import lavapipe

    driver = lavapipe.ensure(say=None if args.json else (lambda m: err_console.print(f"[dim]·[/] {_escape(m)}")))
    if args.json:
        sys.stdout.write(json.dumps({**driver.describe(), "environment": driver.environment()}, indent=2) + "\n")
    else:
        described = driver.describe()
        err_console.print(f"[green]ready:[/] {described['name']} {described['package_version']}: {described['device']}, "
                          f"{described['driver_info']}, Vulkan {described['vulkan_api']} (in {driver.directory.parent})")
    return 0


def cmd_arm64_setup(args) -> int:
    from .emulators import arm64_python, qemu_counting

    say = None if args.json else (lambda m: err_console.print(f"[dim]·[/] {_escape(m)}"))
    runtimes = ("executorch", "litert", "onnxruntime") if args.executorch else ("litert", "onnxruntime")
    guest = arm64_python.ensure(arm64_python.runtime_pins({}, runtimes), runtimes, say)
    described = {**guest.describe(), "site": str(guest.site), "sysroot": str(guest.sysroot)}
    if args.counts:
        described["counting"] = qemu_counting.ensure(say).describe()
    if args.json:
        sys.stdout.write(json.dumps(described, indent=2) + "\n")
    else:
        err_console.print(f"[green]ready:[/] {described['emulator']}; {described['python']}; "
                          f"{', '.join(guest.pins)}" + ("; instruction counting" if args.counts else ""))
    return 0


def cmd_ingest(args) -> int:
    from .intake import printable
    from .steps.ingest import ingest_report

    result = ingest_report(Path(args.bundle), Path(args.report))
    if args.json:
        sys.stdout.write(json.dumps(result.manifest.model_dump(mode="json"), indent=2) + "\n")
    else:
        # Everything below comes from the report (untrusted): printed without control characters.
        device = result.measurement.device
        err_console.print(_escape(f"device: {printable(device.get('label') or device.get('machine') or 'unknown')} "
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
            err_console.print(_escape(printable(line, 1000)))
    for message in result.messages:
        err_console.print(f"[bold red]failed:[/] {_escape(printable(message, 2000))}")
    err_console.print(f"manifest updated: {Path(args.bundle) / 'manifest.json'}")
    return result.exit_code


def _stop_now(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


COMMANDS = {"build": cmd_build, "targets": cmd_targets, "inspect": cmd_inspect, "validate": cmd_validate,
            "ingest": cmd_ingest, "diagnose": cmd_diagnose, "gpu-setup": cmd_gpu_setup, "arm64-setup": cmd_arm64_setup}


def _on_signal(signum, frame):
    """Record the signal; the build stops at its next step boundary (errors.check_interrupted).
    A second signal stops at once."""
    from .errors import interrupted_by, note_interrupt

    if interrupted_by() is not None:
        raise KeyboardInterrupt(f"signal {signum}")
    note_interrupt(f"signal {signum}")
    os.write(2, b"interrupt received: stopping at the next step (send it again to stop now)\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # build writes a bundle atomically and checks for a recorded signal at every step; the other
    # commands write nothing half-way and stop where the signal lands.
    handler = _on_signal if args.command == "build" else _stop_now
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    if not args.debug:
        # Exporters' deprecation chatter is not for the user of a build; --debug shows it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GLOG_minloglevel", "2")
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except EdgepackError as exc:
        if args.debug:
            traceback.print_exc()
        err_console.print(f"[bold red]{exc.kind}:[/] " + _escape(exc.message))
        if exc.hint:
            err_console.print("  [dim]hint:[/] " + _escape(exc.hint))
        return exc.exit_code
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted:[/] no bundle was written; the previous one is untouched")
        return EXIT_INTERRUPTED
    except OSError as exc:
        if args.debug:
            traceback.print_exc()
        what = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large (file-size limit or full disk)",
                errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
        where = str(exc.filename or getattr(args, "out", None) or "")
        err_console.print("[bold red]output error:[/] " + _escape(f"{where}: {what}" if where else what))
        err_console.print("  [dim]hint:[/] free space or choose a writable --out; the previous bundle is untouched")
        return EXIT_USAGE


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


if __name__ == "__main__":
    sys.exit(main())
