"""LiteRT runner: run a .tflite with the LiteRT interpreter (XNNPACK on CPU, as on a phone).

API used (ai-edge-litert 2.3): ``ai_edge_litert.interpreter.Interpreter(model_path=...,
num_threads=...)``, ``allocate_tensors()``, ``get_signature_runner(key).get_input_details()``
for the name -> tensor mapping, then ``set_tensor`` / ``invoke`` / ``get_tensor``.
Falls back to ``tflite_runtime.interpreter`` (same API) on devices without ai-edge-litert.

IO order. The TFLite signature sorts its entries by name, so ``args_10`` comes before
``args_2``, and subgraph tensor indices need not follow the signature. litert-torch names the
inputs ``args_<i>`` (positional argument i of forward) and outputs ``output_<i>``; we order by
that number, so ``inputs``/``outputs`` follow the PyTorch signature. Other names (kwargs,
dict outputs) follow, in signature order.

This module imports only numpy and the interpreter (no torch): the on-device kit reuses it
together with runtimes/base.py and errors.py, which are dependency-free.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from ..errors import RuntimeCheckError, RuntimeUnavailable
from .base import TensorIO

_SIGNATURE = "serving_default"
_TFLITE_IDENTIFIER = b"TFL3"  # flatbuffer file identifier, bytes 4..8


def _interpreter_module():
    try:
        from ai_edge_litert import interpreter as module
    except ImportError:
        try:  # on a device the smaller tflite-runtime wheel may be all there is
            from tflite_runtime import interpreter as module
        except ImportError as exc:
            raise RuntimeUnavailable("neither ai-edge-litert nor tflite-runtime is installed",
                                     "pip install ai-edge-litert==2.3.*") from exc
        return module, "tflite-runtime"
    return module, "ai-edge-litert"


def package_version(package: str) -> str:
    if package == "ai-edge-litert":
        import ai_edge_litert
        return getattr(ai_edge_litert, "__version__", "unknown")
    import tflite_runtime
    return getattr(tflite_runtime, "__version__", "unknown")


def io_position(name: str, prefix: str) -> tuple[int, int]:
    match = re.fullmatch(rf"{prefix}_(\d+)", name)
    return (0, int(match.group(1))) if match else (1, 0)


def _tensor_io(name: str, detail: dict) -> TensorIO:
    dtype = np.dtype(detail["dtype"]).name
    scale = zero_point = None
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []))
    if dtype in ("int8", "uint8", "int16") and scales.size:
        if scales.size != 1:
            raise RuntimeCheckError(f"LiteRT: IO tensor {name!r} is quantized per channel",
                                    "edgepack feeds per-tensor quantized IO only; re-export with io: float")
        scale = float(scales[0])
        zero_point = int(np.asarray(params["zero_points"])[0])
    return TensorIO(name=name, shape=[int(d) for d in detail["shape"]], dtype=dtype,
                    scale=scale, zero_point=zero_point)


class LiteRTRunner:
    """One .tflite loaded in an Interpreter; ``run`` takes and returns native tensors."""

    def __init__(self, path: str, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        module, self._package = _interpreter_module()
        self.path = str(path)
        check_header(Path(self.path))
        try:
            self._interpreter = module.Interpreter(model_path=self.path, num_threads=threads)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RuntimeCheckError(f"LiteRT cannot load {self.path}: {exc}",
                                    "the .tflite is corrupt, truncated, or uses ops this runtime lacks; "
                                    "re-export it") from exc
        self.threads = threads
        signatures = self._interpreter.get_signature_list()
        if signatures:
            key = _SIGNATURE if _SIGNATURE in signatures else sorted(signatures)[0]
            runner = self._interpreter.get_signature_runner(key)
            inputs = sorted(runner.get_input_details().items(), key=lambda kv: io_position(kv[0], "args"))
            outputs = sorted(runner.get_output_details().items(), key=lambda kv: io_position(kv[0], "output"))
        else:  # no signature (not written by litert-torch): subgraph order is all there is
            inputs = [(d["name"], d) for d in self._interpreter.get_input_details()]
            outputs = [(d["name"], d) for d in self._interpreter.get_output_details()]
        self.inputs = [_tensor_io(name, d) for name, d in inputs]
        self.outputs = [_tensor_io(name, d) for name, d in outputs]
        self._input_index = [d["index"] for _, d in inputs]
        self._output_index = [d["index"] for _, d in outputs]
        # set_tensor/get_tensor address the primary subgraph; make sure that is the signature's.
        primary_in = {d["index"] for d in self._interpreter.get_input_details()}
        primary_out = {d["index"] for d in self._interpreter.get_output_details()}
        if set(self._input_index) != primary_in or set(self._output_index) != primary_out:
            raise RuntimeCheckError(f"LiteRT: signature of {self.path} is not on the primary subgraph",
                                    "export a single-signature model (litert_torch.convert does)")

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        if len(feeds) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(feeds)}")
        for spec, index, value in zip(self.inputs, self._input_index, feeds):
            value = np.asarray(value)
            if value.dtype.name != spec.dtype or list(value.shape) != spec.shape:
                raise ValueError(f"input {spec.name!r} wants {spec.dtype}{spec.shape}, "
                                 f"got {value.dtype.name}{list(value.shape)} (convert with to_native)")
            self._interpreter.set_tensor(index, np.ascontiguousarray(value))
        self._interpreter.invoke()
        return [self._interpreter.get_tensor(index) for index in self._output_index]

    def info(self) -> dict:
        return {"runtime": "litert", "package": self._package, "version": package_version(self._package),
                "threads": self.threads, "signature_io": {"inputs": [t.name for t in self.inputs],
                                                          "outputs": [t.name for t in self.outputs]},
                "delegation": self.delegation()}

    def delegation(self) -> dict:
        """What the interpreter's default delegate (XNNPACK) took, read from the loaded graph:
        delegate nodes, original ops they replaced, and ops left to TFLite's own kernels.

        The node list keeps every original op plus one DELEGATE node per partition; the ops
        that still run are those needed to compute the outputs when each tensor a DELEGATE
        node produces is taken from it, so walk back from the outputs."""
        try:
            ops = self._interpreter._get_ops_details()  # the public API has no node list
        except Exception as exc:  # private API: a missing attribute must not fail the build
            return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}
        delegates = [op for op in ops if op["op_name"] == "DELEGATE"]
        producer: dict[int, dict] = {}
        for op in ops:
            for tensor in op["outputs"]:
                if op["op_name"] == "DELEGATE" or int(tensor) not in producer:
                    producer[int(tensor)] = op
        executed: set[int] = set()
        stack = [int(t) for t in self._interpreter._interpreter.OutputIndices()]
        while stack:
            op = producer.get(stack.pop())
            if op is None or op["index"] in executed:
                continue
            executed.add(op["index"])
            stack.extend(int(t) for t in op["inputs"] if int(t) >= 0)
        undelegated: dict[str, int] = {}
        for op in ops:
            if op["index"] in executed and op["op_name"] != "DELEGATE":
                undelegated[op["op_name"]] = undelegated.get(op["op_name"], 0) + 1
        original = len(ops) - len(delegates)
        return {"available": True, "delegate": "XNNPACK (LiteRT default)" if delegates else None,
                "delegates": sum(op["index"] in executed for op in delegates),
                "delegated_ops": original - sum(undelegated.values()),
                "undelegated_ops": dict(sorted(undelegated.items()))}


def check_header(path: Path) -> None:
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise RuntimeCheckError(f"LiteRT cannot read {path}: {exc}", "check the bundle is complete") from exc
    if len(head) < 8 or head[4:8] != _TFLITE_IDENTIFIER:
        raise RuntimeCheckError(f"{path} is not a TFLite flatbuffer (identifier {head[4:8]!r}, want b'TFL3')",
                                "the file is corrupt or truncated; re-export it")


def load(path: str, threads: int) -> LiteRTRunner:
    return LiteRTRunner(path, threads)
