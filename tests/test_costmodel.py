"""The device latency estimate: its arithmetic on a graph whose MACs are known."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepack.costmodel import estimate_latency, node_costs
from edgepack.export.onnx import export_float_onnx
from edgepack.target import DeviceSpec


class Known(nn.Module):
    """conv 3->8 3x3 on 16x16 (pad 1): 16*16*8*3*3*3 = 55,296 MACs; linear 2048->10: 20,480 MACs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8 * 16 * 16, 10, bias=False)

    def forward(self, x):
        return self.fc(torch.flatten(self.conv(x), 1))


@pytest.fixture(scope="module")
def known_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("cost") / "known.onnx"
    export_float_onnx(Known().eval(), (torch.randn(1, 3, 16, 16),), path, ["x"], ["y"])
    return path


def test_macs_per_node(known_onnx):
    costs = {c.op_type: c for c in node_costs(known_onnx)}
    assert costs["Conv"].macs == 55_296
    matmul = costs.get("Gemm") or costs.get("MatMul")
    assert matmul.macs == 20_480
    assert costs["Conv"].weight_elements == 8 * 3 * 3 * 3


def test_roofline_arithmetic(known_onnx):
    # 1 GOP/s and 1 TB/s: compute-bound, so latency = ops / peak.
    device = DeviceSpec(arch="test", cores=1, threads=1, peak_gops={"fp32": 1.0, "int8": 4.0}, memory_gbps=1000.0, ram_mb=1)
    costs = node_costs(known_onnx)
    ops = sum(2 * c.macs + c.other_ops for c in costs)
    est = estimate_latency(known_onnx, "fp32", device)
    assert est["macs"] == 55_296 + 20_480
    assert est["latency_ms"] == pytest.approx(ops / 1e9 * 1e3, rel=1e-3)
    # int8 uses the int8 peak: 4x less compute time.
    assert estimate_latency(known_onnx, "int8", device)["compute_bound_ms"] == pytest.approx(est["compute_bound_ms"] / 4, rel=1e-3)
    # A starved memory bus makes it memory-bound: latency = bytes / bandwidth.
    slow = device.model_copy(update={"peak_gops": {"fp32": 1e6}, "memory_gbps": 0.001})
    est = estimate_latency(known_onnx, "fp32", slow)
    assert est["latency_ms"] == pytest.approx(est["bytes_moved"] / 1e6 * 1e3, rel=1e-2)
    assert est["source"] == "estimate" and est["assumptions"]
