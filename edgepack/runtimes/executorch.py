"""ExecuTorch runner: load a .pte with the real ExecuTorch runtime (pip pybindings) and run it.

API used (executorch 1.5.1): ``executorch.runtime.Runtime.get().load_program(path)``,
``program.load_method("forward")``, ``method.metadata`` (MethodMeta) and
``method.execute([...torch.Tensor])``. The pybindings take and return torch tensors only
(numpy arrays are rejected), so run() converts with torch.from_numpy / Tensor.numpy().
This module imports only numpy at import time; executorch (whose pip wheel itself imports
torch to load libtorch) is imported inside load().

Threads: the pybindings expose ``_unsafe_reset_threadpool(n)`` and
``_threadpool_get_thread_count()`` (executorch.extension.pybindings.portable_lib). The
threadpool is process-global and is what the XNNPACK delegate runs on; load() resizes it
to ``threads``, so the most recent load() decides the count for every loaded program.
"Unsafe" means it must not be called while any method is executing; we only call it
from load(), never concurrently with run().
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import RuntimeCheckError, RuntimeUnavailable
from .base import TensorIO

_INSTALL_HINT = "pip install executorch==1.5.1"
# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h) -> numpy dtype names.
_SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16",
                 6: "float32", 7: "float64", 11: "bool", 15: "bfloat16"}
# runtime/core/error.h codes that show up as "error: 0x:NN" in pybinding messages.
_ERROR_CODES = {0x10: "NotSupported", 0x12: "InvalidArgument", 0x13: "InvalidType",
                0x14: "OperatorMissing", 0x20: "NotFound", 0x21: "MemoryAllocationFailed",
                0x22: "AccessFailed", 0x23: "InvalidProgram", 0x30: "DelegateInvalidCompatibility"}
_PTE_IDENTIFIER_PREFIX = b"ET"  # flatbuffer file identifier at bytes 4..8, e.g. b"ET12"


def _modules():
    try:
        from executorch.extension.pybindings import portable_lib
        from executorch.runtime import Runtime
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc})", _INSTALL_HINT) from exc
    register_quantized_kernels()
    return Runtime, portable_lib


def register_quantized_kernels() -> bool:
    """Register ExecuTorch's quantized kernels library (quantized_decomposed::embedding_byte,
    embedding_4bit, ...) with the runtime, as an app does by linking quantized_ops_lib. The
    pip runtime registers only the portable kernels until this module is imported. Returns
    whether the library is available."""
    try:
        import executorch.kernels.quantized  # noqa: F401  (registers the kernels on import)
    except (ImportError, OSError):
        return False
    return True


def _explain(exc: Exception) -> str:
    """Append the name of the ExecuTorch error code the pybindings print only as hex."""
    text = str(exc)
    for code, name in _ERROR_CODES.items():
        if f"0x:{code:x}" in text or f"0x{code:x}" in text:
            return f"{text} [{name}]"
    return text


def _tensor_io(info, name: str) -> TensorIO:
    dtype = _SCALAR_TYPES.get(int(info.dtype()), f"scalar_type_{int(info.dtype())}")
    return TensorIO(name=name, shape=[int(d) for d in info.sizes()], dtype=dtype)


class ExecuTorchRunner:
    """One loaded method ("forward") of a .pte program."""

    def __init__(self, path: str, threads: int):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        Runtime, portable_lib = _modules()
        self.path = str(path)
        _check_header(Path(self.path))
        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
        try:
            self._program = Runtime.get().load_program(self.path)
            self._method = self._program.load_method("forward")
        except KeyError as exc:
            raise RuntimeCheckError(f"{self.path} has no 'forward' method", "re-export the model") from exc
        except RuntimeError as exc:
            raise RuntimeCheckError(f"ExecuTorch cannot load {self.path}: {_explain(exc)}",
                                    "the .pte is corrupt, truncated, or needs an op/backend this "
                                    "runtime build lacks; re-export it with the same executorch version"
                                    ) from exc
        meta = self._method.metadata
        self.inputs = [_tensor_io(meta.input_tensor_meta(i), f"input_{i}") for i in range(meta.num_inputs())]
        self.outputs = [_tensor_io(meta.output_tensor_meta(i), f"output_{i}") for i in range(meta.num_outputs())]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        if len(feeds) != len(self.inputs):
            raise ValueError(f"{self.path} takes {len(self.inputs)} inputs, got {len(feeds)}")
        tensors = []
        for feed, spec in zip(feeds, self.inputs):
            feed = np.asarray(feed)
            if feed.dtype.name != spec.dtype or list(feed.shape) != spec.shape:
                # ExecuTorch would fail with a bare "error 0x12"; say what it expected instead.
                raise ValueError(f"{spec.name}: expected {spec.dtype}{spec.shape}, "
                                 f"got {feed.dtype.name}{list(feed.shape)} (static shapes, no casting)")
            tensors.append(torch.from_numpy(np.ascontiguousarray(feed)))
        try:
            outputs = self._method.execute(tensors)
        except RuntimeError as exc:
            raise RuntimeCheckError(f"ExecuTorch failed running {self.path}: {_explain(exc)}",
                                    "run the artifact with the executorch version that exported it"
                                    ) from exc
        # execute() returns clones (clone_outputs=True), so the arrays do not alias the arena.
        return [o.numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs]

    def info(self) -> dict:
        return info()


def _check_header(path: Path) -> None:
    """Reject files that are clearly not ExecuTorch programs with a readable message."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
    except OSError as exc:
        raise RuntimeCheckError(f"cannot read {path}: {exc}", "check the artifact path") from exc
    if len(head) < 8 or head[4:6] != _PTE_IDENTIFIER_PREFIX:
        raise RuntimeCheckError(f"{path} is not an ExecuTorch program (file identifier {head[4:8]!r}, "
                                f"expected b'ET..')", "re-export the .pte; the file is corrupt or of another format")


def load(path: str, threads: int = 1) -> ExecuTorchRunner:
    return ExecuTorchRunner(path, threads)


def info() -> dict:
    """Runtime version, compiled-in backends and current threadpool size."""
    Runtime, portable_lib = _modules()
    from executorch.version import __version__

    return {
        "runtime": "executorch",
        "version": __version__,
        "backends": sorted(Runtime.get().backend_registry.registered_backend_names),
        "threads": int(portable_lib._threadpool_get_thread_count()),
    }
