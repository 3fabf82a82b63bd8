"""Run an artifact in its runtime inside a child process, with a timeout.

A segfault, abort or hang in onnxruntime, ExecuTorch or LiteRT becomes a RuntimeCheckError
naming the artifact and the signal; edgepack itself keeps running.

On Linux the child is forked from a fork server (runtimes/worker.py): a helper process per
runtime and thread count that has imported the runtime once, so a session starts in milliseconds
instead of paying the runtime's import (10-16 s for ExecuTorch) every time. The server never loads
or runs an artifact; each session still gets its own child, in its own process group, timed out
and killed as before, and given the session's current environment (a change to a variable read at
start-up, such as PYTHONPATH or OMP_NUM_THREADS, or to the working directory starts a new server). Set EDGEPACK_FORK_SERVER=0 to start a fresh interpreter per session instead
(what happens anyway off Linux).
"""

from __future__ import annotations

import atexit
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import RuntimeCheckError
from .base import TensorIO
from .protocol import decode_arrays, encode_arrays, read_message, recv_control, send_control, write_message

DEFAULT_TIMEOUT_S = 300.0
FORK_SERVER_VAR = "EDGEPACK_FORK_SERVER"
_SERVER_CALL_S = 60.0  # a fork, or a status query beyond its own wait: the server does nothing slow


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # e.g. a real-time signal without a name
        return f"signal {number}"


def _how_it_ended(code: int | None) -> str:
    if code is None:
        return "ended with an unknown status"
    if code < 0:
        return f"was killed by {_signal_name(-code)}"
    return f"exited with code {code}"


def _log_tail(log) -> str:
    if log is None:
        return ""
    try:
        log.seek(0)
        text = log.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n    ".join(lines[-6:])


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:  # a forked worker that has not made its own group yet
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def use_fork_server() -> bool:
    return (sys.platform.startswith("linux") and hasattr(socket, "send_fds")
            and os.environ.get(FORK_SERVER_VAR, "1") != "0")


# --- fork servers --------------------------------------------------------------------------------

class ServerFailed(Exception):
    """The fork server died, did not answer within ``timeout_s`` (when set), or refused a request."""

    def __init__(self, message: str, timeout_s: float | None = None):
        super().__init__(message)
        self.timeout_s = timeout_s


class ForkServer:
    """A helper process that has imported one runtime and forks a worker per session."""

    def __init__(self, runtime: str, threads: int, env: dict[str, str], cwd: str):
        self.runtime, self.threads, self.env, self.cwd = runtime, threads, env, cwd
        self.owner = os.getpid()
        self.ready = False
        self.stopped = False
        self.live = 0  # workers forked and not yet reaped
        self.retired = False  # replaced (the environment changed); stops when its last worker is reaped
        self.log = tempfile.TemporaryFile()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgepack.runtimes.worker", "--server", runtime, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                env=env, cwd=cwd, start_new_session=True,
            )
        except BaseException:
            ours.close()
            self.log.close()
            raise
        finally:
            theirs.close()
        self._control = ours

    @property
    def pid(self) -> int:
        return self.process.pid

    def usable(self) -> bool:
        return not self.stopped and self.owner == os.getpid() and self.process.poll() is None

    def wait_ready(self, timeout_s: float) -> None:
        """Wait until the server has done its imports."""
        if not self.ready:
            self._receive(timeout_s)
            self.ready = True

    def fork(self, read_fd: int, write_fd: int, log_fd: int) -> int:
        reply = self._call({"cmd": "fork"}, (read_fd, write_fd, log_fd), _SERVER_CALL_S)
        self.live += 1
        return int(reply["pid"])

    def status(self, pid: int, timeout_s: float) -> int | None:
        """The worker's exit code once it has ended (the server reaps it then), or None after timeout_s."""
        reply = self._call({"cmd": "wait", "pid": pid, "timeout": timeout_s}, (), timeout_s + _SERVER_CALL_S)
        code = reply["returncode"]
        if code is not None:
            self.live -= 1
            if self.retired and self.live == 0:
                self.stop()
        return code

    def _call(self, request: dict, fds: tuple[int, ...], timeout_s: float) -> dict:
        if self.stopped:
            raise ServerFailed("was stopped")
        try:
            send_control(self._control, request, fds)
        except OSError as exc:
            raise ServerFailed(f"cannot be reached ({exc})") from None
        reply = self._receive(timeout_s)
        if not reply.get("ok"):
            raise ServerFailed(f"refused: {reply.get('error')}")
        return reply

    def _receive(self, timeout_s: float) -> dict:
        try:
            ready, _, _ = select.select([self._control], [], [], timeout_s)
            if ready:
                reply, _ = recv_control(self._control)
                return reply
        except (EOFError, OSError) as exc:
            raise ServerFailed(f"closed its control socket ({exc})") from None
        except BaseException:
            # Interrupted between a request and its reply, the channel is out of step: drop the server.
            self.stop(kill=True)
            raise
        self.stop(kill=True)  # hung (in an import, say): of no use any more
        raise ServerFailed(f"did not answer within {timeout_s:g} s", timeout_s)

    def stop(self, kill: bool = False) -> None:
        """End the server (closing its socket makes it kill and reap any worker it still has)."""
        if self.stopped or self.owner != os.getpid():  # a forked copy of our process does not own it
            return
        self.stopped = True
        self._control.close()
        if kill:
            self.process.kill()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()

    def failure(self, exc: ServerFailed, what: str, name: str) -> RuntimeCheckError:
        """Stop this server and say how it failed while ``what``-ing artifact ``name`` (for a session)."""
        if exc.timeout_s is not None:
            return RuntimeCheckError(
                f"{self.runtime} did not answer within {exc.timeout_s:g} s while {what} {name}; killed it (SIGKILL)",
                "the runtime hangs on this artifact; re-export it or raise the timeout",
            )
        try:
            how = _how_it_ended(self.process.wait(timeout=2))
        except subprocess.TimeoutExpired:  # alive, but refused (fork failed: memory, process limit)
            how = f"fork server {exc}"
        tail = _log_tail(self.log)
        self.stop(kill=True)
        return RuntimeCheckError(
            f"{self.runtime} {how} while {what} {name}" + (f"\n    {tail}" if tail else ""),
            "the artifact or the runtime is broken; re-export it, or report the artifact with this message",
        )


