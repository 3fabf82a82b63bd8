"""LiteRT GPU runner: a .tflite through LiteRT's GPU accelerator, the code path a phone's GPU runs.

API used (ai-edge-litert 2.3): ``CompiledModel.from_file(path, options=Options(
hardware_accelerators=GPU | CPU, gpu_options=GpuOptions(enforce_f32=...)))``,
``is_fully_accelerated()``, ``create_input_buffer_by_name`` / ``run_by_name`` / ``read``. The
wheel's only GPU library is libLiteRtWebGpuAccelerator.so (WebGPU through Dawn, on Vulkan),
reachable through CompiledModel only (not Interpreter/load_delegate); it ships no OpenCL or
OpenGL ES accelerator. On a build host without a GPU the Vulkan driver is lavapipe
(emulators/lavapipe.py), selected by the environment the session starts this worker with.

Precision: ``fp16`` (the default of LiteRT's GPU accelerator and of phones: fp16 arithmetic,
activations too) or ``fp32`` (``enforce_f32``). Measured on the digits CNN's fp16 .tflite: GPU
fp16 vs the CPU interpreter max |diff| 2.59e-2, GPU fp32 1.14e-5: the difference is fp16.

Which ops the GPU does not take: GPU | CPU lets LiteRT run them on the CPU (as a phone app that
allows it would); ``is_fully_accelerated()`` says whether any did, and the accelerator names
them only in its native log ("Following operations are not supported by GPU delegate: ..."),
so the log printed while the model compiles is captured and parsed (``accelerator_log``).
No Vulkan device: Dawn says only "No adapters found" and GPU | CPU does not fall back to the
CPU, so the runner asks the loader first (emulators/vulkan.py) and says what is missing.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..emulators.vulkan import probe
from ..errors import RuntimeCheckError, RuntimeUnavailable
from .base import TensorIO
from .litert import check_header, package_version, io_position

ACCELERATOR = "LiteRT GPU accelerator: WebGPU (Dawn) on Vulkan"
_SIGNATURE = "serving_default"
_UNSUPPORTED = re.compile(r"Following operations are not supported by GPU delegate:\n(.*?)\n(\d+) operations? will run "
                          r"on the GPU, and the remaining (\d+) operations? will run on the CPU", re.S)
# The first line of these the log holds says why a model did not compile (Dawn's own messages).
_PROBLEMS = (r"Vulkan \S+ required\.", r"Couldn't load Vulkan: [^\n]*", r"vkCreateInstance: Found no drivers!",
             r"Failed to initialize WebGPU[^\n]*", r"Some ops are not accelerated[^\n]*")


def accelerator_log(text: str) -> dict:
    """What LiteRT's GPU accelerator logged while compiling a model: the adapter it selected, the
    ops it left to the CPU (op name -> reasons) and how many ops ran where."""
    found: dict = {"adapter": None, "fallback_ops": {}, "ops_on_gpu": None, "ops_on_cpu": 0, "problem": None}
    adapter = re.search(r"Selected adapter: ([^\n]*)", text)
    if adapter:
        found["adapter"] = adapter.group(1).strip()
    for block in _UNSUPPORTED.finditer(text):
        for line in block.group(1).splitlines():
            op, _, reason = line.strip().partition(":")
            if op:
                reasons = found["fallback_ops"].setdefault(op.strip(), [])
                if reason.strip() and reason.strip() not in reasons:
                    reasons.append(reason.strip())
        found["ops_on_gpu"] = (found["ops_on_gpu"] or 0) + int(block.group(2))
        found["ops_on_cpu"] += int(block.group(3))
    for pattern in _PROBLEMS:
        match = re.search(pattern, text)
        if match:
            found["problem"] = match.group(0).strip()
            break
    return found


def _capture_stderr(call):
    """(result, exception, text): call() with file descriptor 2 (where native code logs) sent to a
    file; the text is written back to the real stderr afterwards, so the worker's log keeps it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        result = error = None
        try:
            result = call()
        except (RuntimeError, ValueError) as exc:  # LiteRT raises RuntimeError with a terse status
            error = exc
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode(errors="replace")
    sys.stderr.write(text)
    return result, error, text


