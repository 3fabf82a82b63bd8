"""The fleet's driver: start (or join) Ray, submit one task per build, collect the results as
they finish, and write the report: fleet-report.json (the record), .md (a table) and .png."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import EXIT_EXPORT_OR_RUNTIME, EXIT_INTERRUPTED, EXIT_USAGE, RuntimeUnavailable
from .matrix import Build, load_matrix
from .task import BuildKilled, run_build, sweep_dead_attempts, write_atomic

REPORT_SCHEMA_VERSION = 1
REPORT_NAME = "fleet-report"  # .json, .md, .png in the out root
LOGS_DIR = "fleet-logs"  # <out>/fleet-logs/<model>--<target>/attempt-N.{log,json}
# Logical CPUs one build claims from Ray: a build's runtimes run at the profile's thread count (2
# for x86-64 and the Android profiles' host checks), so two builds on one 2-core host time each
# other's latency blocks; a local instance gets CPUS_PER_BUILD x --parallel of them.
CPUS_PER_BUILD = 2
DEFAULT_RETRIES = 2
DEFAULT_TIMEOUT_S = 3600.0
OBJECT_STORE_BYTES = 128 * 1024 * 1024  # results are a few kB each; Ray's default takes 30% of RAM


@dataclass
class FleetOptions:
    out: Path | None = None  # default: the matrix's out, else ./dist
    settings: list[str] = field(default_factory=list)  # --set, after the matrix's own
    parallel: int | None = None  # builds at once (local default: one per CPUS_PER_BUILD CPUs)
    address: str | None = None  # an existing Ray cluster; None starts a local instance
    retries: int = DEFAULT_RETRIES
    timeout_s: float = DEFAULT_TIMEOUT_S
    build_flags: list[str] = field(default_factory=list)  # --no-repro-check, --no-zip, --keep-going
    say: Callable[[dict[str, Any], int, int], None] | None = None  # called with each finished entry


def _import_ray():
    try:
        import ray
    except ImportError:
        raise RuntimeUnavailable("edgepack fleet runs its builds on Ray, which is not installed",
                                 "pip install 'edgepack[fleet]' (ray==2.60.0)") from None
    return ray


def _check_reachable(address: str) -> None:
    """Fail at once when nothing listens at HOST:PORT: ray.init retries an unreachable address for
    many minutes, in native code that Ctrl-C does not reach. ``auto`` and ``ray://`` are Ray's to resolve."""
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5.0).close()
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot join the Ray cluster at {address}: nothing answers there "
                                 f"({exc.strerror or exc})",
                                 "give the head node's address (`ray status` there prints it), or leave --address out "
                                 "to start a local instance") from None


def _start_ray(ray, options: FleetOptions) -> dict[str, Any]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a build host does not report usage
    if options.address:
        _check_reachable(options.address)
    started = time.monotonic()
    try:
        if options.address:
            ray.init(address=options.address, log_to_driver=False, logging_level=logging.ERROR,
                     namespace="edgepack-fleet")
        else:
            ray.init(address="local", num_cpus=CPUS_PER_BUILD * options.parallel, include_dashboard=False,
                     log_to_driver=False, logging_level=logging.ERROR, object_store_memory=OBJECT_STORE_BYTES,
                     namespace="edgepack-fleet")
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError...: name it, exit 2
        where = f"join the Ray cluster at {options.address}" if options.address else "start a local Ray instance"
        hint = ("a cluster with token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or "
                "~/.ray/auth_token) here, as any Ray client does; `ray status` on the head node prints its address"
                ) if options.address else "see Ray's logs in /tmp/ray/session_latest/logs"
        raise RuntimeUnavailable(f"cannot {where}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}",
                                 hint) from exc
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if options.address and not any(n.get("Resources", {}).get("CPU", 0) >= CPUS_PER_BUILD for n in nodes):
        ray.shutdown()
        raise RuntimeUnavailable(f"no node of the Ray cluster at {options.address} has the {CPUS_PER_BUILD} CPUs a "
                                 f"build claims", f"start nodes with `ray start --num-cpus {CPUS_PER_BUILD}` or more")
    return {"version": ray.__version__, "address": options.address or "local", "start_s":
            round(time.monotonic() - started, 2), "nodes": len(nodes), "parallel": options.parallel,
            "cpus_per_build": CPUS_PER_BUILD, "retries": options.retries}


def _lost(ray, build: Build, exc: Exception) -> dict[str, Any]:
    """An entry for a task Ray gave up on: its worker died on every attempt, or the task raised."""
    cause = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None  # None: died
    if isinstance(cause, BuildKilled) or isinstance(exc, BuildKilled) or cause is None:
        message = str(cause or exc).strip().splitlines()[0][:300]
        return {"exit_code": EXIT_EXPORT_OR_RUNTIME, "status": "crashed",
                "error": {"kind": "worker died", "message": f"every attempt died: {message}",
                          "hint": "see the attempt logs; a build killed for memory needs a larger host or a "
                                  "lower --parallel"}}
    return {"exit_code": EXIT_USAGE, "status": "error",
            "error": {"kind": type(cause).__name__, "message": str(cause or exc).strip().splitlines()[-1][:300],
                      "hint": "the fleet task itself failed (not the build): check the out root is writable"}}


