"""Worker processes: each loads one artifact in its runtime and serves run/bench requests.

Started by session.RuntimeSession; a crash or hang here never takes edgepack down. A worker is
either a fresh interpreter or, by default on Linux, forked from a fork server:

    python -m edgepack.runtimes.worker READ_FD WRITE_FD              one worker (serve)
    python -m edgepack.runtimes.worker --server RUNTIME CONTROL_FD   a fork server (fork_server)

A fork server imports one runtime once (ExecuTorch's import alone takes 10-16 s, most of a
worker's start) and then forks a fresh worker per artifact. It never loads or runs an artifact
itself: every native runtime call still happens in a child with its own process group, which
the session can time out and kill, and whose exit status (a signal, say) the server reports.
"""

from __future__ import annotations

import importlib
import os
import resource
import signal
import socket
import sys
import time
import traceback

import numpy as np

from .protocol import decode_arrays, encode_arrays, read_message, recv_control, send_control, write_message

# What a fork server imports before it forks, per shipped runner, beyond the runner module: the
# modules whose import is the slow part of a worker's start. Only modules whose import starts no
# thread belong here (measured: torch 2.13 and executorch 1.5.1, ai-edge-litert 2.3): fork copies
# only the calling thread, and a lock another thread held would stay locked in the child.
# Importing onnxruntime (1.32) starts a thread, so its workers import it themselves (~0.3 s).
# numpy's OpenBLAS threads are stopped around fork by OpenBLAS itself (pthread_atfork).
PRELOAD = {
    "executorch": ("torch", "executorch.runtime", "executorch.extension.pybindings.portable_lib",
                   "executorch.version"),
    "litert": ("ai_edge_litert.interpreter",),
    "litert_gpu": ("ai_edge_litert.compiled_model",),  # the GPU accelerator and Vulkan load in the worker
    "onnxruntime": (),
}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def runner_module(runtime: str) -> str:
    """The module defining load() for ``runtime``: a shipped runner (``onnxruntime`` ->
    edgepack.runtimes.onnxruntime), or a dotted module path taken as is (tests plug in fake
    runtimes that crash or hang this way)."""
    return runtime if "." in runtime else f"edgepack.runtimes.{runtime}"


def serve(read_fd: int, write_fd: int) -> None:
    runner = None
    while True:
        try:
            header, payload = read_message(read_fd)
        except EOFError:
            return
        cmd = header.get("cmd")
        try:
            if cmd == "load":
                if "env" in header:  # forked: take the session's environment, as a fresh worker would have it
                    os.environ.clear()
                    os.environ.update(header["env"])
                module = importlib.import_module(runner_module(header["runtime"]))
                start = time.perf_counter()
                runner = module.load(header["path"], int(header["threads"]), **header.get("options", {}))
                load_ms = (time.perf_counter() - start) * 1000
                write_message(write_fd, {
                    "ok": True, "load_ms": load_ms,
                    "inputs": [t.to_dict() for t in runner.inputs],
                    "outputs": [t.to_dict() for t in runner.outputs],
                    "info": runner.info(),
                })
            elif cmd == "run":
                outputs = runner.run(decode_arrays(payload))
                write_message(write_fd, {"ok": True}, encode_arrays([np.asarray(o) for o in outputs]))
            elif cmd == "bench":
                feeds = decode_arrays(payload)
                for _ in range(int(header["warmup"])):
                    runner.run(feeds)
                times = []
                for _ in range(int(header["runs"])):
                    start = time.perf_counter()
                    runner.run(feeds)
                    times.append((time.perf_counter() - start) * 1000)
                write_message(write_fd, {"ok": True, "times_ms": times, "peak_rss_mb": _peak_rss_mb()})
            elif cmd == "exit":
                write_message(write_fd, {"ok": True})
                return
            else:
                write_message(write_fd, {"ok": False, "error": f"unknown command {cmd!r}", "type": "ProtocolError"})
        except Exception as exc:  # reported to the parent, which raises RuntimeCheckError
            # An EdgepackError from the runner keeps its own hint (the session shows it instead of a generic one).
            hint = getattr(exc, "hint", None)
            message = exc.message if hint and isinstance(getattr(exc, "message", None), str) else str(exc)
            write_message(write_fd, {
                "ok": False, "type": type(exc).__name__, "error": message[:2000], "hint": hint,
                "traceback": traceback.format_exc()[-4000:],
            })


