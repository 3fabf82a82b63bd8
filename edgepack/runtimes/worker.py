"""Child process that loads one artifact in its runtime and serves run/bench requests.

Started by session.RuntimeSession; a crash or hang here never takes edgepack down.
Usage: python -m edgepack.runtimes.worker READ_FD WRITE_FD
"""

from __future__ import annotations

import importlib
import resource
import sys
import time
import traceback

import numpy as np

from .protocol import decode_arrays, encode_arrays, read_message, write_message


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
                module = importlib.import_module(runner_module(header["runtime"]))
                start = time.perf_counter()
                runner = module.load(header["path"], int(header["threads"]))
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
            write_message(write_fd, {
                "ok": False, "type": type(exc).__name__, "error": str(exc)[:2000],
                "traceback": traceback.format_exc()[-4000:],
            })


if __name__ == "__main__":
    serve(int(sys.argv[1]), int(sys.argv[2]))
