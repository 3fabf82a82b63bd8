"""Bounded fuzzing of everything a bundle carries, through the commands that read it.

    python -m edgepack.fuzz --cases 2000 [--seed 0] [--bundle DIR] [--formats onnx,pte,tflite]
                            [--kinds artifact,golden,manifest,zip,report,link] [--via inprocess|cli]
                            [--timeout 60] [--json FILE] [--case N --keep DIR]

Builds one small bundle holding an fp32 artifact per available format (or takes --bundle), then for
each case copies the bundle and damages one thing (fuzz/cases.py: an artifact's or a golden file's
bytes with checksums rewritten so the damage reaches the runtime, the manifest's bytes or values,
the bundle's zip, a device report, or a file swapped for a symlink out of the bundle), runs the
command that reads it (`edgepack validate` or `edgepack ingest`) and classifies the outcome by the
exit code it gives:

    0 passed   1 parity failure   2 bundle error   3 runtime error (a clean failure, a crash or a hang)
    internal   an exception that is not an edgepack error (the CLI would print a traceback): a bug

Runtimes run in child processes, so a crash ends one case, never the fuzzer. The children are forked
from one fork server per runtime that imported it once (runtimes/forkserver.py), so a case costs a
fraction of a second rather than the runtime's import (10-16 s for ExecuTorch). Each case draws from
its own seeded generator, so ``--case N`` replays case N alone (``--keep DIR`` keeps its bundle).
Prints counts per outcome, per kind and per format, the commonest messages and the fuzzer's peak
memory; exits 1 when a case was ``internal``, read outside its bundle or left a process behind, 130
when interrupted.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import re
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from dataclasses import asdict
from pathlib import Path

from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, EdgepackError
from ..runtimes.forkserver import fork_server_pids
from .cases import KINDS, OUTCOMES, Case, prepare_base, run_case

OUTCOME_NAMES = {"0": "passed", "1": "parity failure", "2": "bundle error", "3": "runtime error",
                 "internal": "INTERNAL (not an edgepack error)"}


# --- the bundles to fuzz -------------------------------------------------------------------------

def fuzz_spec():
    """A small CNN every exporter handles: conv, relu, pooling, a linear head with class scores."""
    import torch
    from torch import nn

    from ..spec import ModelSpec, check_spec

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 5)).eval()
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 3, 16, 16, generator=generator),) for _ in range(8)]
    spec = ModelSpec(name="fuzz-cnn", model=model, example_inputs=samples[0], calibration=samples,
                     input_names=["image"], output_names=["scores"], score_outputs=["scores"],
                     source="edgepack.fuzz:fuzz_spec")
    check_spec(spec, spec.source)
    return spec


def fuzz_profile(formats: list[str]):
    from ..target import parse_profile

    return parse_profile({
        "name": "fuzz", "description": "edgepack.fuzz: one fp32 artifact per format, short loops",
        "device": {"arch": "host", "cores": 1, "threads": 1, "peak_gops": {"fp32": 100}, "memory_gbps": 10,
                   "ram_mb": 1024},
        "artifacts": [{"name": "model", "format": fmt, "precision": "fp32"} for fmt in formats],
        "tolerances": {"fp32": {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999}},
        "parity": {"calibration_samples": 4, "holdout_samples": 0},
        "latency": {"warmup": 0, "runs": 20},
    }, "edgepack.fuzz")


def build_bundle(formats: list[str], out: Path, say) -> Path:
    """Build the fuzz bundle with --keep-going; a format that fails to build is left out, not fatal."""
    from ..pipeline import BuildOptions, build

    result = build(fuzz_spec(), fuzz_profile(formats), "edgepack.fuzz",
                   BuildOptions(out_dir=out, keep_going=True, progress=say, check_reproducible=False,
                                write_zip=False))
    for message in result.messages:
        say(f"note: {message.splitlines()[0]}")
    return result.bundle_dir


def validate_cli(bundle: Path, file: str | None, timeout_s: float) -> tuple[str, str]:
    """Run `python -m edgepack.cli validate` itself."""
    command = [sys.executable, "-m", "edgepack.cli", "validate", str(bundle), *(["--artifact", file] if file else []),
               "--timeout", str(timeout_s), "--threads", "1", "--json"]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s * 4 + 120)
    except subprocess.TimeoutExpired:
        return "internal", "the CLI itself did not finish"
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    if "Traceback" in proc.stderr or str(proc.returncode) not in OUTCOMES:
        return "internal", f"exit {proc.returncode}: " + " | ".join(lines[-3:])
    if proc.returncode in (0, 1):
        return str(proc.returncode), "passed" if proc.returncode == 0 else f"parity failed: {file or 'bundle'}"
    return str(proc.returncode), next((line for line in lines if "error" in line.split(":")[0]), " | ".join(lines[-2:]))


def signature(message: str, bundle: Path) -> str:
    """The message with paths, numbers and hex runs masked, so alike failures count together."""
    text = message.splitlines()[0] if message else ""
    text = text.replace(str(bundle), "<bundle>")
    text = re.sub(r"\S*/case-\d+", "<case>", text)
    text = re.sub(r"0x[0-9a-fA-F]+|\b[0-9a-f]{16,}\b", "<hex>", text)
    text = re.sub(r"\d+", "N", text)
    return text[:140]


TAG_VAR = "EDGEPACK_FUZZ_TAG"  # set in this process's environment; every worker and CLI it starts inherits it


def tagged_processes(tag: str) -> list[int]:
    """Live processes (other than this one) carrying ``tag``: after a case there must be none."""
    needle, found = f"{TAG_VAR}={tag}".encode(), []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone meanwhile, a zombie, or not ours to read
            continue
    return found


# --- the driver ----------------------------------------------------------------------------------

def runtime_error_kind(message: str) -> str:
    """How a runtime error (outcome 3) ended: the worker was killed by a signal, hung, or failed cleanly."""
    if " was killed by " in message:
        return "crash"
    if " did not answer within " in message:
        return "hang"
    return "clean"


def _own_peak_kib() -> int:
    """This process's own RSS high-water mark (VmHWM). getrusage's ru_maxrss is not used for it:
    Linux carries the launching process's high-water mark across fork and exec, so a fuzzer
    started by a 1.4 GB test process reported 1.4 GB while it held 0.4 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_mb() -> dict[str, float]:
    """Largest resident set of this process and of its largest waited-for child (Linux reports KiB)."""
    return {"fuzzer": round(_own_peak_kib() / 1024, 1),
            "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def summarize(cases: list[Case], leaks: list[str], seconds: float, seed: int, out, servers: int = 0) -> dict:
    by_outcome = collections.Counter(c.outcome for c in cases)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_format: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    format_seconds: dict[str, list[float]] = collections.defaultdict(list)
    messages: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for case in cases:
        by_kind[case.kind][case.outcome] += 1
        if case.kind == "artifact":
            by_format[case.format][case.outcome] += 1
            format_seconds[case.format].append(case.seconds)
        messages[case.outcome][signature(case.message, Path(case.bundle)) if case.outcome != "internal"
                               else case.message[:2000]] += 1
    violations = [c for c in cases if c.violation]
    memory = peak_memory_mb()
    out.write(f"edgepack fuzz: {len(cases)} case(s), seed {seed}, {seconds:.1f} s, "
              f"{servers} fork server(s), peak memory {memory['fuzzer']:.0f} MB (largest child "
              f"{memory['largest_child']:.0f} MB)\n")
    out.write("outcome (exit code)                        cases\n")
    for outcome in OUTCOMES:
        out.write(f"  {outcome:<9} {OUTCOME_NAMES[outcome]:<33} {by_outcome.get(outcome, 0):>5}\n")
    out.write("per kind (what was damaged)\n")
    for kind in KINDS:
        if kind in by_kind:
            out.write(f"  {kind:<9} " + "  ".join(f"{o}={by_kind[kind].get(o, 0)}" for o in OUTCOMES) + "\n")
    kinds = {fmt: collections.Counter(runtime_error_kind(c.message) for c in cases
                                      if c.kind == "artifact" and c.format == fmt and c.outcome == "3")
             for fmt in sorted(by_format)}
    out.write("artifact runtime errors (3) by how the worker ended: " + "; ".join(
        f"{fmt} " + ", ".join(f"{kind}={counts.get(kind, 0)}" for kind in ("clean", "crash", "hang"))
        for fmt, counts in kinds.items()) + "\n")
    out.write("artifact cases per format                                  validate s/case (mean, max)\n")
    for fmt in sorted(by_format):
        counts = "  ".join(f"{o}={by_format[fmt].get(o, 0)}" for o in OUTCOMES)
        times = format_seconds[fmt]
        out.write(f"  {fmt:<8} {counts:<48} {sum(times) / len(times):6.2f} {max(times):7.2f}\n")
    for outcome in OUTCOMES:
        for message, count in messages[outcome].most_common(5):
            out.write(f"  [{outcome}] x{count}: {message[:200]}\n")
    for case in cases:
        if case.outcome == "internal" or case.violation:
            what = case.violation or "INTERNAL"
            out.write(f"{what}: case {case.case} ({case.kind} {case.file}, {case.mutation}: {case.detail}); replay: "
                      f"python -m edgepack.fuzz --seed {seed} --case {case.case} --bundle {case.bundle} --keep DIR\n")
    for leak in leaks:
        out.write(f"LEAK {leak}\n")
    return {"seed": seed, "cases": len(cases), "seconds": round(seconds, 1), "fork_servers": servers,
            "peak_memory_mb": memory,
            "outcomes": {o: by_outcome.get(o, 0) for o in OUTCOMES},
            "by_kind": {kind: {o: counts.get(o, 0) for o in OUTCOMES} for kind, counts in sorted(by_kind.items())},
            "by_format": {fmt: {o: counts.get(o, 0) for o in OUTCOMES} for fmt, counts in sorted(by_format.items())},
            "runtime_errors": {fmt: {k: counts.get(k, 0) for k in ("clean", "crash", "hang")}
                               for fmt, counts in kinds.items()},
            "seconds_per_case": {fmt: {"mean": round(sum(t) / len(t), 3), "max": max(t)}
                                 for fmt, t in sorted(format_seconds.items())},
            "violations": [asdict(c) for c in violations],
            "messages": {o: dict(messages[o].most_common()) for o in OUTCOMES if messages[o]},
            "leaks": leaks, "records": [asdict(c) for c in cases]}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m edgepack.fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100, help="number of cases (default 100)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case", type=int, help="replay this one case only")
    parser.add_argument("--bundle", type=Path, help="fuzz this bundle; default: build one with an fp32 artifact "
                                                    "per available format")
    parser.add_argument("--formats", help="formats to build, comma-separated (default: every registered one)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"what to damage, comma-separated (default: all of {', '.join(KINDS)})")
    parser.add_argument("--via", choices=["inprocess", "cli"], default="inprocess",
                        help="inprocess: edgepack's validate/ingest (runtimes still in child processes; fast); "
                             "cli: a `python -m edgepack.cli validate` process per validate case")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a runtime may take per call")
    parser.add_argument("--work", type=Path, help="where to build and copy bundles (default: a temp dir)")
    parser.add_argument("--keep", type=Path, help="with --case: keep the damaged bundle in this directory")
    parser.add_argument("--json", type=Path, help="also write the summary and every case to this file")
    parser.add_argument("--quiet", action="store_true", help="no per-case progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    say = (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if args.cases < 0 or args.timeout <= 0 or not kinds or set(kinds) - set(KINDS):
        print(f"error: --cases must be >= 0, --timeout > 0, --kinds among {', '.join(KINDS)}", file=sys.stderr)
        return EXIT_USAGE
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        print(f"error: --keep {args.keep}: must not exist or be empty", file=sys.stderr)
        return EXIT_USAGE
    from .cases import validate_inprocess

    validate = validate_cli if args.via == "cli" else validate_inprocess
    # Tag first, so the fork servers the bundle build starts carry it too, and so their workers.
    tag = os.environ.setdefault(TAG_VAR, uuid.uuid4().hex)
    with tempfile.TemporaryDirectory(prefix="edgepack-fuzz-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        try:
            bundle = args.bundle
            if bundle is None:
                from ..export import registry

                formats = args.formats.split(",") if args.formats else sorted(registry())
                say(f"building the fuzz bundle ({', '.join(formats)}, fp32)")
                bundle = build_bundle(formats, work / "dist", say)
            base = prepare_base(bundle, work)
        except (EdgepackError, OSError, ValueError, KeyError) as exc:
            print(f"error: cannot prepare the bundle to fuzz: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if not base.artifacts:
            print(f"error: no runnable artifact in {bundle}", file=sys.stderr)
            return EXIT_USAGE
        say(f"fuzzing {bundle} ({', '.join(f for f, _ in base.artifacts)}): {', '.join(kinds)}")
        numbers = [args.case] if args.case is not None else list(range(args.cases))
        cases: list[Case] = []
        leaks: list[str] = []
        servers_seen: set[int] = set(fork_server_pids())
        started = time.monotonic()
        interrupted = False
        try:
            for number in numbers:
                keep = args.keep if args.case is not None else None
                try:
                    case = run_case(number, args.seed, base, work, args.timeout, kinds, keep, validate)
                except Exception as exc:  # a bug in this driver: recorded like edgepack's own, never fatal
                    case = Case(case=number, kind="?", bundle=str(bundle), file="", format="?", mutation="",
                                detail="", outcome="internal",
                                message=f"fuzz driver: {type(exc).__name__}: {exc} | "
                                        + traceback.format_exc(limit=-3).replace("\n", " | "))
                cases.append(case)
                servers = fork_server_pids()
                servers_seen.update(servers)
                left = [pid for pid in tagged_processes(tag) if pid not in servers]
                if left:
                    leaks.append(f"case {number}: process(es) {left} still running after validation")
                say(f"case {number}: {case.kind} {case.file} {case.mutation} -> {case.outcome} ({case.seconds:.1f} s) "
                    f"{case.message[:100]}")
        except KeyboardInterrupt:
            interrupted = True
        summary = summarize(cases, leaks, time.monotonic() - started, args.seed, sys.stdout, len(servers_seen))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if interrupted:
        return EXIT_INTERRUPTED
    return 1 if summary["outcomes"]["internal"] or summary["violations"] or leaks else 0
