"""onnxruntime runner (CPU execution provider)."""

from __future__ import annotations

import numpy as np

from .base import TensorIO

_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OrtRunner:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self.inputs = [self._io(i) for i in self.session.get_inputs()]
        self.outputs = [self._io(o) for o in self.session.get_outputs()]
        self._input_names = [i.name for i in self.inputs]
        self.version = ort.__version__

    @staticmethod
    def _io(arg) -> TensorIO:
        shape = [d if isinstance(d, int) else -1 for d in arg.shape]
        return TensorIO(name=arg.name, shape=shape, dtype=_ORT_TYPES.get(arg.type, arg.type))

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.session.run(None, dict(zip(self._input_names, feeds))))

    def info(self) -> dict:
        return {"runtime": "onnxruntime", "version": self.version, "providers": self.session.get_providers()}


def load(path: str, threads: int) -> OrtRunner:
    return OrtRunner(path, threads)
