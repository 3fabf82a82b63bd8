"""An artifact's run in its runtime on the parity set: its native IO, outputs, the spec's
evaluate() through it, and its host latency, through the build cache.

    ran = run_artifact(judge, "litert", files)     # RuntimeRun; files[0] is what the runtime loads
    outputs, version, bench, notes = run_reference(cache, ref_files, inputs, threads, timeout_s, latency)

The outputs of fixed bytes in a fixed runtime on fixed inputs are deterministic on one host (the
build checks exactly that across CPU models for int8), so with a build cache they are replayed
for the same bytes, runtime and toolchain, thread count, inputs, spec file and host, and the
latency is reused as cache.measured says: a fully cached build starts no runtime (ExecuTorch's
import alone is 10-16 s). ``ran.cache`` and ``ran.latency_cache`` say what was reused, when and
where; --no-cache runs and measures everything again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..cache import digest_arrays, digest_files, measured, model_fingerprint, replayed
from ..provenance import toolchain_versions
from ..runtimes.base import TensorIO, from_native, to_native
from ..runtimes.session import RuntimeSession
from ..spec import as_numpy


def metrics(values: dict) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.items()}


def session_fn(session: RuntimeSession) -> Callable[[tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]:
    """An artifact running in its runtime, as the spec's evaluate() calls a model."""
    def fn(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        feeds = to_native(as_numpy(inputs), session.inputs)
        outputs = from_native(session.run(feeds), session.outputs)
        return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)

    return fn


@dataclass
class RuntimeRun:
    inputs: list[TensorIO]  # the artifact's IO as its runtime reports it (scale/zero point if quantized)
    outputs: list[TensorIO]
    native_inputs: list[list[np.ndarray]]  # per parity sample, what the artifact is fed
    native_outputs: list[list[np.ndarray]]  # per parity sample, what it returned
    info: dict[str, Any]  # the runtime's version, delegation
    accuracy: dict[str, float] | None  # the spec's evaluate() through the artifact
    bench: dict[str, Any]  # times_ms, peak_rss_mb, load_ms
    cache: dict[str, Any] | None = None  # outputs replayed from the build cache: hit, key, run_at, host
    latency_cache: dict[str, Any] | None = None  # latency reused: hit, key, measured_at, host

    @property
    def model_outputs(self) -> list[list[np.ndarray]]:
        return [from_native(o, self.outputs) for o in self.native_outputs]


def latency_parts(files: list[Path], runtime: str, threads: int, settings, feeds: list[np.ndarray],
                  **more: Any) -> dict[str, Any]:
    """What a host latency figure depends on besides the host (cache.measured adds it): the
    files' bytes, the runtime and toolchain, threads, the profile's latency settings, the feeds."""
    return {"files": digest_files(files), "runtime": runtime, "toolchain": toolchain_versions(), "threads": threads,
            "warmup": settings.warmup, "runs": settings.runs, "feeds": digest_arrays([feeds]), **more}


def _bench(runtime: str, path: Path, threads: int, timeout_s: float, settings, feeds: list[np.ndarray],
           session: RuntimeSession | None = None) -> dict[str, Any]:
    """times_ms, peak_rss_mb and load_ms of ``path`` (in ``session``, else in a session of its own)."""
    if session is None:
        with RuntimeSession(runtime, path, threads, timeout_s) as own:
            return _bench(runtime, path, threads, timeout_s, settings, feeds, own)
    return {**session.bench(feeds, settings.warmup, settings.runs), "load_ms": session.load_ms}


def _pack(outputs: list[list[np.ndarray]]) -> dict[str, np.ndarray]:
    return {f"s{i}_o{k}": value for i, sample in enumerate(outputs) for k, value in enumerate(sample)}


def _unpack(arrays: dict[str, np.ndarray], samples: int, count: int) -> list[list[np.ndarray]]:
    return [[arrays[f"s{i}_o{k}"] for k in range(count)] for i in range(samples)]


def torch_outputs(cache, model: torch.nn.Module, samples: list[tuple], inputs: list[list[np.ndarray]]
                  ) -> list[list[np.ndarray]]:
    """The torch model's outputs on the parity samples (``inputs``: the same as numpy), replayed for
    the same model fingerprint, inputs, toolchain and host: 32 forward passes of the digits CNN took
    3.5 s of a cached build on the shared build host."""
    def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        outputs = []
        with torch.no_grad():
            for sample in samples:
                out = model(*sample)
                outputs.append([o.detach().cpu().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))])
        return {"count": len(outputs[0])}, _pack(outputs)

    parts = {"model": model_fingerprint(model), "inputs": digest_arrays(inputs), "toolchain": toolchain_versions()}
    record, arrays, _ = replayed(cache, "torch-run", parts, run)
    return _unpack(arrays, len(samples), record["count"])


