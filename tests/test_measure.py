"""measure.py: latency summaries and the build's peak memory (PSS of its process tree)."""

from __future__ import annotations

import subprocess
import sys
import time

from edgepack.measure import PeakTreePss, latency_summary, same_address_space, tree_pss_mb


def test_latency_summary_percentiles():
    summary = latency_summary([float(v) for v in range(1, 101)])
    assert summary["p50_ms"] == 50.5 and summary["min_ms"] == 1.0 and summary["runs"] == 100


def test_tree_pss_counts_children_and_the_peak_holds():
    alone = tree_pss_mb()
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(300_000_000); time.sleep(3)"])
    try:
        with PeakTreePss(interval_s=0.05) as memory:
            deadline = time.time() + 10
            while tree_pss_mb() < alone + 250 and time.time() < deadline:
                time.sleep(0.05)
            time.sleep(0.2)
    finally:
        child.kill()
        child.wait()
    assert memory.peak_mb >= alone + 250  # the child's 300 MB, touched, count for the tree
    assert memory.record()["samples"] >= 2 and "smaps_rollup" in memory.record()["method"]


def test_a_process_sharing_its_parents_memory_is_told_apart():
    """kcmp says whether two tasks share one address space: a thread of this process does (as
    subprocess's vfork child does until its exec, which tree_pss_mb must not count twice); a
    child process does not."""
    import platform
    import threading

    import pytest

    if platform.machine() not in ("x86_64", "aarch64") or sys.platform != "linux":
        pytest.skip("kcmp numbers known for Linux x86_64 and aarch64 only")
    tid, ready, done = [], threading.Event(), threading.Event()

    def worker():
        tid.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    thread = threading.Thread(target=worker)
    thread.start()
    ready.wait(5)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        import os
        assert same_address_space(os.getpid(), os.getpid())
        assert same_address_space(os.getpid(), tid[0])
        assert not same_address_space(os.getpid(), child.pid)
    finally:
        done.set()
        thread.join()
        child.kill()
        child.wait()


def test_process_age_counts_from_the_process_start():
    """A build's first step is the time from the process's start (Python and imports): a child
    that sleeps 0.5 s before asking must report at least that, and well under a minute."""
    import subprocess
    import sys

    code = "import time; time.sleep(0.5); from edgepack.measure import process_age_seconds as a; print(a())"
    age = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0.5 <= age < 60