def run_fleet(matrix_path: str | os.PathLike, options: FleetOptions | None = None) -> dict[str, Any]:
    """Build every (model, target) of the matrix on Ray; write and return the report."""
    from dataclasses import replace

    from ..emulators.debian import cache_root

    started = time.monotonic()
    ray = _import_ray()  # a missing extra is named before the matrix is read
    options = options or FleetOptions()
    if options.parallel is None and not options.address:
        options = replace(options, parallel=max(1, (os.cpu_count() or CPUS_PER_BUILD) // CPUS_PER_BUILD))
    builds, matrix_out = load_matrix(matrix_path, options.settings)
    out = Path(options.out or matrix_out or "dist").resolve()

    jobs = {}
    for build in builds:
        logs = out / LOGS_DIR / build.key
        if logs.is_dir():  # the last fleet's logs of this build: its litter first, then the logs
            sweep_dead_attempts(logs, out)
            shutil.rmtree(logs)
        # --jobs 1: a build stays in the CPUS_PER_BUILD it claims (a second export process would
        # run beside another build's latency blocks, which only its own build stops it for).
        args = [build.spec_ref, "--target", build.target_ref, "--out", str(out), "--json", "--jobs", "1",
                *(f"--set={s}" for s in build.settings), *options.build_flags]
        jobs[build.key] = {"args": args, "out": str(out), "logs": str(logs), "cache": str(cache_root().resolve()),
                           "cwd": os.getcwd(), "timeout_s": options.timeout_s}
    ray_info = _start_ray(ray, options)
    results: dict[str, dict[str, Any]] = {}
    try:
        task = ray.remote(run_build).options(num_cpus=CPUS_PER_BUILD, max_retries=options.retries,
                                             retry_exceptions=[BuildKilled])
        queue, pending = list(builds), {}
        try:
            while queue or pending:
                while queue and (options.parallel is None or len(pending) < options.parallel):
                    build = queue.pop(0)
                    pending[task.remote(jobs[build.key])] = build
                done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)  # a timeout lets Ctrl-C in
                if not done:
                    continue
                build = pending.pop(done[0])
                try:
                    results[build.key] = ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    results[build.key] = _lost(ray, build, exc)
                if options.say:
                    options.say(_entry(build, results[build.key], out), len(results), len(builds))
        except KeyboardInterrupt:
            for ref in pending:  # force: the worker dies, and its build with it (PDEATHSIG)
                ray.cancel(ref, force=True)
            for build in builds:
                results.setdefault(build.key, {"exit_code": EXIT_INTERRUPTED, "status": "interrupted"})
    finally:
        if not options.address:
            ray.shutdown()
    entries = [_entry(b, results[b.key], out) for b in builds]
    for build in builds:
        sweep_dead_attempts(out / LOGS_DIR / build.key, out)
    report = {"schema_version": REPORT_SCHEMA_VERSION, "matrix": str(Path(matrix_path).resolve()), "out": str(out),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "exit_code": max(e["exit_code"] for e in entries), "wall_s": round(time.monotonic() - started, 2),
              "ray": ray_info, "counts": _counts(entries), "warnings": _collisions(entries), "builds": entries}
    write_report(report, out)
    return report


def _entry(build: Build, result: dict[str, Any], out: Path) -> dict[str, Any]:
    logs = out / LOGS_DIR / build.key
    return {"model": build.model, "target": build.target, "spec": build.spec_ref, "settings": list(build.settings),
            "model_name": None, "target_name": build.target_name, "status": None, "exit_code": None,
            "bundle_dir": None, "artifacts": [], "accuracy_float": None, "failures": [], "error": None,
            "wall_s": None, "cached": None, "logs": str(logs), **result,
            "attempts": len(list(logs.glob("attempt-*.json")))}


def _counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts


def _collisions(entries: list[dict[str, Any]]) -> list[str]:
    """Two specs that name their model alike write one bundle directory: only the last build's stays."""
    seen: dict[str, str] = {}
    notes = []
    for entry in entries:
        bundle = entry.get("bundle_dir")
        if bundle and bundle.removesuffix(".failed") in seen:
            notes.append(f"{entry['model']} and {seen[bundle.removesuffix('.failed')]} both build "
                         f"{bundle}: only one of the two bundles is there; give the specs distinct names")
        elif bundle:
            seen[bundle.removesuffix(".failed")] = entry["model"]
    return notes


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """fleet-report.png, .md, then .json (the record), each written to a temp file and renamed."""
    from ..analysis.charts import write_fleet_chart
    from ..tables import fleet_markdown

    out.mkdir(parents=True, exist_ok=True)
    paths = {ext: out / f"{REPORT_NAME}.{ext}" for ext in ("json", "md", "png")}
    report["files"] = {ext: str(p) for ext, p in paths.items()}
    with tempfile.TemporaryDirectory(prefix=f".{REPORT_NAME}-", dir=out) as scratch:
        chart = write_fleet_chart(report, Path(scratch) / "chart.png")
        write_atomic(paths["png"], chart.read_bytes())
    write_atomic(paths["md"], fleet_markdown(report))
    write_atomic(paths["json"], json.dumps(report, indent=2) + "\n")
    return paths
