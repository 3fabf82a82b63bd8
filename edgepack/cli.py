"""Command line. Exit codes (stable; README "Exit codes"):
0 ok; 1 parity or budget failure; 2 usage, spec, profile or bundle error; 3 export or runtime error;
130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

from .errors import EXIT_INTERRUPTED, EXIT_USAGE, EdgepackError


class UsageError(Exception):
    """A command line argparse refused; main() reports it like any other error (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # usage errors exit 2, like every other input error
        raise UsageError(f"{self.prog}: {message}")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds above 0 and at most 86400")
    return value


def _whole_number(low: int, high: int, hint: str):
    """An argparse type: a whole number in [low, high], else an error saying ``hint``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
        return value
    return parse


_thread_count = _whole_number(1, 1024, "give between 1 and 1024 threads")
_count = _whole_number(1, 1_000_000, "give a count of at least 1")
_retries = _whole_number(0, 10, "give between 0 and 10 retries")


def _cpu_list(text: str) -> list[str]:
    from .emulators.qemu import CPU_MODELS

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CPU_MODELS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"{text!r}: qemu-aarch64's CPU models are {', '.join(CPU_MODELS)}")
    return list(dict.fromkeys(names))


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    # --debug is accepted before or after the command: `edgepack build x.py -t T --debug`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks and the exporters' own output instead of capturing it in a log")
    parser = _Parser(prog="edgepack", description="Compress, export, validate and package a PyTorch model for a device.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and the exporters' own output")
    parser.add_argument("--version", action="version", version=f"edgepack {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, parents=[common])

    def settings(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                       help="override one profile value, e.g. --set int8.calibration_samples=64 (repeatable)")

    build = command("build", "build a bundle for one target or several")
    build.add_argument("spec", help="models/x.py, models/x.py:function or package.module:function")
    build.add_argument("--target", "-t", required=True, action="append",
                       help="target name (see `edgepack targets`) or a YAML path; repeat for several targets "
                            "(a target that errors does not stop the others; exit: the worst)")
    build.add_argument("--out", "-o", default="dist", help="output root (default: dist)")
    build.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout (several "
                                                            "targets: a list, an error object for one that raised)")
    build.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    build.add_argument("--no-repro-check", action="store_true",
                       help="skip exporting each artifact twice to check its bytes are reproducible")
    build.add_argument("--no-zip", action="store_true", help="do not write dist/<model>-<target>.zip")
    build.add_argument("--keep-going", action="store_true",
                       help="build the other formats when one fails (the exit code is still non-zero)")
    build.add_argument("--no-cache", action="store_true",
                       help="export everything afresh and store nothing in the build cache (see `edgepack cache`)")
    build.add_argument("--jobs", "-j", type=int, choices=[1, 2], default=None,
                       help="export processes: 2 runs the fp32 baselines and the reproducibility re-exports in a "
                            "second process beside the build (~1.4 GB more memory); 1 runs every export in the "
                            "build's own; default: 2 with 4 or more CPUs, else 1")
    settings(build)

    cache = command("cache", "the build cache: what it holds (info) or empty it (clear)")
    cache.add_argument("action", choices=["info", "clear"])
    cache.add_argument("--json", action="store_true")

    targets = command("targets", "list target profiles, or show one resolved")
    targets.add_argument("action", nargs="?", choices=["show"], help="show one profile")
    targets.add_argument("name", nargs="?", help="target name or YAML path")
    targets.add_argument("--json", action="store_true")
    settings(targets)

    inspect = command("inspect", "print a bundle's manifest (directory or .zip), or list a model folder's bundles")
    inspect.add_argument("bundle", help="dist/<model>/<target>, its .zip, or dist/<model>")
    inspect.add_argument("--json", action="store_true")

    validate = command("validate", "re-run parity from a bundle (directory or .zip) on this host")
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

    arm64_setup = command("arm64-setup", "set up qemu-aarch64, an arm64 Python and the runtimes for --arm64, "
                                         "in the user's cache; does nothing when they are there")
    arm64_setup.add_argument("--executorch", action="store_true", help="the ExecuTorch runtime too (2.7 GB)")
    arm64_setup.add_argument("--counts", action="store_true",
                             help="build the plugin-enabled qemu that counts instructions (minutes; gcc, ninja)")
    arm64_setup.add_argument("--json", action="store_true", help="print what was set up as JSON on stdout")

    gpu_setup = command("gpu-setup", "set up lavapipe (Mesa's CPU Vulkan driver) for the GPU check, "
                                     "in the user's cache; does nothing when it is there")
    gpu_setup.add_argument("--json", action="store_true", help="print the driver's description as JSON on stdout")

    ingest = command("ingest", "merge a device_report.json into a bundle's manifest")
    ingest.add_argument("bundle", help="bundle directory (dist/<model>/<target>)")
    ingest.add_argument("report", help="device_report.json from device/validate.py or device/run_android.sh")
    ingest.add_argument("--json", action="store_true", help="print the updated manifest as JSON on stdout")

    diagnose = command("diagnose", "rank the layers int8 hurts most, per layer, for a target's recipe")
    diagnose.add_argument("spec", help="models/x.py, models/x.py:function or package.module:function")
    diagnose.add_argument("--target", "-t", required=True, help="target name or a YAML path (its int8 recipe)")
    diagnose.add_argument("--out", "-o", help="where diagnosis.json and diagnosis.png go "
                                              "(default: dist/<model>/<target>.diagnosis)")
    diagnose.add_argument("--samples", type=_count, help="calibration samples compared layer by layer (default: 8)")
    diagnose.add_argument("--top", type=_count, default=10, help="rows in the table (default: 10)")
    diagnose.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    diagnose.add_argument("--quiet", "-q", action="store_true", help="no progress output")
    settings(diagnose)

    fleet = command("fleet", "build every model of a matrix for every target, one Ray task per build")
    fleet.add_argument("matrix", help="MATRIX.yaml: models x targets, with optional set: overrides "
                                      "(README: Fleet builds)")
    fleet.add_argument("--out", "-o", help="output root (default: the matrix's out:, else dist)")
    fleet.add_argument("--parallel", "-j", type=_count,
                       help="builds at once (default: one per 2 CPUs on a local instance; on a cluster, what its "
                            "CPUs allow at 2 per build)")
    fleet.add_argument("--address", help="join this Ray cluster (auto, or HOST:PORT) instead of starting a local one")
    fleet.add_argument("--retries", type=_retries, default=2,
                       help="attempts after a build's worker or build process was killed (default: 2); a build "
                            "that ran and failed is never retried")
    fleet.add_argument("--timeout", type=_positive_seconds, default=3600.0,
                       help="seconds one build may take before it is stopped (exit 3; default 3600)")
    fleet.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    fleet.add_argument("--quiet", "-q", action="store_true", help="no progress lines or table")
    fleet.add_argument("--no-repro-check", action="store_true", help="passed to every build")
    fleet.add_argument("--no-zip", action="store_true", help="passed to every build")
    fleet.add_argument("--keep-going", action="store_true", help="passed to every build")
    settings(fleet)
    return parser


def _stop_now(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _on_signal(signum, frame):
    """Record the signal; the build stops at its next step boundary (errors.check_interrupted).
    A second signal stops at once."""
    from .errors import interrupted_by, note_interrupt

    if interrupted_by() is not None:
        raise KeyboardInterrupt(f"signal {signum}")
    note_interrupt(f"signal {signum}")
    os.write(2, b"interrupt received: stopping at the next step (send it again to stop now)\n")


# Commands whose libraries print (exporters, runtimes, a spec's print()): their output goes to a log.
# fleet: Ray's own start-up chatter (its builds write per-build logs in the out root).
CAPTURED = {"build", "diagnose", "validate", "fleet"}


def main(argv: list[str] | None = None) -> int:
    """Run one command; its exit code. From the command line (argv None), `build` then ends the
    process itself (see _exit_now)."""
    code = _main(argv)
    if argv is None and next((a for a in sys.argv[1:] if not a.startswith("-")), None) == "build":
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Flush, run the exit handlers (the runtime servers stop, temp files go), and end without
    Python's teardown of the modules a build imported: after the manifest is written, time no
    step can record. A process that had imported torch, ExecuTorch's exporter and litert-torch
    took 5.5-9.0 s to exit normally and 0.05-0.15 s this way (2 shared cores, load ~18)."""
    import atexit

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from .commands import COMMANDS
    from .terminal import Terminal

    argv = list(sys.argv[1:] if argv is None else argv)
    term = Terminal()
    as_json = "--json" in argv
    debug = "--debug" in argv
    try:
        args = _parser().parse_args(argv)
    except UsageError as exc:
        return _report(term, as_json, "usage error", str(exc), "run `edgepack --help` or `edgepack COMMAND --help`",
                       EXIT_USAGE)
    # build writes a bundle atomically and checks for a recorded signal at every step; the other
    # commands write nothing half-way and stop where the signal lands.
    handler = _on_signal if args.command == "build" else _stop_now
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    args.debug = debug
    for name in ("set", "out", "quiet", "json"):
        if not hasattr(args, name):
            setattr(args, name, None)
    if not debug:
        # Exporters' deprecation chatter is not for the user of a build; --debug shows it.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        os.environ.setdefault("GLOG_minloglevel", "2")
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
    log = None
    if args.command in CAPTURED and not debug:
        log = Path(tempfile.mkstemp(prefix=f"edgepack-{args.command}-", suffix=".log")[1])
    code = None
    try:
        with term.capture(log) if log else contextlib.nullcontext():
            code = COMMANDS[args.command](args, term)
        return code
    except EdgepackError as exc:
        if debug:
            traceback.print_exc()
        code = exc.exit_code
        return _report(term, args.json, exc.kind, exc.message, exc.hint, exc.exit_code, log)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        return _report(term, args.json, "interrupted", "no bundle was written; the previous one is untouched", None,
                       EXIT_INTERRUPTED, log)
    except OSError as exc:
        if debug:
            traceback.print_exc()
        what = {errno.ENOSPC: "no space left on device", errno.EACCES: "permission denied",
                errno.EROFS: "read-only file system", errno.EFBIG: "file too large (file-size limit or full disk)",
                errno.EDQUOT: "disk quota exceeded"}.get(exc.errno, exc.strerror or str(exc))
        where = str(exc.filename or getattr(args, "out", None) or "")
        code = EXIT_USAGE
        return _report(term, args.json, "output error", f"{where}: {what}" if where else what,
                       "free space or choose a writable --out; the previous bundle is untouched", EXIT_USAGE, log)
    finally:
        if log is not None:
            _keep_log(log, term, code, args)


def _report(term, as_json: bool, kind: str, message: str, hint: str | None, exit_code: int,
            log: Path | None = None) -> int:
    """One error, as a line (and a hint) on stderr, and under --json as an object on stdout."""
    from .terminal import error_json

    if as_json:
        term.write_json(error_json(kind, message, hint, exit_code, log))
    term.print_error(kind, message, hint)
    return exit_code


def _keep_log(log: Path, term, code: int | None, args) -> None:
    """A build's log goes beside its bundle (dist/<model>/<target>.log); any other command's log is
    kept only when it failed, and its path printed."""
    from .terminal import build_log_path

    bundle = getattr(term, "bundle_dir", None)
    try:
        if bundle is not None:
            dest = build_log_path(Path(bundle))
            shutil.move(str(log), dest)
            if code:
                term.err.print(f"[dim]exporter and runtime output: {dest}[/]")
        elif code and log.stat().st_size:
            term.err.print(f"[dim]exporter and runtime output: {log}[/]")
        else:
            log.unlink()
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
