"""What every runner provides, and the numpy-only IO codec shared with the on-device kit.

A runner module (one per runtime) defines ``load(path: str, threads: int) -> Runner``.
A Runner runs an artifact on its *native* tensors: exactly what a device feeds it (for a
full-int8 .tflite, int8 tensors). ``to_native``/``from_native`` convert between the
model-level float tensors of the spec and the artifact's native IO using the quantization
parameters each TensorIO records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np


@dataclass
class TensorIO:
    name: str
    shape: list[int]
    dtype: str  # numpy dtype name: float32, int8, int64, ...
    scale: float | None = None  # set when the artifact takes/returns quantized tensors
    zero_point: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Runner(Protocol):
    inputs: list[TensorIO]
    outputs: list[TensorIO]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        """Run once on native input tensors (in input order); return native outputs in order."""
        ...


def to_native(values: list[np.ndarray], io: list[TensorIO]) -> list[np.ndarray]:
    """Model-level inputs -> what the artifact takes (quantize where the artifact is quantized)."""
    out = []
    for value, spec in zip(values, io):
        if spec.scale is not None:
            info = np.iinfo(np.dtype(spec.dtype))
            q = np.round(value.astype(np.float64) / spec.scale) + (spec.zero_point or 0)
            out.append(np.clip(q, info.min, info.max).astype(spec.dtype))
        else:
            out.append(np.ascontiguousarray(value.astype(spec.dtype, copy=False)))
    return out


def from_native(values: list[np.ndarray], io: list[TensorIO]) -> list[np.ndarray]:
    """Artifact outputs -> model-level float outputs (dequantize where quantized)."""
    out = []
    for value, spec in zip(values, io):
        if spec.scale is not None:
            out.append(((value.astype(np.float32) - (spec.zero_point or 0)) * spec.scale).astype(np.float32))
        else:
            out.append(value)
    return out