class LiteRTGpuRunner:
    """One .tflite compiled for LiteRT's GPU accelerator; ``run`` takes and returns float tensors."""

    def __init__(self, path: str, threads: int, precision: str = "fp16"):
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be fp16 or fp32, got {precision!r}")
        try:
            from ai_edge_litert.compiled_model import CompiledModel, CpuOptions, GpuOptions, HardwareAccelerator, \
                Options
        except ImportError as exc:
            raise RuntimeUnavailable("ai-edge-litert (with its CompiledModel API) is not installed",
                                     "pip install ai-edge-litert==2.3.*") from exc
        self.path, self.threads, self.precision = str(path), threads, precision
        check_header(Path(self.path))
        self.vulkan = probe()
        if not self.vulkan["ok"]:
            raise RuntimeCheckError(f"LiteRT's GPU accelerator has no Vulkan device here: {self.vulkan['error']}",
                                    "`make gpu-setup` (or `edgepack validate BUNDLE --gpu`) sets up lavapipe, a Vulkan "
                                    "driver that runs on the CPU")
        options = Options(hardware_accelerators=HardwareAccelerator.GPU | HardwareAccelerator.CPU,
                          cpu_options=CpuOptions(num_threads=threads),
                          gpu_options=GpuOptions(enforce_f32=precision == "fp32"))
        model, error, text = _capture_stderr(lambda: CompiledModel.from_file(self.path, options=options))
        self.log = accelerator_log(text)
        if error is not None:
            why = self.log["problem"] or str(error).strip().splitlines()[-1]
            raise RuntimeCheckError(f"LiteRT's GPU accelerator cannot compile {Path(self.path).name}: {why}",
                                    "the .tflite is corrupt or the Vulkan driver is unusable; run with --debug")
        self._model = model
        self.fully_accelerated = bool(model.is_fully_accelerated())
        signatures = model.get_signature_list()
        self._signature = _SIGNATURE if _SIGNATURE in signatures else sorted(signatures)[0]
        ins = sorted(model.get_input_tensor_details(self._signature).items(), key=lambda kv: io_position(kv[0], "args"))
        outs = sorted(model.get_output_tensor_details(self._signature).items(),
                      key=lambda kv: io_position(kv[0], "output"))
        self.inputs = [TensorIO(name=n, shape=[int(d) for d in t["shape"]], dtype=np.dtype(t["dtype"]).name) for n, t in ins]
        self.outputs = [TensorIO(name=n, shape=[int(d) for d in t["shape"]], dtype=np.dtype(t["dtype"]).name)
                        for n, t in outs]
        self._in = {t.name: model.create_input_buffer_by_name(self._signature, t.name) for t in self.inputs}
        self._out = {t.name: model.create_output_buffer_by_name(self._signature, t.name) for t in self.outputs}

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        if len(feeds) != len(self.inputs):
            raise ValueError(f"expected {len(self.inputs)} inputs, got {len(feeds)}")
        for spec, value in zip(self.inputs, feeds):
            value = np.asarray(value)
            if value.dtype.name != spec.dtype or list(value.shape) != spec.shape:
                raise ValueError(f"input {spec.name!r} wants {spec.dtype}{spec.shape}, "
                                 f"got {value.dtype.name}{list(value.shape)}")
            self._in[spec.name].write(np.ascontiguousarray(value))
        self._model.run_by_name(self._signature, self._in, self._out)
        return [self._out[t.name].read(int(np.prod(t.shape)), np.dtype(t.dtype)).reshape(t.shape) for t in self.outputs]

    def info(self) -> dict:
        device = next((d for d in self.vulkan["devices"] if not d["missing_for_webgpu"]), {})
        return {"runtime": "litert_gpu", "package": "ai-edge-litert", "version": package_version("ai-edge-litert"),
                "accelerator": ACCELERATOR, "precision": self.precision, "threads": self.threads,
                "fully_accelerated": self.fully_accelerated, "vulkan_device": device,
                **{k: v for k, v in self.log.items() if k != "problem"}}


def load(path: str, threads: int, precision: str = "fp16") -> LiteRTGpuRunner:
    return LiteRTGpuRunner(path, threads, precision)
