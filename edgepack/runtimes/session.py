"""Run an artifact in its runtime inside a child process, with a timeout.

A segfault, abort or hang in onnxruntime, ExecuTorch or LiteRT becomes a RuntimeCheckError
naming the artifact and the signal; edgepack itself keeps running.

On Linux the child is forked from the runtime's fork server (runtimes/forkserver.py), so a
session starts in milliseconds; each session still gets its own child, in its own process
group, timed out and killed. Set EDGEPACK_FORK_SERVER=0 to start a fresh interpreter per session
instead (what happens anyway off Linux).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import RuntimeCheckError
from ..measure import quiet_host
from .base import TensorIO
from .forkserver import (ForkedWorker, ServerFailed, how_it_ended, kill_group, log_tail, server_for, use_fork_server,
                         wait_readable)
from .protocol import decode_arrays, encode_arrays, read_message, write_message

DEFAULT_TIMEOUT_S = 300.0


class RuntimeSession:
    """One artifact loaded in a worker process. Use as a context manager."""

    def __init__(self, runtime: str, path: Path | str, threads: int, timeout_s: float = DEFAULT_TIMEOUT_S,
                 env: dict[str, str] | None = None, options: dict | None = None):
        """env: variables set for the worker over this process's environment (start-up ones such as
        LD_LIBRARY_PATH included: the fork server is then started with them); options: keyword
        arguments for the runner's load(), JSON values only."""
        self.runtime = runtime
        self.path = Path(path)
        self.threads = threads
        self.timeout_s = timeout_s
        self.env = dict(env or {})
        self.options = dict(options or {})
        self.process: subprocess.Popen | ForkedWorker | None = None
        self.inputs: list[TensorIO] = []
        self.outputs: list[TensorIO] = []
        self.info: dict = {}
        self.load_ms = 0.0
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._stderr = None

    def __enter__(self) -> "RuntimeSession":
        # While an artifact runs (and is timed), the build's background export stops (steps/lane.py).
        self._quiet = quiet_host().__enter__()
        try:
            self.start()
        except BaseException:
            # A failed load (or Ctrl-C during it) skips __exit__: stop the worker here, or it outlives us.
            self._kill()
            self.close()
            self._quiet.__exit__()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                # Interrupted or failed mid-request: the worker may be busy or owe us a reply, so a polite
                # "exit" could wait the full grace period. Nothing it holds is worth keeping.
                self._kill()
            self.close()
        finally:
            self._quiet.__exit__()

    def start(self) -> None:
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        self._read_fd, self._write_fd = parent_read, parent_write
        self._stderr = tempfile.TemporaryFile()
        env = {**os.environ, **self.env}
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        try:
            if use_fork_server():
                self.process = self._fork(env, child_read, child_write)
            else:
                self.process = subprocess.Popen(
                    [sys.executable, "-m", "edgepack.runtimes.worker", str(child_read), str(child_write)],
                    pass_fds=(child_read, child_write), stdin=subprocess.DEVNULL, stdout=self._stderr,
                    stderr=self._stderr, env=env, start_new_session=True,
                )
        finally:
            os.close(child_read)
            os.close(child_write)
        request = {"cmd": "load", "runtime": self.runtime, "path": str(self.path.resolve()), "threads": self.threads,
                   "options": self.options}
        if isinstance(self.process, ForkedWorker):
            request["env"] = env  # the server's own may be older
        reply, _ = self._request(request, what="loading")
        self.inputs = [TensorIO(**t) for t in reply["inputs"]]
        self.outputs = [TensorIO(**t) for t in reply["outputs"]]
        self.info = reply.get("info", {})
        self.load_ms = float(reply["load_ms"])

    def _fork(self, env: dict[str, str], child_read: int, child_write: int) -> ForkedWorker:
        """A worker forked from this runtime's server, starting the server if need be. A server that
        fails while importing is reported like a worker failing to load; one that died since it was
        ready (killed from outside) is replaced once."""
        for attempt in (1, 2):
            server = server_for(self.runtime, self.threads, env, os.getcwd())
            try:
                server.wait_ready(self.timeout_s)
            except ServerFailed as exc:
                raise server.failure(exc, "loading", self.path.name) from None
            try:
                return ForkedWorker(server, server.fork(child_read, child_write, self._stderr.fileno()))
            except ServerFailed as exc:
                if attempt == 2:
                    raise server.failure(exc, "starting a worker for", self.path.name) from None
                server.stop(kill=True)
        raise AssertionError("unreachable")

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        _, payload = self._request({"cmd": "run"}, encode_arrays(feeds), what="running")
        return decode_arrays(payload)

    def bench(self, feeds: list[np.ndarray], warmup: int, runs: int) -> dict:
        reply, _ = self._request({"cmd": "bench", "warmup": warmup, "runs": runs}, encode_arrays(feeds),
                                 what="benchmarking")
        return {"times_ms": reply["times_ms"], "peak_rss_mb": reply["peak_rss_mb"]}

    def close(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                try:
                    write_message(self._write_fd, {"cmd": "exit"})
                    self.process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    self._kill()
        finally:
            for fd in (self._read_fd, self._write_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._read_fd = self._write_fd = None
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
            self.process = None

    def _kill(self) -> None:
        if self.process and self.process.poll() is None:
            kill_group(self.process.pid)
            self.process.wait()

    def _died(self, what: str) -> RuntimeCheckError:
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # closed its pipe but kept running
                self._kill()
                code = self.process.returncode
        how = how_it_ended(code)
        tail = log_tail(self._stderr)
        return RuntimeCheckError(
            f"{self.runtime} {how} while {what} {self.path.name}" + (f"\n    {tail}" if tail else ""),
            "the artifact or the runtime is broken; re-export it, or report the artifact with this message",
        )

    def _request(self, header: dict, payload: bytes = b"", what: str = "running") -> tuple[dict, bytes]:
        assert self.process is not None
        try:
            write_message(self._write_fd, header, payload)
        except (BrokenPipeError, OSError):
            raise self._died(what) from None
        if not wait_readable(self._read_fd, self.timeout_s):
            self._kill()
            raise RuntimeCheckError(
                f"{self.runtime} did not answer within {self.timeout_s:g} s while {what} {self.path.name}; "
                f"killed it (SIGKILL)",
                "the runtime hangs on this artifact; re-export it or raise the timeout",
            )
        try:
            reply, out = read_message(self._read_fd)
        except EOFError:
            raise self._died(what) from None
        if not reply.get("ok"):
            raise RuntimeCheckError(
                f"{self.runtime} failed while {what} {self.path.name}: {reply.get('type')}: {reply.get('error')}",
                reply.get("hint") or "the artifact may be corrupt or use an op this runtime lacks "
                                     "(run with --debug for details)",
            )
        return reply, out
