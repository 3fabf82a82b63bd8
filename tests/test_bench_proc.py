"""The benchmark's process-tree memory figures: a forked child shares its parent's pages, so the
tree's PSS sum counts them once while the RSS sum counts them twice."""

import sys

from benchmarks.proc import run_measured

_FORK_AND_HOLD = """
import os, time
import numpy as np
block = np.ones(160 * 1024 * 1024 // 8)   # 160 MB, touched, then shared with a forked child
pid = os.fork()
time.sleep(1.5)
if pid:
    os.waitpid(pid, 0)
"""


def test_tree_pss_counts_forked_pages_once():
    measured = run_measured([sys.executable, "-c", _FORK_AND_HOLD], timeout_s=60, sample_s=0.1)
    assert measured.exit_code == 0, measured.stderr_tail()
    assert measured.processes_seen == 2
    assert measured.peak_rss_mb > 160
    assert measured.tree_rss_peak_mb > 2 * 150            # each process maps the block: counted twice
    assert 150 < measured.tree_pss_peak_mb < 1.3 * measured.peak_rss_mb   # counted once
    assert measured.peak_mb == max(measured.peak_rss_mb, measured.tree_pss_peak_mb)


def test_largest_process_is_not_the_launcher():
    """A small command started by a big benchmark process reports its own memory: Linux carries
    ru_maxrss across fork and exec, so wait4's figure would be the launcher's."""
    import numpy as np

    ballast = np.ones(300 * 1024 * 1024 // 8)  # the launcher holds 300 MB while it measures
    measured = run_measured(["/bin/sleep", "0.5"], timeout_s=30, sample_s=0.05)
    assert ballast[-1] == 1.0
    assert measured.exit_code == 0
    assert 0 < measured.peak_rss_mb < 50, measured.to_dict()
