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


def latency_key(judge, files: list[Path], runtime: str, feeds: list[np.ndarray], **more: Any) -> dict[str, Any]:
    return latency_parts(files, runtime, judge.threads, judge.profile.latency, feeds, **more)


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


def run_reference(cache, files: list[Path], samples: list[list[np.ndarray]], threads: int, timeout_s: float,
                  settings) -> tuple[list[list[np.ndarray]], str, dict[str, Any], dict[str, Any] | None]:
    """The float reference ONNX in onnxruntime on the parity inputs: (outputs per sample,
    onnxruntime's version, latency figures, the latency's cache note), replayed and reused as
    run_artifact's are."""
    fresh: dict[str, Any] = {}

    def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        with RuntimeSession("onnxruntime", files[0], threads, timeout_s) as ref:
            outputs = [ref.run(x) for x in samples]
            fresh["bench"] = _bench("onnxruntime", files[0], threads, timeout_s, settings, samples[0], ref)
            return {"version": ref.info.get("version", ""), "count": len(outputs[0])}, _pack(outputs)

    record, arrays, _ = replayed(cache, "reference-run", {
        "files": digest_files(files), "toolchain": toolchain_versions(), "threads": threads,
        "inputs": digest_arrays(samples)}, run)
    bench, note = measured(cache, "latency", latency_parts(files, "onnxruntime", threads, settings, samples[0]),
                           lambda: fresh.get("bench") or _bench("onnxruntime", files[0], threads, timeout_s,
                                                                settings, samples[0]))
    return _unpack(arrays, len(samples), record["count"]), record["version"], bench, note


def run_artifact(judge, runtime: str, files: list[Path]) -> RuntimeRun:
    """``files[0]`` in ``runtime`` on the judge's parity inputs, with its evaluate() and latency
    (judge: an ArtifactJudge). A crash or hang raises RuntimeCheckError (nothing is stored)."""
    settings, samples = judge.profile.latency, judge.reference.inputs
    fresh: dict[str, Any] = {}

    def run() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        with RuntimeSession(runtime, files[0], judge.threads, judge.timeout_s) as session:
            native_inputs = [to_native(x, session.inputs) for x in samples]
            native_outputs = [session.run(x) for x in native_inputs]
            fresh["bench"] = _bench(runtime, files[0], judge.threads, judge.timeout_s, settings, native_inputs[0],
                                    session)
            accuracy = metrics(judge.evaluate(session_fn(session))) if judge.evaluate is not None else None
            record = {"inputs": [t.to_dict() for t in session.inputs], "info": session.info, "accuracy": accuracy,
                      "outputs": [t.to_dict() for t in session.outputs]}
        return record, _pack(native_outputs)

    # evaluate() is the spec's code: replayed only when the spec file it came from is in the key
    cache = judge.cache if judge.evaluate is None or judge.evaluate_key else None
    record, arrays, note = replayed(cache, "runtime-run", {
        "files": digest_files(files), "runtime": runtime, "toolchain": toolchain_versions(), "threads": judge.threads,
        "inputs": digest_arrays(samples), "evaluate": judge.evaluate_key if judge.evaluate is not None else None}, run)
    inputs, outputs = [TensorIO(**t) for t in record["inputs"]], [TensorIO(**t) for t in record["outputs"]]
    native_inputs = [to_native(x, inputs) for x in samples]
    native_outputs = _unpack(arrays, len(samples), len(outputs))
    # outputs replayed but latency not in the cache (evicted): a session for the latency alone
    bench, latency_cache = measured(judge.cache, "latency", latency_key(judge, files, runtime, native_inputs[0]),
                                    lambda: fresh.get("bench") or _bench(runtime, files[0], judge.threads,
                                                                         judge.timeout_s, settings, native_inputs[0]))
    return RuntimeRun(inputs=inputs, outputs=outputs, native_inputs=native_inputs, native_outputs=native_outputs,
                      info=record["info"], accuracy=record["accuracy"], bench=bench, cache=note,
                      latency_cache=latency_cache)
