"""terminal.py: what a library prints (Python or native, through fd 1 and 2) goes to the log;
what edgepack prints reaches the real stdout/stderr."""

from __future__ import annotations

import json
import subprocess
import sys

from rich.console import Console

from edgepack.terminal import BuildProgress, previous_timings


CAPTURING = """
import os, subprocess, sys
from edgepack.terminal import Terminal
term = Terminal()
with term.capture(__import__("pathlib").Path(sys.argv[1])):
    os.write(1, b"native stdout\\n")
    os.write(2, b"native stderr\\n")
    print("python print")
    print("python stderr", file=sys.stderr)
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    term.write_json({"ok": True})
    term.err.print("edgepack message")
os.write(1, b"after\\n")
"""


def test_capture_sends_fd_writes_and_prints_to_the_log_and_keeps_edgepacks_output(tmp_path):
    log = tmp_path / "build.log"
    proc = subprocess.run([sys.executable, "-c", CAPTURING, str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == json.dumps({"ok": True}, indent=2) + "\nafter\n"  # the JSON, then fd 1 restored
    assert proc.stderr == "edgepack message\n"
    text = log.read_text()
    for line in ("native stdout", "native stderr", "python print", "python stderr", "child process"):
        assert line in text


def test_previous_timings_reads_a_manifest_and_ignores_junk(tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"timings": [{"step": "a", "seconds": 2.0}, {"step": "b"}, "junk",
                                                {"step": "c", "seconds": 3}]}))
    assert [t["step"] for t in previous_timings(manifest)] == ["a", "c"]
    manifest.write_text("not json")
    assert previous_timings(manifest) == []
    assert previous_timings(tmp_path / "missing.json") == []


def test_progress_counts_steps_and_estimates_time_left_from_the_last_build():
    console = Console(record=True, width=200, force_terminal=False)
    progress = BuildProgress(console, [{"step": "a", "seconds": 10.0}, {"step": "b", "seconds": 30.0}], live=False)
    progress("reading")
    progress("exporting")
    progress("one more than last time")
    lines = console.export_text().splitlines()
    assert lines[0].startswith("·[1/2] reading") and "about 40 s left (last build: 40 s)" in lines[0]
    assert lines[1].startswith("·[2/2] exporting") and "about 30 s left" in lines[1]
    assert lines[2].startswith("·[3] one more")
    first = BuildProgress(Console(record=True, width=200), None, live=False)
    first("step")
    assert "left" not in first.console.export_text()
