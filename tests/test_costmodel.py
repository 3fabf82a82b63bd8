"""The device latency estimate: its arithmetic on a graph whose MACs are known, and the calibrated
arm64 estimate against the published phone figures it was fitted on."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgepack.costmodel import calibrated_ms, class_counts, estimate_latency, load_fit, node_costs
from edgepack.export.onnx import export_float_onnx
from edgepack.target import CpuSpec, DeviceSpec


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


# --- the calibrated arm64 estimate ------------------------------------------------------------

class Depthwise(nn.Module):
    """3x3 conv 3->8, pointwise 8->16, depthwise 3x3 on 16 channels (pad 1), all 8x8: 13,824 + 8,192 +
    9,216 MACs; XNNPACK runs them as IGEMM, GEMM and DWCONV kernels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.pw = nn.Conv2d(8, 16, 1, bias=False)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)

    def forward(self, x):
        return torch.relu(self.dw(self.pw(self.conv(x))))


def test_nodes_are_classed_by_the_kernel_type_that_runs_them(tmp_path):
    path = tmp_path / "dw.onnx"
    export_float_onnx(Depthwise().eval(), (torch.randn(1, 3, 8, 8),), path, ["x"], ["y"])
    classes = class_counts(node_costs(path))
    assert classes == {"gemm_macs": 8 * 8 * 16 * 8, "conv_macs": 8 * 8 * 8 * 27, "depthwise_macs": 8 * 8 * 16 * 9,
                       "elementwise": 8 * 8 * 16}


def test_the_fit_is_within_30_percent_of_every_published_phone_figure():
    """The six published CPU latencies the estimate was calibrated on (costmodel_fit.json, with
    sources), each estimated for its own phone's CPU (Pixel 3 or Pixel 4 class): one fitted
    constant (instructions per cycle), no constant per model."""
    fit = load_fit()
    assert len(fit["published"]) == 6 and {r["model"] for r in fit["published"]} == {"mobilenet-v2",
                                                                                     "efficientnet-lite0"}
    for row in fit["published"]:
        estimate = calibrated_ms(fit["models"][row["model"]], row["precision"], row["device"])
        assert abs(estimate / row["ms"] - 1) <= 0.30, (row["model"], row["precision"], row["phone"], estimate, row["ms"])
    assert set(fit["fitted"]) == {"instructions_per", "instructions_per_cycle"}
    # the fit's inputs are what the estimate reads: instruction counts per model, repeatable
    for name, counts in fit["instructions"].items():
        assert all(c["repeatable"] for c in counts.values()), name


def test_a_profile_with_arm64_cores_gets_the_calibrated_estimate(known_onnx):
    cpu = CpuSpec(core="cortex-a76", ghz=[2.4, 2.4, 2.4, 2.4], int8_kernels="sdot")
    device = DeviceSpec(arch="arm64-v8a", cores=8, threads=4, peak_gops={"fp32": 150, "int8": 600}, memory_gbps=15,
                        ram_mb=6144, cpu=cpu)
    est = estimate_latency(known_onnx, "int8", device)
    assert est["method"].startswith("calibrated arm64 estimate") and est["kernel_family"] == "int8-sdot"
    assert est["roofline_ms"] == estimate_latency(known_onnx, "int8", device.model_copy(update={"cpu": None}))[
        "latency_ms"]
    slower = cpu.model_copy(update={"core": "cortex-a75", "int8_kernels": "smlal"})
    assert estimate_latency(known_onnx, "int8", device.model_copy(update={"cpu": slower}))["latency_ms"] > est["latency_ms"]
    with pytest.raises(ValueError, match="the latency fit knows the cores"):
        CpuSpec(core="cortex-x9", ghz=[3.0])


def test_the_android_arm64_estimate_for_efficientnet_lite0_is_near_the_pixel_4s():
    """The android-arm64 device class (4 A76 threads at 2.4 GHz): the roofline said 2.59 ms for
    EfficientNet-Lite0 int8; a Pixel 4 (1 x 2.84 + 3 x 2.42 GHz) measured 6.5 ms."""
    from edgepack.target import load_target

    cpu = load_target("android-arm64").device.cpu.model_dump()
    estimate = calibrated_ms(load_fit()["models"]["efficientnet-lite0"], "int8", cpu)
    assert 6.5 * 0.7 < estimate < 6.5 * 1.5


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet-v2", "efficientnet-lite0"])
def test_the_fit_s_op_counts_are_the_models_graphs(name, tmp_path):
    from edgepack.spec import load_spec

    fit = load_fit()["models"][name]
    spec = load_spec(str(Path(__file__).resolve().parent.parent / fit["spec"]))
    path = tmp_path / "model.onnx"
    export_float_onnx(spec.model, spec.example_inputs, path, spec.resolved_input_names(), spec.resolved_output_names(1))
    assert class_counts(node_costs(path)) == {k: v for k, v in fit.items() if k != "spec"}
