"""A second process beside the build that runs the exports nothing else waits for: the fp32
baselines the speed comparison times (needed only at its end) and the reproducibility
re-exports (needed only by the manifest), each from scratch. Both processes run torch at the
build's thread count (2 for the Android and x86 profiles), so the lane pays where the host has
CPUs for both: by default from 4 CPUs (measure.lane_jobs). On 2 cores it bought EfficientNet-Lite0
android-arm64 12% (105.6 / 106.6 s against 119.1 / 121.4 s, alternating runs, both processes
calibrating once per recipe) for 1.3 GB more memory (tree PSS 3,367 against 2,071 MB).

    lane = ExportLane.start(ctx, jobs=2)      # None when --jobs 1 (the default under 4 CPUs), or the model cannot be sent
    lane.submit("model.pte", config, workdir) # runs there: the exporter, RNGs seeded from ctx.seed
    result = lane.result("model.pte")         # ExportResult (files under workdir), or ExportError
    lane.close()

The lane is a fresh interpreter (not a fork: the build's OpenMP threads do not survive one),
sent the export context once (pickled; the spec file's module is loaded there under the same
name, so the model's classes resolve). It runs with the build's thread count and a passive
OpenMP wait policy, so two sets of threads on two cores do not spin against each other, and it
is stopped (SIGSTOP) whenever the build runs an artifact in a runtime (measure.quiet_host), so
no latency figure is taken while it works. A second export there starts from nothing
(calibration included, once per recipe as in the build: the .tflite reuses the lane's own .pte
calibration where the build's does), in another process: a stronger check than repeating it in
place.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from .. import errors, package
from ..bundle import ReproducibilityCheck
from ..export import registry as exporter_registry
from ..errors import EdgepackError, ExportError
from ..export.base import ExportResult
from ..measure import lane_jobs, register_background
from ..quant.calibrate import shared_calibration
from ..spec import import_spec_module


def _error_type(name: str) -> type[EdgepackError] | None:
    """errors.<name> when it is one of edgepack's errors (an exporter's own failure, re-raised
    here as itself, exit code included)."""
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, EdgepackError) else None


def baseline_formats(configs: list[Any]) -> set[str]:
    """The formats whose quantized artifacts, run here, have no fp32 artifact beside them: the
    speed comparison exports an fp32 baseline of each (steps/speed.py)."""
    runnable = [c for c in configs if not c.device_only]
    return {c.format for c in runnable if c.precision != "fp32"} - {c.format for c in runnable if c.precision == "fp32"}


def lane_wanted(profile: Any, check_reproducible: bool) -> bool:
    """Whether a build of ``profile`` has exports for a lane: second exports, or fp32 baselines."""
    runnable = any(not a.device_only for a in profile.artifacts)
    return runnable and (check_reproducible or bool(baseline_formats(list(profile.artifacts))))


def _spec_modules() -> list[tuple[str, str]]:
    """(module name, file) of every spec file load_spec imported, so that classes defined in
    one unpickle in the lane."""
    return [(name, module.__file__) for name, module in list(sys.modules.items())
            if name.startswith("edgepack_spec_") and getattr(module, "__file__", None)]


class ExportLane:
    """The second export process of one build (see the module docstring)."""

    def __init__(self, process: subprocess.Popen, conn: "_Duplex") -> None:
        self.process, self.conn = process, conn
        self.replies: dict[str, tuple | None] = {}  # job name -> its reply, None until it comes
        self.unregister = register_background(process.pid)

    @classmethod
    def start(cls, ctx: Any, jobs: int | None = None) -> tuple["ExportLane | None", str]:
        """(the lane, "") or (None, why the build exports in its own process only)."""
        if lane_jobs(jobs) < 2:
            return None, "one export process (--jobs 1, or fewer than 4 CPUs)"
        if ctx.extras:
            return None, "a stage left graphs for the exporters (they stay in the build's process)"
        sendable = replace(ctx, train_data=None, loss=None)
        try:
            payload = pickle.dumps(sendable, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # whatever pickling a user's model raises
            return None, f"the model cannot be sent to a second process ({type(exc).__name__}: {exc})"[:300]
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        # The build's own torch thread count: calibration's sums depend on it (EfficientNet-Lite0's int8
        # .pte and .tflite differ in bytes between 1 and 2 threads), so a second export with another
        # would differ for that reason alone.
        threads = torch.get_num_threads()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        command = [sys.executable, "-c", _DIE_WITH_PARENT.format(parent=os.getpid())
                   + f"from edgepack.steps.lane import serve; serve({child_read}, {child_write})"]
        try:
            process = subprocess.Popen(command, pass_fds=(child_read, child_write), env=env,
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL, preexec_fn=_dies_with_parent())
        except OSError as exc:
            for fd in (parent_read, child_write, child_read, parent_write):
                os.close(fd)
            return None, f"the second export process did not start ({exc})"
        os.close(child_read)
        os.close(child_write)
        conn = _Duplex(parent_read, parent_write, background_sends=True)
        conn.send(("context", list(sys.path), _spec_modules(), threads, payload))
        return cls(process, conn), ""

    def submit(self, name: str, config: Any, workdir: Path) -> None:
        """Queue an export of ``config`` into ``workdir`` (created); jobs run in order."""
        Path(workdir).mkdir(parents=True, exist_ok=True)
        self.conn.send(("export", name, config.format, config.model_dump(mode="json"), str(workdir)))
        self.replies[name] = None

    def has(self, name: str) -> bool:
        return name in self.replies

    def result(self, name: str) -> ExportResult:
        """Wait for job ``name``: its ExportResult, or the exporter's error raised here."""
        while self.replies[name] is None:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                code = self.process.poll()
                ended = f"signal {-code}" if code is not None and code < 0 else f"exit code {code}"
                raise ExportError(f"the second export process ended ({ended}) before {name} was exported",
                                  "run with --jobs 1 to export in the build's own process")
            self.replies[message[1]] = message
        kind, _, *rest = self.replies[name]
        if kind == "error":
            error_type, text, hint = rest
            known = _error_type(error_type)
            raise known(text, hint) if known is not None else ExportError(f"{name}: {error_type}: {text}", hint)
        files, runtime, details, notes = rest
        return ExportResult(files=[Path(f) for f in files], runtime=runtime, details=details, notes=notes)

    def close(self) -> None:
        """Stop the process (it may be stopped mid-job: continued first, then killed)."""
        self.unregister()
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()  # what it still does is nobody's: results are read before close()
            self.process.wait()
        self.conn.close()


