"""One build of a fleet, as a Ray worker runs it: ``python -m edgepack.cli build ... --json`` in a
child process with its stderr in an attempt log, its exit code and JSON turned into a report entry.
Every attempt records itself (attempt-N.json: host, build pid, exit code), which counts attempts
and lets a retry remove what a killed attempt left in the out root."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from ..errors import EXIT_EXPORT_OR_RUNTIME, EXIT_INTERRUPTED

STOP_GRACE_S = 30.0  # after SIGTERM the CLI stops at its next step; then SIGKILL


class BuildKilled(Exception):
    """The build process was killed by a signal edgepack did not send (the kernel's OOM killer, an
    operator): retried like the death of the worker running it."""


# Run in the child before it becomes the build: PR_SET_PDEATHSIG(SIGKILL), so that the build dies
# with the worker that started it; then exec the CLI in the same process (same pid).
_LAUNCHER = ("import ctypes, os, sys\n"
             "ctypes.CDLL(None).prctl(1, 9)\n"
             "if os.getppid() != int(sys.argv[1]):\n    os._exit(137)\n"
             "os.execv(sys.argv[2], sys.argv[2:])\n")


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside ``path`` (mode 0644 less the umask), then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with os.fdopen(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_dead_attempts(logs: Path, out: Path) -> list[Path]:
    """Remove what killed attempts of this build left: their staging directories (and zips) in the
    out root, named ``.<name>.tmp-<pid>-...`` after the build process, and their private TMPDIR,
    both recorded in attempt-N.json."""
    removed = []
    for record in sorted(logs.glob("attempt-*.json")):
        try:
            attempt = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        pid = attempt.get("pid")
        if not isinstance(pid, int) or attempt.get("host") != socket.gethostname() or _alive(pid):
            continue
        tmp = attempt.get("tmp")
        scratch = [Path(tmp)] if isinstance(tmp, str) and Path(tmp).is_dir() else []
        for stale in [*out.glob(f"*/.*.tmp-{pid}-*"), *out.glob(f".*.tmp-{pid}-*"), *scratch]:
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
            removed.append(stale)
    return removed


def _claim_attempt(logs: Path) -> int:
    attempt = 1
    while True:
        try:
            os.close(os.open(logs / f"attempt-{attempt}.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            return attempt
        except FileExistsError:
            attempt += 1


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the build's process group (the CLI stops at its next step, writing nothing), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _keep_logs(scratch: Path, logs: Path, attempt: int) -> str | None:
    """The CLI keeps its captured library output in TMPDIR when a build fails before it has a bundle
    (a spec error, say): moved beside the attempt's log before the TMPDIR goes."""
    kept = None
    for found in sorted(scratch.glob("edgepack-*.log")):
        if found.stat().st_size:
            kept = str(shutil.move(str(found), logs / f"attempt-{attempt}-{found.name}"))
    return kept


