"""What reaches the terminal: edgepack's own progress, tables and messages, nothing else.

Exporters and runtimes print: absl and oneDNN banners from native code, torch.export graph dumps,
a spec's own print(), litert-torch's partition notes, progress bars. ``Terminal.capture`` points
file descriptors 1 and 2 at a log file for the length of a command, so all of that (Python or
native, this process or a child) lands in the log, while edgepack writes to duplicates of the
real stdout/stderr taken before: under --json, stdout carries the JSON alone.

``BuildProgress`` prints each step as ``[k/N] step ... elapsed``: N and an ETA come from the
previous build's per-step timings (manifest ``timings``) when one exists. On a terminal a live
line shows the step in progress and its time so far (rich's Status).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.markup import escape


class Terminal:
    """Consoles bound to the real stdout/stderr, whatever fds 1 and 2 point at later."""

    def __init__(self) -> None:
        # A pipe or CI log gets 160 columns unless COLUMNS says otherwise; a terminal its own width.
        wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
        self.out = Console(highlight=False, width=wide)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.raw_stdout = sys.stdout
        self.log_path: Path | None = None
        self.bundle_dir: Path | None = None  # set by a build: its log goes beside the bundle

    @contextlib.contextmanager
    def capture(self, log_path: Path) -> Iterator[Path]:
        """Send fds 1 and 2 (and sys.stdout/sys.stderr) to ``log_path`` until the block ends;
        edgepack's consoles keep writing to the real terminal."""
        sys.stdout.flush()
        sys.stderr.flush()
        log_path.parent.mkdir(parents=True, exist_ok=True)
        saved = {fd: os.dup(fd) for fd in (1, 2)}
        # A stream on fd 1/2 follows the redirect, so edgepack writes to a copy of the real one; a
        # stream that is not (a test's StringIO, redirect_stdout) is left as it is.
        on_fd = {fd: _fileno(stream) == fd for fd, stream in ((1, sys.stdout), (2, sys.stderr))}
        real_out = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace") \
            if on_fd[1] else sys.stdout
        real_err = os.fdopen(os.dup(saved[2]), "w", buffering=1, encoding="utf-8", errors="replace") \
            if on_fd[2] else sys.stderr
        log = open(log_path, "ab", buffering=0)
        previous = (self.out.file, self.err.file, self.raw_stdout, sys.stdout, sys.stderr)
        opened = []
        try:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            if on_fd[1]:
                sys.stdout = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
                opened.append(sys.stdout)
            if on_fd[2]:
                sys.stderr = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
                opened.append(sys.stderr)
            self.out.file, self.err.file, self.raw_stdout = real_out, real_err, real_out
            self.log_path = log_path
            yield log_path
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            self.out.file, self.err.file, self.raw_stdout, sys.stdout, sys.stderr = previous
            for stream in opened:
                with contextlib.suppress(OSError, ValueError):
                    stream.close()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            for stream, fd in ((real_out, 1), (real_err, 2)):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
                    if on_fd[fd]:
                        stream.close()
            log.close()
            self.log_path = None

    def write_json(self, data) -> None:
        self.raw_stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        self.raw_stdout.flush()

    def print_error(self, kind: str, message: str, hint: str | None, where: str = "") -> None:
        """An error as one line on stderr (``where`` before the message: which target, say) and its hint."""
        self.err.print(f"[bold red]{kind}:[/] " + escape(where + message))
        if hint:
            self.err.print("  [dim]hint:[/] " + escape(hint))


def error_json(kind: str, message: str, hint: str | None, exit_code: int, log: Path | None) -> dict:
    """An error as --json prints it (README "CLI"): the whole output of a command that failed, or
    one target's entry in a several-target build's list."""
    return {"error": {"kind": kind, "message": message, "hint": hint, "exit_code": exit_code,
                      "log": str(log) if log else None}}


def build_log_path(bundle_dir: Path) -> Path:
    """Where a build keeps what the libraries printed: beside its bundle, dist/<model>/<target>.log."""
    return bundle_dir.with_name(bundle_dir.name.removesuffix(".failed") + ".log")


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def previous_timings(manifest_path: Path) -> list[dict]:
    """The per-step timings of the last build of this bundle (passed or failed), if any."""
    try:
        timings = json.loads(manifest_path.read_text()).get("timings") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [t for t in timings if isinstance(t, dict) and isinstance(t.get("seconds"), (int, float))]


class BuildProgress:
    """Numbered steps with elapsed times, an ETA from the previous build, a live line on a TTY."""

    def __init__(self, console: Console, previous: list[dict] | None = None, live: bool | None = None) -> None:
        self.console = console
        self.previous = previous or []
        self.expected = sum(float(t["seconds"]) for t in self.previous)
        self.started = time.perf_counter()
        self.step_started = self.started
        self.index = 0
        self.live = console.is_terminal if live is None else live
        self.status = None

    def __call__(self, message: str) -> None:
        now = time.perf_counter()
        self.index += 1
        total = len(self.previous)
        count = f"{self.index}/{total}" if total >= self.index else f"{self.index}"
        eta = ""
        if self.previous:
            done = sum(float(t["seconds"]) for t in self.previous[: self.index - 1])
            left = max(0.0, self.expected - done)
            eta = f", about {left:.0f} s left (last build: {self.expected:.0f} s)"
        line = f"[dim]·[{count}][/] {escape(message)} [dim]({now - self.started:.1f} s{eta})[/]"
        self.step_started = now
        if self.live:
            if self.status is None:
                self.status = self.console.status(line, spinner="dots")
                self.status.start()
            else:
                self.status.update(line)
            self.console.print(line)
        else:
            self.console.print(line)

    def close(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started
