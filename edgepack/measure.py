"""Latency summaries and size accounting."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np


def latency_summary(times_ms: list[float]) -> dict[str, float]:
    values = np.asarray(times_ms, dtype=np.float64)
    return {
        "runs": int(values.size),
        "p50_ms": round(float(np.percentile(values, 50)), 4),
        "p90_ms": round(float(np.percentile(values, 90)), 4),
        "min_ms": round(float(values.min()), 4),
        "mean_ms": round(float(values.mean()), 4),
    }


def zip_bytes(paths: list[Path]) -> int:
    """Size of the files deflated as an app store would ship them (zip, deflate level 9)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(paths):
            info = zipfile.ZipInfo(path.name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes(), compresslevel=9)
    return len(buffer.getvalue())


def process_age_seconds() -> float | None:
    """Seconds since this process started (Python's start and every import included), from
    /proc/self/stat's start time and /proc/uptime; None where /proc is not there."""
    import os

    try:
        stat = Path("/proc/self/stat").read_text()
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, after the command name
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def tree_pss_mb(root_pid: int | None = None) -> float:
    """Proportional set size (MB) of a process and all its descendants (/proc/<pid>/smaps_rollup;
    shared pages counted once across the tree). 0.0 where /proc does not say.

    A child that shares its parent's address space (subprocess.Popen's vfork child between fork
    and exec) reports the parent's whole PSS: it is walked but not counted. Counted, a sample
    taken while a build starts a runtime server counts the build twice: the likely cause of a
    digits android-arm64 manifest's 1,840 MB when 0.5 s samples of the same tree from outside
    never passed 1,082 MB (the build had started a second LiteRT server mid-way)."""
    import os

    root = os.getpid() if root_pid is None else root_pid
    pending, seen, total_kb = [(root, None)], set(), 0
    while pending:
        pid, parent = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            if parent is None or not same_address_space(parent, pid):
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith("Pss:"):
                        total_kb += int(line.split()[1])
                        break
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend((int(c), pid) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total_kb / 1024


_KCMP = {"x86_64": 312, "aarch64": 272}  # the kcmp(2) syscall number per architecture
_KCMP_VM = 1


def same_address_space(pid: int, other: int) -> bool:
    """Whether two processes share one address space (kcmp(2) KCMP_VM); False where kcmp is not
    available or not allowed."""
    import ctypes
    import platform

    number = _KCMP.get(platform.machine())
    if number is None:
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(number, pid, other, _KCMP_VM, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class PeakTreePss:
    """Samples tree_pss_mb() every ``interval_s`` on a thread; ``peak_mb`` is the highest seen.

        with PeakTreePss() as memory:
            ...
        memory.peak_mb
    """

    def __init__(self, interval_s: float = 0.25) -> None:
        import threading

        self.interval_s, self.peak_mb, self.samples = interval_s, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="edgepack-pss", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, tree_pss_mb())
            self.samples += 1
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakTreePss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def record(self) -> dict[str, float | int | str]:
        return {"peak_tree_pss_mb": round(self.peak_mb, 1), "samples": self.samples,
                "method": f"PSS of the build process and its children (/proc smaps_rollup), every {self.interval_s} s"}


# --- export processes; quiet host: the build's background processes stop while a latency is taken

LANE_MIN_CPUS = 4  # a second export process needs CPUs of its own: both run torch at 2 threads


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS says, else the count)."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def lane_jobs(requested: int | None) -> int:
    """How many export processes a build uses (steps/lane.py): ``requested``, or (None: auto)
    2 where this process may use LANE_MIN_CPUS or more CPUs, else 1."""
    if requested is not None:
        return max(1, requested)
    return 2 if usable_cpus() >= LANE_MIN_CPUS else 1


_BACKGROUND: set[int] = set()
_quiet_depth = 0


def register_background(pid: int):
    """Register a process of this build that works in the background (steps/lane.py); it is
    stopped inside quiet_host(). Returns the function that unregisters it."""
    _BACKGROUND.add(pid)
    return lambda: _BACKGROUND.discard(pid)


def _signal_background(signum: int) -> None:
    import os

    for pid in list(_BACKGROUND):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            _BACKGROUND.discard(pid)


class quiet_host:
    """Within the block, every registered background process is stopped (SIGSTOP) and continued
    after (SIGCONT), so what runs here (an artifact in its runtime, timed) shares the CPUs with
    nothing the build started. Nested blocks stop them once."""

    def __enter__(self) -> "quiet_host":
        import signal

        global _quiet_depth
        _quiet_depth += 1
        if _quiet_depth == 1:
            _signal_background(signal.SIGSTOP)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        global _quiet_depth
        _quiet_depth -= 1
        if _quiet_depth == 0:
            _signal_background(signal.SIGCONT)