def run_build(job: dict[str, Any]) -> dict[str, Any]:
    """One build in a child process (this runs as a Ray task). Returns its report entry."""
    logs, out = Path(job["logs"]), Path(job["out"])
    logs.mkdir(parents=True, exist_ok=True)
    sweep_dead_attempts(logs, out)
    attempt = _claim_attempt(logs)
    log_path = logs / f"attempt-{attempt}.log"
    argv = [sys.executable, "-m", "edgepack.cli", "build", *job["args"]]
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        argv = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *argv]  # see _LAUNCHER; Ray runs tasks here
    # The build's temp files (its scratch directory, its captured log) go to a TMPDIR of its own,
    # removed when the attempt ends, or by the next attempt's sweep when a kill ended it.
    scratch = tempfile.mkdtemp(prefix=f"edgepack-fleet-attempt{attempt}-")
    env = {**os.environ, "EDGEPACK_CACHE": job["cache"], "TMPDIR": scratch}
    cwd = job["cwd"] if Path(job["cwd"]).is_dir() else str(out)
    started, timed_out = time.monotonic(), False
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                                    cwd=cwd, start_new_session=True)
            record = {"attempt": attempt, "host": socket.gethostname(), "pid": proc.pid, "worker_pid": os.getpid(),
                      "tmp": scratch}
            write_atomic(logs / f"attempt-{attempt}.json", json.dumps(record))
            try:
                stdout, _ = proc.communicate(timeout=job["timeout_s"])
            except subprocess.TimeoutExpired:
                timed_out = True
                _stop(proc)
                stdout, _ = proc.communicate()
        kept = _keep_logs(Path(scratch), logs, attempt)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # temp files only; the bundle is in the out root
    wall = round(time.monotonic() - started, 2)
    code = proc.returncode
    write_atomic(logs / f"attempt-{attempt}.json", json.dumps({**record, "exit_code": code, "wall_s": wall}))
    if code < 0 and not timed_out:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise BuildKilled(f"the build process was killed by {name} (attempt {attempt}, log {log_path})")
    try:
        printed = json.loads(stdout)
    except ValueError:
        printed = None
    entry: dict[str, Any] = {"exit_code": code, "wall_s": wall, "host": record["host"], "log": str(log_path),
                             "build_log": kept}
    if timed_out:
        entry.update(exit_code=EXIT_EXPORT_OR_RUNTIME, status="timeout",
                     error={"kind": "timeout", "message": f"the build took more than {job['timeout_s']:g} s and was "
                            "stopped", "hint": "raise --timeout, or look at the log for the step it was in"})
    elif isinstance(printed, dict) and isinstance(printed.get("error"), dict):
        error = printed["error"]
        entry.update(status="interrupted" if code == EXIT_INTERRUPTED else "error",
                     error={k: error.get(k) for k in ("kind", "message", "hint")})
    elif isinstance(printed, dict) and "artifacts" in printed:
        entry.update(summarize_manifest(printed, out))
        entry["build_log"] = entry["build_log"] or kept
    else:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        entry.update(status="error", error={"kind": "no result", "message": f"the build exited {code} without its "
                                            f"JSON: {' / '.join(tail)[:500]}", "hint": f"see {log_path}"})
    return entry


def summarize_manifest(manifest: dict[str, Any], out: Path) -> dict[str, Any]:
    """The figures the report keeps from a build's manifest (read as a plain dict: fields added
    later, such as ``cache``, pass through or count as unknown)."""
    status = manifest.get("status")
    model, target = (manifest.get("model") or {}).get("name"), (manifest.get("target") or {}).get("name")
    bundle = out / str(model) / (f"{target}.failed" if status == "failed" else str(target))
    artifacts = []
    for art in manifest.get("artifacts") or []:
        outputs = (art.get("parity") or {}).get("outputs") or []
        cosines = [o["cosine_min"] for o in outputs if isinstance(o.get("cosine_min"), (int, float))]
        sqnrs = [o["sqnr_db"] for o in outputs if isinstance(o.get("sqnr_db"), (int, float))]
        artifacts.append({"file": art.get("file"), "format": art.get("format"), "precision": art.get("precision"),
                          "status": art.get("status"), "parity_passed": (art.get("parity") or {}).get("passed"),
                          "bytes": art.get("bytes"), "zip_bytes": art.get("zip_bytes"),
                          "ratio_to_float": (art.get("size") or {}).get("ratio_to_float"),
                          "cosine_min": min(cosines) if cosines else None, "sqnr_db": min(sqnrs) if sqnrs else None,
                          "accuracy": art.get("accuracy") or None})
    cache = manifest.get("cache")
    hit = cache.get("hit") if isinstance(cache, dict) else None
    build_log = bundle.with_name(f"{target}.log")
    return {"status": status, "model_name": model, "target_name": target,
            "bundle_dir": str(bundle) if bundle.is_dir() else None,
            "build_log": str(build_log) if build_log.is_file() else None, "artifacts": artifacts,
            "accuracy_float": (manifest.get("accuracy") or {}).get("float"),
            "failures": [str(f).splitlines()[0] for f in manifest.get("failures") or []],
            "warnings": len(manifest.get("warnings") or []), "cached": hit if isinstance(hit, bool) else None}
