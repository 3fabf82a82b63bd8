"""Fork servers: one helper process per runtime and thread count that has imported the runtime
once and forks a worker per session (runtimes/worker.py --server), so a session starts in
milliseconds instead of paying the runtime's import (10-16 s for ExecuTorch) every time. The
server never loads or runs an artifact; each worker gets its own process group and the
session's current environment (a change to a variable read at start-up, such as PYTHONPATH or
OMP_NUM_THREADS, or to the working directory starts a new server). RuntimeSession
(runtimes/session.py) is the only user. Linux only; EDGEPACK_FORK_SERVER=0 turns it off.
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
import time

from ..errors import RuntimeCheckError, check_interrupted
from .protocol import recv_control, send_control

FORK_SERVER_VAR = "EDGEPACK_FORK_SERVER"
_SERVER_CALL_S = 60.0  # a fork, or a status query beyond its own wait: the server does nothing slow
_WAIT_SLICE_S = 0.25  # how often a wait for a runtime looks at a recorded interrupt


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # e.g. a real-time signal without a name
        return f"signal {number}"


def how_it_ended(code: int | None) -> str:
    if code is None:
        return "ended with an unknown status"
    if code < 0:
        return f"was killed by {signal_name(-code)}"
    return f"exited with code {code}"


def log_tail(log) -> str:
    if log is None:
        return ""
    try:
        log.seek(0)
        text = log.read().decode(errors="replace").strip()
    except (OSError, ValueError):
        return ""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n    ".join(lines[-6:])


def kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:  # a forked worker that has not made its own group yet
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_readable(source, timeout_s: float) -> bool:
    """select() on one fd or socket for up to ``timeout_s``, in short slices so that a signal the
    CLI recorded (errors.check_interrupted) stops the wait within a quarter of a second."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_interrupted()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        ready, _, _ = select.select([source], [], [], min(left, _WAIT_SLICE_S))
        if ready:
            return True


def use_fork_server() -> bool:
    return (sys.platform.startswith("linux") and hasattr(socket, "send_fds")
            and os.environ.get(FORK_SERVER_VAR, "1") != "0")


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
            if wait_readable(self._control, timeout_s):
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
        if self.begin_stop(kill):
            self.end_stop()

    def begin_stop(self, kill: bool = False) -> bool:
        """Ask the server to end, without waiting; False when it is not this process's to stop. A
        server still importing its runtime has forked nothing: it is killed instead of waited for
        (ExecuTorch's import would otherwise hold the build's exit for seconds)."""
        if self.stopped or self.owner != os.getpid():  # a forked copy of our process does not own it
            return False
        self.stopped = True
        self._control.close()
        if kill or not self.ready:
            self.process.kill()
        return True

    def end_stop(self) -> None:
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
            how = how_it_ended(self.process.wait(timeout=2))
        except subprocess.TimeoutExpired:  # alive, but refused (fork failed: memory, process limit)
            how = f"fork server {exc}"
        tail = log_tail(self.log)
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


def server_for(runtime: str, threads: int, env: dict[str, str], cwd: str) -> ForkServer:
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
        server_for(runtime, threads, env, os.getcwd())
    except OSError:
        pass


def stop_idle_servers(keep: str | None) -> list[tuple[str, int, dict[str, str], str]]:
    """Stop this process's fork servers, other than ``keep``'s, that have no worker running.
    Returns what start_servers() needs to start them again; a session of a stopped runtime also
    starts its server again by itself (server_for). An idle server is a whole interpreter with
    its runtime imported: ExecuTorch's is ~310 MB PSS."""
    stopping = []
    for key, server in list(_SERVERS.items()):
        if key[0] != keep and server.live == 0 and server.owner == os.getpid():
            del _SERVERS[key]
            if server.begin_stop():
                stopping.append(server)
    for server in stopping:  # asked at once, then each waited for, so their exits overlap
        server.end_stop()
    return [(server.runtime, server.threads, server.env, server.cwd) for server in stopping]


def start_servers(stopped: list[tuple[str, int, dict[str, str], str]]) -> None:
    """Start again, each with its own environment, the servers stop_idle_servers() stopped, so
    their imports run while the caller goes on. A server that fails to start is reported by its
    first session, as with prestart()."""
    for runtime, threads, env, cwd in stopped:
        try:
            server_for(runtime, threads, env, cwd)
        except OSError:
            pass


def fork_server_pids() -> list[int]:
    """Pids of this process's running fork servers (they outlive sessions; workers do not)."""
    return sorted(s.pid for s in [*_SERVERS.values(), *_RETIRED] if s.usable())


def stop_fork_servers() -> None:
    """Stop every fork server this process started (also done at exit): all asked at once, then
    each waited for, so their exits overlap."""
    stopping = [server for server in [*_SERVERS.values(), *_RETIRED] if server.begin_stop()]
    for server in stopping:
        server.end_stop()
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
                kill_group(self.pid)
        return self.returncode
