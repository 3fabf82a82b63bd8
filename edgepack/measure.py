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
    shared pages counted once across the tree). 0.0 where /proc does not say."""
    import os

    root = os.getpid() if root_pid is None else root_pid
    pending, seen, total_kb = [root], set(), 0
    while pending:
        pid = pending.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total_kb += int(line.split()[1])
                    break
            for task in Path(f"/proc/{pid}/task").iterdir():
                pending.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total_kb / 1024


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
