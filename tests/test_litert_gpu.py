"""LiteRT's GPU accelerator on lavapipe, in a worker process (RuntimeSession "litert_gpu"), on small
.tflite files made by edgepack's own exporter: fp16 arithmetic visible but close to the CPU
interpreter, fp32 within 1e-4 of it, ops the GPU does not take named, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from conftest import TEST_MODELS
from edgepack.emulators import lavapipe
from edgepack.errors import RuntimeCheckError
from edgepack.export.base import ExportContext
from edgepack.export.tflite import TFLiteArtifact, export
from edgepack.runtimes import litert
from edgepack.runtimes.session import RuntimeSession
from edgepack.spec import load_spec


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 16, 3, stride=2)
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1))


def _tflite(tmp_path_factory, model, example, precision):
    generator = torch.Generator().manual_seed(1)
    calibration = [(torch.rand(example.shape, generator=generator),) for _ in range(4)]
    ctx = ExportContext(model=model, example_inputs=(example,), calibration=calibration, input_names=["x"],
                        output_names=["y"], workdir=tmp_path_factory.mktemp("gpu"))
    return export(TFLiteArtifact(precision=precision), ctx).files[0]


@pytest.fixture(scope="module")
def driver():
    return lavapipe.ensure()


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    torch.manual_seed(0)
    return _tflite(tmp_path_factory, SmallCNN().eval(), torch.rand(1, 3, 16, 16), "fp16")


@pytest.fixture(scope="module")
def gather(tmp_path_factory):
    spec = load_spec(str(TEST_MODELS / "gpu_fallback.py"))
    return _tflite(tmp_path_factory, spec.model, spec.example_inputs[0], "fp16")


def _inputs(shape, n=8):
    rng = np.random.default_rng(2)
    return [rng.random(shape, dtype=np.float32) for _ in range(n)]


def _on_cpu(path, inputs):
    runner = litert.load(str(path), threads=1)
    return runner, [runner.run([x])[0] for x in inputs]


def _on_gpu(driver, path, inputs, precision="fp16", env=None):
    with RuntimeSession("litert_gpu", path, 1, env={**driver.environment(), **(env or {})},
                        options={"precision": precision}) as session:
        return session, [session.run([x])[0] for x in inputs]


def _cosine_min(a, b):
    return min(float(np.dot(x.ravel(), y.ravel()) / (np.linalg.norm(x) * np.linalg.norm(y))) for x, y in zip(a, b))


def test_the_fp16_tflite_runs_fully_on_the_gpu_close_to_the_cpu_interpreter(driver, cnn):
    inputs = _inputs([1, 3, 16, 16])
    cpu, want = _on_cpu(cnn, inputs)
    session, fp16 = _on_gpu(driver, cnn, inputs, "fp16")
    _, fp32 = _on_gpu(driver, cnn, inputs, "fp32")
    assert [(t.name, t.dtype, t.shape) for t in session.inputs] == [(t.name, t.dtype, t.shape) for t in cpu.inputs]
    assert [(t.name, t.dtype, t.shape) for t in session.outputs] == [(t.name, t.dtype, t.shape) for t in cpu.outputs]
    fp16_diff = max(float(np.abs(g - c).max()) for g, c in zip(fp16, want))
    fp32_diff = max(float(np.abs(g - c).max()) for g, c in zip(fp32, want))
    assert 0 < fp16_diff < 0.05 and _cosine_min(fp16, want) > 0.999  # fp16 arithmetic, visibly
    assert fp32_diff < 1e-4 and fp32_diff < fp16_diff / 10  # the same kernels in fp32: the difference is fp16
    info = session.info
    assert info["runtime"] == "litert_gpu" and info["precision"] == "fp16" and info["fully_accelerated"] is True
    assert info["fallback_ops"] == {} and info["ops_on_cpu"] == 0
    assert "WebGPU" in info["accelerator"] and "Vulkan" in info["accelerator"]
    assert info["adapter"].startswith("llvmpipe") and "backend=Vulkan" in info["adapter"]
    assert info["vulkan_device"]["driver_info"].startswith("Mesa ") and info["vulkan_device"]["type"] == "cpu"


def test_ops_the_gpu_does_not_take_are_named_and_run_on_the_cpu(driver, gather):
    inputs = _inputs([1, 1, 8, 8])
    _, want = _on_cpu(gather, inputs)
    session, got = _on_gpu(driver, gather, inputs)
    info = session.info
    assert info["fully_accelerated"] is False
    assert info["fallback_ops"]["GATHER_ND"] == ["Operation is not supported."]
    assert info["ops_on_cpu"] >= 1 and info["ops_on_gpu"] >= 1
    assert _cosine_min(got, want) > 0.999


def test_without_a_vulkan_driver_the_error_says_what_is_missing(driver, cnn, tmp_path):
    missing = str(tmp_path / "no-icd.json")
    with pytest.raises(RuntimeCheckError) as info:
        _on_gpu(driver, cnn, _inputs([1, 3, 16, 16], 1), env={"VK_ICD_FILENAMES": missing, "VK_DRIVER_FILES": missing})
    assert "has no Vulkan device here: vkCreateInstance failed" in info.value.message
    assert "no Vulkan driver found" in info.value.message and "gpu-setup" in info.value.hint


def test_a_damaged_file_is_a_clear_runtime_error(driver, tmp_path):
    damaged = tmp_path / "model.tflite"
    damaged.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeCheckError, match="not a TFLite flatbuffer"):
        _on_gpu(driver, damaged, [])
