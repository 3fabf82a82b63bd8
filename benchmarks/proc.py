"""Run a command in a child process and measure its wall time, CPU time and memory.

Two memory figures, because a build is a process tree (the build process, plus the runtime
worker processes it starts one after another to run each artifact):

- ``peak_rss_mb``: the largest RSS high-water mark (``VmHWM`` in /proc/PID/status) of any single
  process of the tree, read at every sample: what the biggest process needed. ``VmHWM`` covers
  the whole life of the process up to the sample, so a spike between samples counts; a process
  that starts and exits between two samples is missed. (``ru_maxrss`` from ``wait4`` is not used:
  Linux carries a process's maximum RSS across fork and exec, so a 1.6 MB ``sleep`` started by a
  benchmark holding 600 MB reported 627 MB.)
- ``tree_pss_peak_mb``: the largest *sum* of the PSS (proportional set size, from
  /proc/PID/smaps_rollup) of every live process in the tree, sampled every ``pss_sample_s``
  seconds, and only while the tree's RSS sum, an upper bound of its PSS sum, exceeds the PSS
  peak so far: reading smaps_rollup walks the process's page tables (46 ms for a 2 GB build
  process), so reading it as often as RSS costs the measured build CPU (digits android-arm64,
  consecutive runs: 74.2 s wall with PSS every 0.2 s, 67.8 s every 1 s). PSS splits each
  shared page among the processes mapping it, so the sum is the memory the tree holds: a
  runtime worker forked from the build shares libtorch and the Python heap with it, and
  counts only what it added.
- ``tree_rss_peak_mb``: the same sum over RSS, for reference. It counts a shared page once per
  process that maps it, so it overstates a forked tree (MobileNetV2 android-arm64: ~4.3 GB
  RSS sum while the ExecuTorch worker, forked from the build, held ~400 MB of RSS that was
  mostly the build's own pages).

A peak shorter than the sampling interval can be missed. ``peak_mb``, what the machine had to
hold, is the larger of the biggest single process and the tree's PSS sum.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MB = 1024.0 * 1024.0


@dataclass
class Measured:
    argv: list[str]
    exit_code: int | None          # None when killed by a signal or timed out
    signal: int | None
    timed_out: bool
    wall_s: float
    cpu_user_s: float
    cpu_sys_s: float
    peak_rss_mb: float             # largest VmHWM of a single process in the tree
    tree_pss_peak_mb: float        # sampled PSS sum over the live tree: what the tree holds
    tree_rss_peak_mb: float        # sampled RSS sum over the live tree (shared pages counted per process)
    processes_seen: int
    stdout: str = field(repr=False, default="")
    stderr: str = field(repr=False, default="")

    @property
    def peak_mb(self) -> float:
        return max(self.peak_rss_mb, self.tree_pss_peak_mb)

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("stdout")
        data.pop("stderr")
        data["peak_mb"] = round(self.peak_mb, 1)
        return data

    def json_stdout(self) -> Any:
        """stdout parsed as JSON (e.g. `edgepack build --json`'s manifest), None if it is not."""
        if not self.stdout.strip():
            return None
        try:
            return json.loads(self.stdout)
        except json.JSONDecodeError:
            return None

    def failure_reason(self) -> str:
        return "timed out" if self.timed_out else f"exit {self.exit_code}, signal {self.signal}: {self.stderr_tail(4)}"

    def stderr_tail(self, lines: int = 8) -> str:
        kept = [line for line in self.stderr.splitlines() if line.strip()]
        return "\n".join(kept[-lines:])


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as handle:
                kids.extend(int(x) for x in handle.read().split())
        except OSError:  # the thread or process just exited
            continue
    return kids


def _tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(_children(pid))
    return seen


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def _status_bytes(pid: int, path: str, key: str) -> int:
    """A "Key:   N kB" field of /proc/PID/<path> in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/{path}") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


def _hwm_bytes(pid: int) -> int:
    return _status_bytes(pid, "status", "VmHWM:")


def _pss_bytes(pid: int) -> int:
    return _status_bytes(pid, "smaps_rollup", "Pss:")


def run_measured(argv: list[str], *, cwd: Path | None = None, env: dict | None = None,
                 timeout_s: float = 1800.0, sample_s: float = 0.2, pss_sample_s: float = 1.0) -> Measured:
    """Run ``argv`` to completion (or kill it after ``timeout_s``) and measure it."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                   start_new_session=True)
        tree_peak, tree_pss_peak, largest, seen, timed_out = 0, 0, 0, set(), False
        next_pss = start
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            pids = _tree(process.pid)
            seen.update(pids)
            rss = sum(_rss_bytes(p) for p in pids)
            largest = max([largest] + [_hwm_bytes(p) for p in pids])
            tree_peak = max(tree_peak, rss)
            now = time.perf_counter()
            if now >= next_pss and rss > tree_pss_peak:  # PSS <= RSS: below the peak it cannot set one
                tree_pss_peak = max(tree_pss_peak, sum(_pss_bytes(p) for p in pids))
                next_pss = now + pss_sample_s
            if time.perf_counter() - start > timeout_s:
                timed_out = True
                _kill_tree(process.pid, pids)
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(sample_s)
        wall = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    code = process.returncode
    return Measured(
        argv=[str(a) for a in argv], exit_code=code if code >= 0 and not timed_out else None,
        signal=-code if code < 0 else None, timed_out=timed_out, wall_s=round(wall, 3),
        cpu_user_s=round(usage.ru_utime, 3), cpu_sys_s=round(usage.ru_stime, 3),
        peak_rss_mb=round(largest / MB, 1), tree_pss_peak_mb=round(tree_pss_peak / MB, 1),
        tree_rss_peak_mb=round(tree_peak / MB, 1),
        processes_seen=len(seen), stdout=stdout, stderr=stderr,
    )


def _kill_tree(root: int, pids: list[int]) -> None:
    """SIGKILL the child's process group and every descendant we saw (runtime workers start
    their own sessions, so the group alone would miss them)."""
    try:
        os.killpg(root, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in pids:
        if pid != root:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