# --- fork server ---------------------------------------------------------------------------------

def preload(runtime: str) -> dict[str, str]:
    """Import the runner module and its runtime; returns {module: error} for those that failed.
    A failure is not fatal here: each worker's load() imports them again and reports the error
    to its session exactly as a freshly started worker would."""
    failed = {}
    for name in (runner_module(runtime), *PRELOAD.get(runtime, ())):
        try:
            importlib.import_module(name)
        except Exception as exc:  # reported again by load() in the worker; see the docstring
            failed[name] = f"{type(exc).__name__}: {exc}"[:500]
    return failed


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def _fork_worker(control: socket.socket, read_fd: int, write_fd: int, log_fd: int) -> int:
    """Fork one worker serving on (read_fd, write_fd) with stdout/stderr on log_fd; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()  # its own process group, as start_new_session gives a spawned worker: the session kills the group
        control.close()
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        serve(read_fd, write_fd)
        code = 0
    except BaseException:  # noqa: B036 - the worker ends here whatever happened; the traceback goes to its log
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # never return into the server's loop, never run its atexit handlers


def _reap(pid: int, timeout_s: float) -> int | None:
    """Wait up to timeout_s for worker ``pid``; its exit code (-N for signal N), or None if it still runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        time.sleep(min(0.005, left))


def fork_server(runtime: str, control_fd: int) -> None:
    """Serve fork/wait requests on the control socket until the session's process closes it.

    fork (with three descriptors: read, write, log): start a worker, answer its pid.
    wait {pid, timeout}: answer its exit code once it has ended, or null after timeout seconds.
    Workers are reaped only on request, so a pid the session holds is never reused meanwhile.
    """
    control = socket.socket(fileno=control_fd)
    failed = preload(runtime)
    send_control(control, {"ok": True, "pid": os.getpid(), "failed_imports": failed, "threads": _thread_count()})
    children: set[int] = set()
    while True:
        try:
            request, fds = recv_control(control, max_fds=3)
        except (EOFError, ConnectionError):
            break
        try:
            if request.get("cmd") == "fork" and len(fds) == 3:
                pid = _fork_worker(control, *fds)
                children.add(pid)
                reply = {"ok": True, "pid": pid}
            elif request.get("cmd") == "wait" and int(request.get("pid", 0)) in children:
                pid = int(request["pid"])
                code = _reap(pid, float(request.get("timeout", 0)))
                if code is not None:
                    children.discard(pid)
                reply = {"ok": True, "returncode": code}
            else:
                reply = {"ok": False, "error": f"bad request {request!r} with {len(fds)} descriptor(s)"}
        except OSError as exc:  # fork failed (out of memory, process limit): the session reports it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            for fd in fds:
                os.close(fd)
        try:
            send_control(control, reply)
        except OSError:  # the session's process has gone
            break
    # The session's process has gone or closed us: no worker of ours may outlive it.
    for pid in children:
        for kill in (os.killpg, os.kill):  # a worker not yet in its own group is killed by pid
            try:
                kill(pid, signal.SIGKILL)
                break
            except ProcessLookupError:
                continue
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


if __name__ == "__main__":
    if sys.argv[1] == "--server":
        fork_server(sys.argv[2], int(sys.argv[3]))
        # Its workers are reaped and its socket is closed: skip the interpreter's teardown of the
        # runtime it imported (about a second for ExecuTorch), which the build's exit waits for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    else:
        serve(int(sys.argv[1]), int(sys.argv[2]))