def _replayed_and_timed(cache, latency_cache, kind: str, parts: dict[str, Any], runtime: str, files: list[Path],
                        threads: int, timeout_s: float, settings, in_session: Callable, feeds_of: Callable):
    """What run_reference and run_artifact share: ``in_session(session, timed)`` -> (record, arrays)
    in a session of ``files[0]``, replayed from ``cache`` for the same ``parts`` (kind ``kind``);
    and the latency on ``feeds_of(record)``, reused from ``latency_cache`` for the same files,
    runtime, threads, settings and feeds. ``timed(feeds)`` measures it in that session while it
    is open; when the outputs were replayed and the latency was not (evicted), a session of its
    own measures it. Returns (record, arrays, outputs' cache note, latency, latency's note)."""
    fresh: dict[str, Any] = {}

    def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        with RuntimeSession(runtime, files[0], threads, timeout_s) as session:
            def timed(feeds: list[np.ndarray]) -> None:
                fresh["bench"] = _bench(runtime, files[0], threads, timeout_s, settings, feeds, session)

            return in_session(session, timed)

    record, arrays, note = replayed(cache, kind, parts, run)
    feeds = feeds_of(record)
    bench, latency_note = measured(latency_cache, "latency", latency_parts(files, runtime, threads, settings, feeds),
                                   lambda: fresh.get("bench") or _bench(runtime, files[0], threads, timeout_s,
                                                                        settings, feeds))
    return record, arrays, note, bench, latency_note


def run_reference(cache, files: list[Path], samples: list[list[np.ndarray]], threads: int, timeout_s: float,
                  settings) -> tuple[list[list[np.ndarray]], str, dict[str, Any], dict[str, Any] | None]:
    """The float reference ONNX in onnxruntime on the parity inputs: (outputs per sample,
    onnxruntime's version, latency figures, the latency's cache note), replayed and reused as
    run_artifact's are."""
    def in_session(ref: RuntimeSession, timed: Callable) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        outputs = [ref.run(x) for x in samples]
        timed(samples[0])
        return {"version": ref.info.get("version", ""), "count": len(outputs[0])}, _pack(outputs)

    parts = {"files": digest_files(files), "toolchain": toolchain_versions(), "threads": threads,
             "inputs": digest_arrays(samples)}
    record, arrays, _, bench, note = _replayed_and_timed(cache, cache, "reference-run", parts, "onnxruntime", files,
                                                         threads, timeout_s, settings, in_session, lambda _: samples[0])
    return _unpack(arrays, len(samples), record["count"]), record["version"], bench, note


def run_artifact(judge, runtime: str, files: list[Path]) -> RuntimeRun:
    """``files[0]`` in ``runtime`` on the judge's parity inputs, with its evaluate() and latency
    (judge: an ArtifactJudge). A crash or hang raises RuntimeCheckError (nothing is stored)."""
    samples = judge.reference.inputs

    def in_session(session: RuntimeSession, timed: Callable) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        native_inputs = [to_native(x, session.inputs) for x in samples]
        native_outputs = [session.run(x) for x in native_inputs]
        timed(native_inputs[0])
        accuracy = metrics(judge.evaluate(session_fn(session))) if judge.evaluate is not None else None
        record = {"inputs": [t.to_dict() for t in session.inputs], "info": session.info, "accuracy": accuracy,
                  "outputs": [t.to_dict() for t in session.outputs]}
        return record, _pack(native_outputs)

    def io(record: dict[str, Any], key: str) -> list[TensorIO]:
        return [TensorIO(**t) for t in record[key]]

    # evaluate() is the spec's code: replayed only when the spec file it came from is in the key
    cache = judge.cache if judge.evaluate is None or judge.evaluate_key else None
    parts = {"files": digest_files(files), "runtime": runtime, "toolchain": toolchain_versions(),
             "threads": judge.threads, "inputs": digest_arrays(samples),
             "evaluate": judge.evaluate_key if judge.evaluate is not None else None}
    record, arrays, note, bench, latency_cache = _replayed_and_timed(
        cache, judge.cache, "runtime-run", parts, runtime, files, judge.threads, judge.timeout_s,
        judge.profile.latency, in_session, lambda record: to_native(samples[0], io(record, "inputs")))
    inputs, outputs = io(record, "inputs"), io(record, "outputs")
    native_inputs = [to_native(x, inputs) for x in samples]
    native_outputs = _unpack(arrays, len(samples), len(outputs))
    return RuntimeRun(inputs=inputs, outputs=outputs, native_inputs=native_inputs, native_outputs=native_outputs,
                      info=record["info"], accuracy=record["accuracy"], bench=bench, cache=note,
                      latency_cache=latency_cache)
