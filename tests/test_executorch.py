"""ExecuTorch exporter + runner on tiny models, with the real toolchain and runtime (no mocks).

Each case exports a .pte, loads it with edgepack.runtimes.executorch and compares the outputs
with the torch model on seeded, image-like inputs the model was not calibrated on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from edgepack.errors import ExportError, RuntimeCheckError
from edgepack.export import executorch as et_export
from edgepack.export.base import ExportContext
from edgepack.runtimes import executorch as et_runtime

class TinyCNN(nn.Module):
    """conv-bn-relu-pool-linear on 1x3x16x16."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(torch.relu(self.bn(self.conv(x)))), 1))


class TwoInTwoOut(nn.Module):
    """Two inputs, two outputs; cumsum has no XNNPACK kernel, so it runs on portable kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 32)
        self.b = nn.Linear(4, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.relu(self.a(x) + self.b(y))
        return self.head(z), torch.cumsum(z, dim=1)


def linear_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def _seeded(model: nn.Module, seed: int = 0) -> nn.Module:
    """Deterministic weights, and batch-norm statistics that are not the identity."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    return model.eval()


def _images(count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """Smooth, normalised 16x16 'images': low-frequency noise upsampled, like real pictures."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=gen)
    images = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    images = (images - 0.45) / 0.25
    return [(images[i:i + 1],) for i in range(count)]


def _vectors(count: int, seed: int, *shapes: tuple[int, ...]) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*shape, generator=gen) for shape in shapes) for _ in range(count)]


CASES = {
    # name: (model factory, calibration data factory(count, seed))
    "cnn": (TinyCNN, _images),
    "mlp": (linear_mlp, lambda n, seed: _vectors(n, seed, (1, 64))),
    "two_io": (TwoInTwoOut, lambda n, seed: _vectors(n, seed, (1, 8), (1, 4))),
}


def _export(tmp_path: Path, case: str, calibration=None, **config):
    config.setdefault("name", f"{case}_{config['precision']}")
    return _export_with(tmp_path, case, et_export.ExecuTorchArtifact(**config), calibration)


def _export_with(tmp_path: Path, case: str, config, calibration=None):
    factory, data = CASES[case]
    model = _seeded(factory())
    calibration = data(32, seed=1) if calibration is None else calibration
    ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration,
                        input_names=[], output_names=[], workdir=tmp_path)
    return model, et_export.export(config, ctx)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Export once per (case, config) for the tests that only read the artifact."""
    cache: dict = {}

    def get(case: str, **config):
        key = (case, tuple(sorted(config.items())))
        if key not in cache:
            cache[key] = _export(tmp_path_factory.mktemp(case), case, **config)
        return cache[key]

    return get


def _compare(model: nn.Module, path: Path, samples) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(pte outputs, torch outputs), each stacked per output over the samples."""
    runner = et_runtime.load(str(path), threads=1)
    got, want = [], []
    with torch.no_grad():
        for sample in samples:
            got.append(runner.run([t.numpy() for t in sample]))
            ref = model(*sample)
            want.append([r.numpy() for r in (ref if isinstance(ref, tuple) else (ref,))])
    return ([np.concatenate(o) for o in zip(*got)], [np.concatenate(o) for o in zip(*want)])


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _check_details(result) -> None:
    details = result.details
    assert result.runtime == "executorch"
    assert result.files[0].suffix == ".pte" and result.files[0].stat().st_size == details["bytes"]
    assert details["delegates"] >= 1 and details["delegated_ops"] > 0
    assert isinstance(details["portable_ops"], list)
    assert details["planned_memory_bytes"] > 0


@pytest.mark.parametrize("case", ["cnn", "two_io"])
def test_fp32_matches_torch(exported, case):
    model, result = exported(case, precision="fp32")
    _check_details(result)
    assert result.details["quantization"] is None
    got, want = _compare(model, result.files[0], CASES[case][1](16, seed=7))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == w.shape
        assert np.abs(g - w).max() < 1e-4


@pytest.mark.parametrize("case,precision,granularity", [
    ("cnn", "int8", "per-channel"),
    ("cnn", "int8", "per-tensor"),
    ("two_io", "int8", "per-channel"),
    ("mlp", "int8-dynamic", "per-channel"),
])
def test_int8_close_to_torch(exported, case, precision, granularity):
    model, result = exported(case, precision=precision, granularity=granularity)
    _check_details(result)
    quant = result.details["quantization"]
    assert quant["granularity"] == granularity
    assert quant["dynamic"] is (precision == "int8-dynamic")
    assert quant["calibration_samples"] == (0 if quant["dynamic"] else 32)
    got, want = _compare(model, result.files[0], CASES[case][1](64, seed=7))
    for g, w in zip(got, want):
        assert _cosine(g, w) >= 0.98
    top1 = np.mean(got[0].argmax(axis=1) == want[0].argmax(axis=1))
    assert top1 >= 0.9, f"top-1 agreement {top1:.2f}"


def test_int8_is_smaller_than_fp32(exported):
    _, fp32 = exported("mlp", precision="fp32")
    _, int8 = exported("mlp", precision="int8", granularity="per-channel")
    assert int8.details["bytes"] < 0.4 * fp32.details["bytes"]


def test_portable_ops_reported(exported):
    _, result = exported("two_io", precision="fp32")
    assert {"op": "aten::cumsum.out", "count": 1} in result.details["portable_ops"]
    assert "aten::linear.default" in result.details["delegated_op_counts"]


def test_int4_weight_on_linear_model(tmp_path):
    model, result = _export(tmp_path, "mlp", precision="int4-weight", group_size=32)
    _check_details(result)
    quant = result.details["quantization"]
    assert quant["quantized_layers"] == ["0", "2", "4"] and quant["skipped_layers"] == []
    got, want = _compare(model, result.files[0], CASES["mlp"][1](32, seed=7))
    assert _cosine(got[0], want[0]) >= 0.97


def test_zero_calibration_breaks_static_int8(tmp_path):
    """Calibrating on all-zero inputs collapses activation ranges: real inputs then clip."""
    zeros = [(torch.zeros(1, 3, 16, 16),) for _ in range(8)]
    model, result = _export(tmp_path, "cnn", calibration=zeros, precision="int8")
    got, want = _compare(model, result.files[0], _images(32, seed=7))
    assert _cosine(got[0], want[0]) < 0.9


def test_pte_bytes_are_deterministic(exported, tmp_path):
    _, first = exported("cnn", precision="int8", granularity="per-channel")
    _, second = _export(tmp_path, "cnn", precision="int8", granularity="per-channel")
    assert first.files[0].read_bytes() == second.files[0].read_bytes()


def test_calibration_batches_are_split_and_capped(tmp_path):
    batch = torch.cat([t for (t,) in _images(16, seed=1)])
    _, result = _export(tmp_path, "cnn", calibration=[(batch[:1],), (batch,)], precision="int8",
                        calibration_samples=10)
    assert result.details["quantization"]["calibration_samples"] == 10


def test_calibration_shape_mismatch_is_an_export_error(tmp_path):
    calibration = _images(2, seed=1) + [(torch.zeros(1, 3, 8, 8),)]
    with pytest.raises(ExportError, match="quantize.*calibration sample 2"):
        _export(tmp_path, "cnn", calibration=calibration, precision="int8")


def test_untraceable_model_names_stage(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    ctx = ExportContext(model=DataDependent(), example_inputs=(torch.ones(1, 4),), calibration=[],
                        input_names=[], output_names=[], workdir=tmp_path)
    with pytest.raises(ExportError, match=r"data-dependent control flow at .*test_executorch\.py:\d+"):
        et_export.export(et_export.ExecuTorchArtifact(precision="fp32"), ctx)


class _Apply(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn,op", [
    (torch.linalg.inv, "aten.linalg_inv_ex"),  # not core ATen: named by the edge verifier
    (lambda x: torch.sort(x)[0], "aten::sort.values"),  # lowers, but the runtime has no kernel
])
def test_lower_failure_names_the_op(tmp_path, fn, op):
    ctx = ExportContext(model=_Apply(fn), example_inputs=(torch.randn(4, 4),), calibration=[],
                        input_names=[], output_names=[], workdir=tmp_path)
    with pytest.raises(ExportError, match=f"pte export failed during lower.*{op}"):
        et_export.export(et_export.ExecuTorchArtifact(precision="fp32"), ctx)
    assert not (tmp_path / "model.pte").exists()


def test_undelegated_quant_ops_are_rejected(tmp_path):
    """The guard behind the int8-dynamic + per-tensor validator: XNNPACK leaves those q/dq ops
    outside the delegate and the runtime has no portable kernels for them."""
    config = et_export.ExecuTorchArtifact.model_construct(
        name="m", precision="int8-dynamic", granularity="per-tensor", calibration_samples=8)
    with pytest.raises(ExportError, match="quantized_decomposed::choose_qparams"):
        _export_with(tmp_path, "mlp", config)


def test_training_mode_is_restored(tmp_path):
    factory, data = CASES["cnn"]
    model = _seeded(factory()).train()
    sample = data(1, seed=1)
    ctx = ExportContext(model=model, example_inputs=sample[0], calibration=sample,
                        input_names=[], output_names=[], workdir=tmp_path)
    et_export.export(et_export.ExecuTorchArtifact(precision="fp32"), ctx)
    assert model.training


def test_runner_io_and_feed_checks(exported):
    _, result = exported("two_io", precision="fp32")
    runner = et_runtime.load(str(result.files[0]), threads=2)
    assert [(io.name, io.shape, io.dtype) for io in runner.inputs] == [
        ("input_0", [1, 8], "float32"), ("input_1", [1, 4], "float32")]
    assert [(io.name, io.shape, io.dtype) for io in runner.outputs] == [
        ("output_0", [1, 5], "float32"), ("output_1", [1, 32], "float32")]
    with pytest.raises(ValueError, match="expected float32"):
        runner.run([np.zeros((1, 8), np.float64), np.zeros((1, 4), np.float32)])
    with pytest.raises(ValueError, match="takes 2 inputs"):
        runner.run([np.zeros((1, 8), np.float32)])
    info = et_runtime.info()
    assert info["version"].startswith("1.5") and "XnnpackBackend" in info["backends"]
    assert info["threads"] == 2


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_pte_raises(exported, tmp_path, damage):
    _, result = exported("mlp", precision="fp32")
    good = result.files[0].read_bytes()
    bad = tmp_path / "bad.pte"
    bad.write_bytes(b"not a program" * 20 if damage == "garbage" else good[: len(good) // 3])
    with pytest.raises(RuntimeCheckError, match="bad.pte"):
        et_runtime.load(str(bad), threads=1)


@pytest.mark.parametrize("fields,message", [
    ({"precision": "int8-dynamic", "granularity": "per-tensor"}, "per-channel"),
    ({"precision": "int4-weight", "granularity": "per-tensor"}, "groupwise"),
    ({"precision": "int4-weight", "group_size": 48}, "multiple of 32"),
    ({"precision": "int8", "weight_algorithm": "rtn"}, "weight_algorithm only applies to precision int4-weight"),
    ({"precision": "int8", "group_size": 64}, "only applies to precision int4-weight"),
    ({"precision": "int16"}, "precision"),
    ({"precision": "int8", "calibration_samples": 0}, "calibration_samples"),
    ({"precision": "fp32", "format": "onnx"}, "format"),
    ({"precision": "int8", "backend": "vulkan"}, "backend vulkan takes precision fp32 or fp16"),
    ({"precision": "fp16"}, "set backend: vulkan"),
    ({"precision": "fp32", "backend": "coreml"}, "backend"),
])
def test_config_rejects_bad_combinations(fields, message):
    with pytest.raises(ValidationError, match=message):
        et_export.ExecuTorchArtifact(**fields)


@pytest.mark.parametrize("fields", [
    {"name": "m", "precision": "int4-weight", "group_size": 64},
    {"name": "m", "precision": "int8", "granularity": "per-tensor", "calibration_samples": 16},
    {"name": "m", "precision": "fp16", "backend": "vulkan"},
])
def test_config_round_trips(fields):
    config = et_export.ExecuTorchArtifact(**fields)
    assert et_export.ExecuTorchArtifact.model_validate(config.model_dump()) == config
    assert config.file_name == "m.pte" and et_export.CONFIG is et_export.ExecuTorchArtifact


# -- Vulkan (ahead of time only) ------------------------------------------------------------------


class SmallConvNet(nn.Module):
    """The digits CNN's layer kinds (conv-relu, max-pool, linear) at 8x8, weights ~80k params."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 32, 3, padding=1), nn.Conv2d(32, 64, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv2(torch.relu(self.conv1(x)))), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


def test_vulkan_lowers_whole_and_is_marked_not_validated(tmp_path):
    """The Vulkan partitioner takes the whole CNN (one delegate, no portable ops); fp16
    (force_fp16) halves the weight bytes; the pip runtime cannot load the .pte, and the artifact
    says so. One export (fp16): a Vulkan lowering takes ~20 s on this host."""
    model = _seeded(SmallConvNet())
    example = (torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)
    config = et_export.ExecuTorchArtifact(name="vk", precision="fp16", backend="vulkan")
    ctx = ExportContext(model=model, example_inputs=example, calibration=[example], input_names=[],
                        output_names=[], workdir=tmp_path)
    result = et_export.export(config, ctx)
    details = result.details
    assert details["backend"] == "vulkan" and details["delegate_backends"] == ["VulkanBackend"]
    assert details["delegates"] == 1 and details["portable_ops"] == []
    assert details["vulkan_compile_options"] == {"force_fp16": True}
    assert details["validated_on_host"] is False
    assert config.device_only and config.device_only in result.notes
    assert "not validated on this host" in config.device_only
    fp32_weight_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert result.files[0].stat().st_size <= 0.55 * fp32_weight_bytes  # measured: 0.52x
    fp32 = et_export.ExecuTorchArtifact(precision="fp32", backend="vulkan")
    assert et_export._vulkan_options(fp32) == {"force_fp16": False} and fp32.device_only
    assert et_export.ExecuTorchArtifact(precision="fp32").device_only is None
    with pytest.raises(RuntimeCheckError, match="vk.pte"):
        et_runtime.load(str(result.files[0]), threads=1)


def test_android_gpu_build_ships_the_vulkan_pte_not_validated(tmp_path, digits_spec):
    """`edgepack build models/digits_cnn.py --target android-gpu`: the fp16 .tflite passes parity
    in LiteRT at <= 0.55x the float bytes, on the CPU interpreter and on the GPU accelerator
    (lavapipe); the Vulkan .pte ships as not-validated (no parity,
    latency or golden outputs claimed, a warning), the build passes, and `edgepack validate`
    skips it."""
    import json

    from conftest import run_cli

    proc = run_cli("build", "models/digits_cnn.py", "--target", "android-gpu", "--out", str(tmp_path), "--json",
                   "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    tflite, vulkan = manifest["artifacts"]
    assert tflite["status"] == "ok" and tflite["parity"]["passed"] and tflite["size"]["ratio_to_float"] <= 0.55
    # and on LiteRT's GPU accelerator over lavapipe (tests/test_gpu_check.py checks the record)
    assert tflite["emulated_gpu"]["status"] == "passed" and tflite["emulated_gpu"]["fully_accelerated"]
    assert vulkan["file"] == "model_vulkan.pte" and vulkan["status"] == "not-validated"
    assert vulkan["parity"] is None and vulkan["latency"] is None and vulkan["golden"] is None
    assert vulkan["export"]["delegate_backends"] == ["VulkanBackend"] and vulkan["size"]["ratio_to_float"] <= 0.55
    assert any("model_vulkan.pte: not validated on this host: no ExecuTorch runtime a package registry ships has "
               "the Vulkan backend" in w for w in manifest["warnings"])
    bundle = tmp_path / "digits-cnn" / "android-gpu"
    assert (bundle / "model_vulkan.pte").stat().st_size == vulkan["bytes"]
    check = run_cli("validate", str(bundle))
    assert check.returncode == 0, check.stderr
    assert "model_vulkan.pte: status not-validated" in check.stderr + check.stdout


def test_int8_tables_of_a_bert_shaped_encoder_lower_and_run(tmp_path):
    """tests/models/padded_encoder.py: a token table with padding_idx=0 and position/token-type
    tables looked up with constant buffers, as transformers' BertEmbeddings. With int8 tables the
    .pte once failed at lowering (torchao::dequantize_affine left outside XNNPACK: the
    padding_idx lookup was not fused), at every quantized precision; int8-dynamic is the fastest
    to export. The constant lookups fold away; the token lookup runs as embedding_byte."""
    from tests.models.padded_encoder import PaddedEncoder, token_samples

    model = PaddedEncoder().eval()
    samples = token_samples(12, seed=1)
    ctx = ExportContext(model=model, example_inputs=samples[0], calibration=samples[:4],
                        input_names=[], output_names=[], workdir=tmp_path)
    result = et_export.export(et_export.ExecuTorchArtifact(precision="int8-dynamic", embeddings="int8"), ctx)
    assert result.details["quantization"]["embeddings"]["padding_idx_dropped"] == ["word_embeddings"]
    assert {"op": "quantized_decomposed::embedding_byte.out", "count": 1} in result.details["portable_ops"]
    got, want = _compare(model, result.files[0], samples[4:])
    assert _cosine(got[0], want[0]) > 0.999


def test_int4_weight_pte_runs_the_gptq_codes(tmp_path):
    """The .pte holds GPTQ's codes and scales (weight_algorithm gptq, the default), not torchao's
    round-to-nearest ones: one-hot rows (exact in int8 per-token activations) give back the
    columns of GPTQ's dequantized weight."""
    from edgepack.quant.int4 import calibrated_int4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).eval()
    gen = torch.Generator().manual_seed(1)
    calibration = [(torch.randn(8, 64, generator=gen),) for _ in range(8)]
    ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration,
                        input_names=[], output_names=[], workdir=tmp_path)
    result = et_export.export(et_export.ExecuTorchArtifact(precision="int4-weight", calibration_samples=6), ctx)
    quantization = result.details["quantization"]
    assert quantization["weight_algorithm"] == "gptq" and quantization["calibration_samples"] == 6
    weights, _ = calibrated_int4(model, ["0"], calibration, calibration[0], 32, 6)
    dequantized = weights["0"].dequantized()
    assert not torch.equal(dequantized, rtn_weight := _rtn(model[0].weight)), "GPTQ chose RTN's codes: no test"
    (got,) = et_runtime.load(str(result.files[0]), threads=1).run([np.eye(64, dtype=np.float32)[:8]])
    # XNNPACK keeps the int4 group scales in bfloat16; GPTQ's scales are bfloat16-exact already
    assert torch.equal(weights["0"].scales.to(torch.bfloat16).float(), weights["0"].scales)
    want = dequantized[:, :8].T + model[0].bias
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.abs(got - (rtn_weight[:, :8].T + model[0].bias).detach().numpy()).max() > 1e-3


def _rtn(weight: torch.Tensor) -> torch.Tensor:
    from edgepack.quant.gptq import rtn

    return rtn(weight, 32).dequantized()


def test_provenance_chains_are_cut_to_the_ancestor_debug_handles_are_named_after():
    """_root_provenance keeps what ExecuTorch reads from a node's provenance (its oldest ancestor,
    which names its debug handle) and drops the nested chain every lowering pass would copy."""
    from executorch.exir.debug_handle_utils import get_greatest_ancestor_node_identifier

    from edgepack.export.executorch import _root_provenance

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 8, 8),)).run_decompositions()
    nodes = [n for n in program.graph_module.graph.nodes if n.meta.get("from_node")]
    before = {n.name: get_greatest_ancestor_node_identifier(n) for n in nodes}

    def depth(source) -> int:
        return 1 + max((depth(s) for s in source.from_node), default=0)

    assert nodes and max(depth(n.meta["from_node"][-1]) for n in nodes) > 1
    _root_provenance(program.graph_module)
    assert {n.name: get_greatest_ancestor_node_identifier(n) for n in nodes} == before
    assert all(len(n.meta["from_node"]) == 1 and not n.meta["from_node"][0].from_node for n in nodes)