class _Duplex:
    """Two pipe ends as one connection (multiprocessing's Connection over each). With
    ``background_sends``, send() queues the message for a thread that writes it: a pipe holds
    64 KB, so writing the model (megabytes) waits for the other side to read it, which a lane
    still importing torch, or stopped while a latency is taken, does not do at once."""

    def __init__(self, read_fd: int, write_fd: int, background_sends: bool = False) -> None:
        self.reader, self.writer = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
        self.outbox: queue.Queue | None = None
        if background_sends:
            self.outbox = queue.Queue()
            threading.Thread(target=self._write_queued, name="edgepack-lane-sender", daemon=True).start()

    def _write_queued(self) -> None:
        while (message := self.outbox.get()) is not None:
            try:
                self.writer.send(message)
            except OSError:  # the lane ended: result() says so
                return

    def send(self, message: Any) -> None:
        if self.outbox is not None:
            self.outbox.put(message)
        else:
            self.writer.send(message)

    def recv(self) -> Any:
        return self.reader.recv()

    def close(self) -> None:
        if self.outbox is not None:
            self.outbox.put(None)
        for end in (self.reader, self.writer):
            with contextlib.suppress(OSError):
                end.close()


def _dies_with_parent() -> Any:
    """Linux: a function for Popen's preexec_fn (the child, before exec) asking the kernel for
    SIGKILL when the build dies (prctl PR_SET_PDEATHSIG), which ends the lane even while
    quiet_host has it stopped and it can never read the end of its pipe. Only a C call runs in
    the forked child (bound here, before the fork). None where there is no prctl."""
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL


# ...and a build that died before the kernel took the request is seen in the parent pid.
_DIE_WITH_PARENT = "import os\nif os.getppid() != {parent}:\n    os._exit(0)\n"


def serve(read_fd: int, write_fd: int) -> None:
    """The lane's loop (in the second process): take the context, then export job after job."""
    conn = _Duplex(read_fd, write_fd)
    _, path, modules, threads, payload = conn.recv()
    sys.path[:] = path
    for name, file in modules:
        import_spec_module(name, Path(file))
    ctx = pickle.loads(payload)
    torch.set_num_threads(threads)
    exporters = exporter_registry()
    with shared_calibration():  # one calibration per recipe, as in the build's own process
        _export_jobs(conn, ctx, exporters)


def _export_jobs(conn: "_Duplex", ctx: Any, exporters: dict) -> None:
    import copy
    import random

    import numpy as np

    while True:
        try:
            _, name, fmt, config_json, workdir = conn.recv()
        except EOFError:  # the build closed the pipe
            return
        try:
            exporter = exporters[fmt]
            config = exporter.config.model_validate(config_json)
            torch.manual_seed(ctx.seed)
            np.random.seed(ctx.seed)
            random.seed(ctx.seed)
            result = exporter.module.export(config, replace(ctx, workdir=Path(workdir), model=copy.deepcopy(ctx.model)))
            reply = ("ok", name, [str(f) for f in result.files], result.runtime, result.details, result.notes)
        except EdgepackError as exc:
            reply = ("error", name, type(exc).__name__, exc.message, exc.hint)
        except Exception as exc:  # an exporter's unexpected failure: named, never lost
            reply = ("error", name, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "", None)
        try:
            conn.send(reply)
        except (OSError, pickle.PicklingError) as exc:
            conn.send(("error", name, "ExportError", f"the export's result could not be sent back ({exc})", None))


# --- the reproducibility check on the lane ------------------------------------------------

def defer_reproducibility(judge: Any, entry: Any) -> None:
    """Queue the second export of a judged artifact on the lane; collect_reproducibility()
    compares it once the build no longer waits on anything else."""
    config = exporter_registry()[entry.format].config.model_validate(entry.config)
    workdir = Path(tempfile.mkdtemp(prefix="edgepack-repro-"))
    name = f"again:{entry.file}"
    judge.lane.submit(name, config, workdir)
    judge.deferred.append((entry, name, workdir, judge.export_key(config) if judge.cache is not None else None))


def collect_reproducibility(judge: Any) -> dict[str, Any]:
    """file -> the lane's reproducibility result for every deferred artifact still shipped. A
    comparison is stored in the build cache beside its export; a second export that failed (the
    lane died, say) is not, so the next build exports it again rather than repeat the failure."""
    found: dict[str, ReproducibilityCheck] = {}
    for entry, name, workdir, key in judge.deferred:
        files = [judge.staged / item.path for item in entry.files]
        try:
            again = judge.lane.result(name)
            if entry.files and all(path.is_file() for path in files):
                found[entry.file] = package.compare_exports(files, judge.staged, again.files, workdir,
                                                            package.LANE_REPRO_METHOD)
                if key is not None:
                    judge.cache.put("reproducible", key, [], {"reproducible": found[entry.file].model_dump(mode="json")})
        except EdgepackError as exc:
            found[entry.file] = ReproducibilityCheck(
                reproducible=False, method=package.LANE_REPRO_METHOD, files=[item.path for item in entry.files],
                detail=f"the second export failed: {exc.message}"[:400])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    judge.deferred.clear()
    return found


def with_reproducibility(judge: Any, manifest: Any) -> Any:
    """``manifest`` with the lane's reproducibility results (collect_reproducibility) in its
    artifacts; the manifest is not covered by payload_sha256, so the seal holds."""
    found = collect_reproducibility(judge)
    return manifest.model_copy(update={"artifacts": [
        art.model_copy(update={"reproducible": found[art.file]}) if art.file in found else art
        for art in manifest.artifacts]})
