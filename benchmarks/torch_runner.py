"""Torch eager fp32 as a RuntimeSession runtime, so the baseline every ratio divides by is
measured by the same harness as the artifacts (child process, same warmup/runs/threads).

RuntimeSession("benchmarks.torch_runner", "models/x.py", threads) starts edgepack's worker,
which imports this module and calls load(path, threads): ``path`` is the model's spec file.
The spec's float model runs under torch.inference_mode() with torch.set_num_threads(threads);
feeds and outputs cross as numpy (torch.from_numpy / Tensor.numpy, no copies), as the
ExecuTorch runner does.
"""

from __future__ import annotations

import numpy as np

from edgepack.runtimes.base import TensorIO


class TorchEagerRunner:
    def __init__(self, spec_path: str, threads: int):
        import torch

        from edgepack.spec import load_spec

        torch.set_num_threads(threads)
        self.threads = threads
        self._torch = torch
        spec = load_spec(spec_path)
        self._model = spec.model.eval()
        example = tuple(spec.example_inputs)
        self.inputs = [TensorIO(name=name, shape=list(t.shape), dtype=str(t.numpy().dtype))
                       for name, t in zip(spec.resolved_input_names(), example)]
        with torch.inference_mode():
            first = self._model(*example)
        outputs = first if isinstance(first, (tuple, list)) else (first,)
        self.outputs = [TensorIO(name=name, shape=list(o.shape), dtype=str(o.numpy().dtype))
                        for name, o in zip(spec.resolved_output_names(len(outputs)), outputs)]

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            result = self._model(*[torch.from_numpy(np.ascontiguousarray(f)) for f in feeds])
        outputs = result if isinstance(result, (tuple, list)) else (result,)
        return [o.numpy() for o in outputs]

    def info(self) -> dict:
        torch = self._torch
        return {"runtime": "torch-eager", "version": torch.__version__, "threads": torch.get_num_threads(),
                "mode": "inference_mode"}


def load(path: str, threads: int) -> TorchEagerRunner:
    return TorchEagerRunner(path, threads)