_SERVERS: dict[tuple[str, int], ForkServer] = {}
_RETIRED: list[ForkServer] = []
# Variables read when an interpreter or a native library starts (import paths, loader, thread pools):
# a change needs a new server. Every other variable is handed to each worker with its load request.
_STARTUP_VARIABLE = re.compile(r"^(PYTHON|LD_|DYLD_|OMP_|KMP_|GOMP_|MKL_|OPENBLAS_)|_NUM_THREADS$")


def startup_environment(env: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in env.items() if _STARTUP_VARIABLE.search(name)}


def _server_for(runtime: str, threads: int, env: dict[str, str], cwd: str) -> ForkServer:
    """The live server for (runtime, threads); a new one when a startup variable or the working
    directory (the import path of `python -m`) changed since it started."""
    key = (runtime, threads)
    server = _SERVERS.get(key)
    if server is not None and (not server.usable() or startup_environment(server.env) != startup_environment(env)
                               or server.cwd != cwd):
        del _SERVERS[key]
        if server.usable() and server.live:
            server.retired = True  # sessions still open on it keep it until their workers are reaped
            _RETIRED.append(server)
        else:
            server.stop(kill=not server.usable())
        server = None
    if server is None:
        server = _SERVERS[key] = ForkServer(runtime, threads, env, cwd)
    return server


def prestart(runtime: str, threads: int) -> None:
    """Start the runtime's fork server now, so its imports (several seconds for ExecuTorch) run
    on another core while the caller exports; the first session then forks at once. A server
    that fails to start is reported by that first session, as without this call."""
    if not use_fork_server():
        return
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))  # as start() does: the same server serves it
    try:
        _server_for(runtime, threads, env, os.getcwd())
    except OSError:
        pass


def fork_server_pids() -> list[int]:
    """Pids of this process's running fork servers (they outlive sessions; workers do not)."""
    return sorted(s.pid for s in [*_SERVERS.values(), *_RETIRED] if s.usable())


def stop_fork_servers() -> None:
    """Stop every fork server this process started (also done at exit)."""
    for server in [*_SERVERS.values(), *_RETIRED]:
        server.stop()
    _SERVERS.clear()
    _RETIRED.clear()


atexit.register(stop_fork_servers)


class ForkedWorker:
    """A worker forked by a ForkServer, with what a session uses of subprocess.Popen."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid = server, pid
        self.returncode: int | None = None
        self.lost = False  # the server died first: the worker's status is unknown

    def poll(self) -> int | None:
        return self._status(0.0)

    def wait(self, timeout: float | None = None) -> int | None:
        code = self._status(1e9 if timeout is None else timeout)
        if code is None and not self.lost:
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
        return code

    def _status(self, timeout_s: float) -> int | None:
        if self.returncode is None and not self.lost:
            try:
                self.returncode = self.server.status(self.pid, timeout_s)
            except ServerFailed:
                self.lost = True  # an orphan now: make sure it is gone
                _kill_group(self.pid)
        return self.returncode


# --- sessions ------------------------------------------------------------------------------------

class RuntimeSession:
    """One artifact loaded in a worker process. Use as a context manager."""

    def __init__(self, runtime: str, path: Path | str, threads: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.runtime = runtime
        self.path = Path(path)
        self.threads = threads
        self.timeout_s = timeout_s
        self.process: subprocess.Popen | ForkedWorker | None = None
        self.inputs: list[TensorIO] = []
        self.outputs: list[TensorIO] = []
        self.info: dict = {}
        self.load_ms = 0.0
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._stderr = None

    def __enter__(self) -> "RuntimeSession":
        try:
            self.start()
        except BaseException:
            # A failed load (or Ctrl-C during it) skips __exit__: stop the worker here, or it outlives us.
            self._kill()
            self.close()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            # Interrupted or failed mid-request: the worker may be busy or owe us a reply, so a polite
            # "exit" could wait the full grace period. Nothing it holds is worth keeping.
            self._kill()
        self.close()

    def start(self) -> None:
        parent_read, child_write = os.pipe()
        child_read, parent_write = os.pipe()
        self._read_fd, self._write_fd = parent_read, parent_write
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ)
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
        request = {"cmd": "load", "runtime": self.runtime, "path": str(self.path.resolve()), "threads": self.threads}
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
            server = _server_for(self.runtime, self.threads, env, os.getcwd())
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
            _kill_group(self.process.pid)
            self.process.wait()

    def _died(self, what: str) -> RuntimeCheckError:
        code = None
        if self.process is not None:
            try:
                code = self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # closed its pipe but kept running
                self._kill()
                code = self.process.returncode
        how = _how_it_ended(code)
        tail = _log_tail(self._stderr)
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
        ready, _, _ = select.select([self._read_fd], [], [], self.timeout_s)
        if not ready:
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
                "the artifact may be corrupt or use an op this runtime lacks (run with --debug for details)",
            )
        return reply, out
