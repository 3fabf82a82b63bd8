"""LiteRT exporter + runner on tiny models: real litert-torch conversion, real quantizers,
real LiteRT interpreter. Artifacts are compared with the torch float model on held-out
inputs fed exactly as a device would (runner native IO via to_native/from_native)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

pytest.importorskip("litert_torch", reason="litert-torch is not installed")
pytest.importorskip("ai_edge_litert", reason="ai-edge-litert is not installed")

from edgepack.errors import ExportError, RuntimeCheckError  # noqa: E402
from edgepack.export.base import ExportContext  # noqa: E402
from edgepack.export.tflite import TFLiteArtifact, export  # noqa: E402
from edgepack.runtimes import litert  # noqa: E402
from edgepack.runtimes.base import from_native, to_native  # noqa: E402
from int8_support import ChainedResidual  # noqa: E402


class TinyCNN(nn.Module):
    """conv-bn-relu-pool-linear. The linear layer holds most weights, so file size tracks
    weight precision (fp16 ~ half of fp32) rather than flatbuffer overhead."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(32 * 8 * 8, 10)
        with torch.no_grad():  # non-trivial running stats so BN folding is exercised
            self.bn.running_mean.uniform_(-0.2, 0.2)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(x, 1))


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(3, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x, y):
        h = torch.relu(self.a(x) + self.b(y))
        return self.head(h), h.sum(dim=1, keepdim=True)


def _inputs(shapes, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(*s, generator=g) for s in shapes) for _ in range(n)]


CASES = {
    "cnn": (TinyCNN, [(1, 3, 16, 16)]),
    "two_io": (TwoInTwoOut, [(2, 6), (2, 3)]),
}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {name: cls().eval() for name, (cls, _) in CASES.items()}


def _export(tmp_path_factory, model, shapes, calibration=None, **options):
    ctx = ExportContext(
        model=model,
        example_inputs=_inputs(shapes, 1, seed=0)[0],
        calibration=_inputs(shapes, 32, seed=1) if calibration is None else calibration,
        input_names=[f"in{i}" for i in range(len(shapes))],
        output_names=["out"],
        workdir=tmp_path_factory.mktemp("tflite"),
    )
    return export(TFLiteArtifact(**options), ctx)


def _compare(model, shapes, path, n=48):
    """Run held-out inputs through the artifact the way a device does; return per-output
    (max abs error, mean cosine, top-1 agreement) against torch float, and the runner."""
    runner = litert.load(str(path), threads=1)
    got, want = [], []
    for sample in _inputs(shapes, n, seed=2):
        native = runner.run(to_native([t.numpy() for t in sample], runner.inputs))
        got.append(from_native(native, runner.outputs))
        with torch.no_grad():
            out = model(*sample)
        want.append([t.numpy() for t in (out if isinstance(out, tuple) else (out,))])
    stats = []
    for k in range(len(want[0])):
        a = np.stack([g[k] for g in got]).astype(np.float64)
        b = np.stack([w[k] for w in want]).astype(np.float64)
        flat_a, flat_b = a.reshape(n, -1), b.reshape(n, -1)  # cosine per sample
        cos = (flat_a * flat_b).sum(1) / (np.linalg.norm(flat_a, axis=1) * np.linalg.norm(flat_b, axis=1) + 1e-12)
        top1 = (a.argmax(-1) == b.argmax(-1)).mean()  # per row of the last (class) axis
        stats.append((float(np.abs(a - b).max()), float(cos.mean()), float(top1)))
    return stats, runner


@pytest.fixture(scope="module")
def fp32(models, tmp_path_factory):
    return {name: _export(tmp_path_factory, models[name], shapes, precision="fp32")
            for name, (_, shapes) in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_fp32_matches_torch(case, models, fp32):
    result = fp32[case]
    assert result.runtime == "litert" and result.files[0].suffix == ".tflite"
    stats, runner = _compare(models[case], CASES[case][1], result.files[0])
    assert all(err < 1e-4 for err, _, _ in stats), stats
    # IO follows the PyTorch signature: NCHW kept, positional order, float32
    assert [t.shape for t in runner.inputs] == [list(s) for s in CASES[case][1]]
    assert [t.name for t in runner.inputs] == [f"args_{i}" for i in range(len(CASES[case][1]))]
    assert all(t.dtype == "float32" and t.scale is None for t in runner.inputs + runner.outputs)
    assert result.details["quantization"] is None and result.details["ops"]


def test_runner_keeps_torch_argument_order_past_ten(tmp_path_factory):
    """The TFLite signature sorts names as text (args_10 before args_2); the runner must not."""

    class Twelve(nn.Module):
        def forward(self, *xs):
            return tuple(x * (i + 1) for i, x in enumerate(xs))

    shapes = [(1, i + 1) for i in range(12)]
    result = _export(tmp_path_factory, Twelve().eval(), shapes, precision="fp32")
    runner = litert.load(str(result.files[0]), threads=1)
    assert [t.shape for t in runner.inputs] == [list(s) for s in shapes]
    assert [t.name for t in runner.outputs] == [f"output_{i}" for i in range(12)]
    feeds = [np.ones(s, dtype=np.float32) for s in shapes]
    for i, out in enumerate(runner.run(feeds)):
        assert out.shape == shapes[i] and np.all(out == i + 1)


def test_fp32_export_is_deterministic(models, fp32, tmp_path_factory):
    again = _export(tmp_path_factory, models["cnn"], CASES["cnn"][1], precision="fp32")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(again.files[0]) == digest(fp32["cnn"].files[0])


@pytest.mark.parametrize("case", list(CASES))
def test_fp16_halves_weights(case, models, fp32, tmp_path_factory):
    result = _export(tmp_path_factory, models[case], CASES[case][1], precision="fp16")
    stats, _ = _compare(models[case], CASES[case][1], result.files[0])
    assert all(err < 1e-2 for err, _, _ in stats), stats
    assert result.details["ops"].get("DEQUANTIZE", 0) >= 2  # fp16 weights -> DEQUANTIZE -> float op
    if case == "cnn":  # weight-dominated; two_io is too small for size to track precision
        assert result.files[0].stat().st_size <= 0.55 * fp32[case].files[0].stat().st_size


@pytest.mark.parametrize("granularity", ["per-channel", "per-tensor"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_static_parity(case, granularity, models, tmp_path_factory):
    result = _export(tmp_path_factory, models[case], CASES[case][1], precision="int8", granularity=granularity)
    stats, runner = _compare(models[case], CASES[case][1], result.files[0])
    for _, cosine, top1 in stats:
        assert cosine >= 0.98, stats
    # first output: class scores. A random-init model has near-tied logits, so a few top-1
    # flips are expected even when the outputs agree to cosine 0.9999.
    assert stats[0][2] >= 0.85, stats
    assert all(t.dtype == "float32" for t in runner.inputs + runner.outputs)  # io: float (default)
    q = result.details["quantization"]
    assert q["quantizer"] == "pt2e" and q["granularity"] == granularity and q["calibration_samples"] == 32
    assert result.details["ops"]["QUANTIZE"] >= 1
    delegation = runner.info()["delegation"]  # XNNPACK took the whole graph
    assert delegation["delegates"] == 1 and delegation["undelegated_ops"] == {}, delegation
    assert delegation["delegated_ops"] == sum(result.details["ops"].values()), delegation


def test_int8_chained_residual_adds_stay_integer(tmp_path_factory):
    # litert-torch's own annotation leaves an add that reads another add's output float (a float ADD
    # between DEQUANTIZE and QUANTIZE); XNNPACK's rules place the same observers and quantize that input
    torch.manual_seed(0)
    model, shapes = ChainedResidual().eval(), [(1, 3, 8, 8)]
    result = _export(tmp_path_factory, model, shapes, precision="int8")
    assert result.details["float_compute_ops"] == {}, result.details["ops"]
    assert result.details["ops"]["ADD"] == 2 and result.details["ops"].get("DEQUANTIZE", 0) == 1
    assert "XNNPACKQuantizer's rules" in result.details["quantization"]["annotation"]
    stats, _ = _compare(model, shapes, result.files[0])
    assert stats[0][1] >= 0.98, stats


def test_int8_ai_edge_quantizer_is_full_integer(models, tmp_path_factory):
    result = _export(tmp_path_factory, models["two_io"], CASES["two_io"][1], precision="int8",
                     quantizer="ai-edge-quantizer", io="int8")
    stats, runner = _compare(models["two_io"], CASES["two_io"][1], result.files[0])
    assert all(cosine >= 0.98 for _, cosine, _ in stats), stats
    assert result.details["float_compute_ops"] == {}
    assert all(t.dtype == "int8" for t in runner.inputs + runner.outputs)


@pytest.mark.parametrize("case", list(CASES))
def test_int8_io(case, models, tmp_path_factory):
    result = _export(tmp_path_factory, models[case], CASES[case][1], precision="int8", io="int8")
    stats, runner = _compare(models[case], CASES[case][1], result.files[0])
    assert all(cosine >= 0.98 for _, cosine, _ in stats), stats
    assert result.details["io"]["type"] == "int8"
    for spec in runner.inputs:
        assert spec.dtype == "int8" and spec.scale > 0 and -128 <= spec.zero_point <= 127
    # to_native/from_native round-trip: quantizing then dequantizing moves a value by <= scale/2
    values = [t.numpy() for t in _inputs(CASES[case][1], 1, seed=3)[0]]
    native = to_native(values, runner.inputs)
    assert all(n.dtype == np.int8 for n in native)
    back = from_native(native, runner.inputs)
    for value, restored, spec in zip(values, back, runner.inputs):
        low, high = (-128 - spec.zero_point) * spec.scale, (127 - spec.zero_point) * spec.scale
        inside = (value >= low) & (value <= high)  # outside, to_native clips (by design)
        assert inside.mean() > 0.9
        assert np.abs(restored - value)[inside].max() <= spec.scale / 2 + 1e-6
    # pt2e leaves two_io's SUM in float: that output stays float32 and says so
    if case == "two_io":
        assert runner.outputs[0].dtype == "int8" and runner.outputs[1].dtype == "float32"
        assert runner.outputs[1].scale is None and result.notes


@pytest.mark.parametrize("case", list(CASES))
def test_int8_dynamic(case, models, tmp_path_factory):
    result = _export(tmp_path_factory, models[case], CASES[case][1], precision="int8-dynamic")
    stats, runner = _compare(models[case], CASES[case][1], result.files[0])
    assert all(cosine >= 0.99 for _, cosine, _ in stats), stats
    assert all(t.dtype == "float32" for t in runner.inputs + runner.outputs)
    assert "QUANTIZE" not in result.details["ops"]  # weights int8, activations float


def test_int8_dynamic_of_an_encoder_with_lookup_tables_loads(tmp_path):
    """tests/models/padded_encoder.py: litert-torch's dynamic conversion stored the token table int8
    per tensor with zero point -17, and LiteRT refused the file at load (embedding_lookup.cc:73
    zero_point == 0), so MiniLM's int8-dynamic .tflite could not run. quantizer: auto now detects
    that table and makes the artifact with ai-edge-quantizer (tables int8 per row, symmetric);
    an explicit pt2e fails at export, naming why, instead of writing a file that cannot load."""
    from tests.models.padded_encoder import PaddedEncoder, token_samples

    model = PaddedEncoder().eval()
    samples = token_samples(12, seed=3)
    ctx = ExportContext(model=model, example_inputs=samples[0], calibration=samples[:4], input_names=[],
                        output_names=[], workdir=tmp_path)
    result = export(TFLiteArtifact(precision="int8-dynamic"), ctx)
    quantization = result.details["quantization"]
    assert quantization["quantizer"] == "ai-edge-quantizer" and quantization["fallback_from"] == "pt2e"
    assert "nonzero zero point" in quantization["fallback_reason"]
    (table,) = result.details["lookup_tables"]  # the token table; the constant lookups fold away
    assert table == {"dtype": "int8", "scales": 64, "nonzero_zero_point": False}
    runner = litert.load(str(result.files[0]), threads=1)
    for ids, mask in samples[4:]:
        got = from_native(runner.run(to_native([ids.numpy(), mask.numpy()], runner.inputs)), runner.outputs)[0]
        with torch.no_grad():
            want = model(ids, mask).numpy()
        assert float((got * want).sum() / (np.linalg.norm(got) * np.linalg.norm(want))) > 0.999
    with pytest.raises(ExportError, match="EMBEDDING_LOOKUP table.*nonzero zero point"):
        export(TFLiteArtifact(precision="int8-dynamic", quantizer="pt2e"), ctx)


def test_zero_calibration_breaks_parity(models, tmp_path_factory):
    """A broken calibration set (all zeros) must show up as bad parity, not slip through."""
    shapes = CASES["cnn"][1]
    zeros = [tuple(torch.zeros(*s) for s in shapes) for _ in range(8)]
    result = _export(tmp_path_factory, models["cnn"], shapes, calibration=zeros, precision="int8")
    stats, _ = _compare(models["cnn"], shapes, result.files[0])
    assert stats[0][1] < 0.9, stats


def test_int8_without_calibration_is_an_export_error(models, tmp_path_factory):
    with pytest.raises(ExportError, match="calibration"):
        _export(tmp_path_factory, models["cnn"], CASES["cnn"][1], calibration=[], precision="int8")


def test_unsupported_op_names_step_and_op(tmp_path_factory):
    class Zeta(nn.Module):
        def forward(self, x):
            return torch.special.zeta(x, x + 2)

    with pytest.raises(ExportError) as info:
        _export(tmp_path_factory, Zeta().eval(), [(3, 3)], precision="fp32")
    message = str(info.value)
    assert "tflite" in message and "convert" in message and "aten.special_zeta" in message


def test_corrupt_tflite_is_a_clear_error(fp32, tmp_path):
    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(RuntimeCheckError, match="not a TFLite flatbuffer"):
        litert.load(str(garbage), threads=1)
    truncated = tmp_path / "truncated.tflite"
    truncated.write_bytes(fp32["cnn"].files[0].read_bytes()[:200])
    with pytest.raises(RuntimeCheckError, match="cannot load"):
        litert.load(str(truncated), threads=1)


@pytest.mark.parametrize("options", [
    {"precision": "fp32", "io": "int8"},
    {"precision": "int8-dynamic", "io": "int8"},
    {"precision": "fp16", "granularity": "per-tensor"},
    {"precision": "fp32", "quantizer": "pt2e"},
    {"precision": "fp16", "quantizer": "pt2e"},
    {"precision": "int8", "calibration_samples": 0},
    {"precision": "int4"},
    {"precision": "int8", "colour": "blue"},
])
def test_config_rejects_meaningless_options(options):
    with pytest.raises(ValidationError):
        TFLiteArtifact(**options)


def test_config_round_trips():
    config = TFLiteArtifact(precision="int8", granularity="per-tensor", io="int8", quantizer="ai-edge-quantizer")
    assert TFLiteArtifact.model_validate(config.model_dump()) == config
    assert config.file_name == "model.tflite" and config.resolved_quantizer == "ai-edge-quantizer"
    assert TFLiteArtifact(precision="int8").resolved_quantizer == "pt2e"


class DropoutHead(nn.Module):
    """conv-relu6-avgpool-flatten-dropout-linear: MobileNetV2's head in small. The eval-mode
    dropout is where PT2E used to leave a requantize chain that litert-torch folds wrongly."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.nn.functional.adaptive_avg_pool2d(torch.clamp(self.conv(x), 0, 6), 1).flatten(1)
        return self.fc(self.drop(x))


def _bias_scale_errors(buffer: bytes) -> list[float]:
    """Relative distance of each int32 bias scale from input scale x weight scale."""
    from ai_edge_litert import schema_py_generated as fb
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(buffer))
    sg, errors = model.subgraphs[0], []
    for op in sg.operators:
        if len(op.inputs) >= 3 and op.inputs[2] >= 0 and sg.tensors[op.inputs[2]].type == fb.TensorType.INT32:
            x, w, b = (sg.tensors[i] for i in op.inputs[:3])
            want = np.asarray(x.quantization.scale) * np.asarray(w.quantization.scale)
            errors.append(float(np.max(np.abs(np.asarray(b.quantization.scale) / want - 1))))
    return errors


class CumSum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=1))


def test_delegation_names_the_ops_xnnpack_left(tmp_path_factory):
    """XNNPACK has no CUMSUM: the graph splits into two delegate partitions around it, and the
    runner names the op the interpreter runs itself."""
    result = _export(tmp_path_factory, CumSum().eval(), [(1, 8)], precision="fp32")
    delegation = litert.load(str(result.files[0]), threads=1).info()["delegation"]
    assert delegation == {"available": True, "delegate": "XNNPACK (LiteRT default)", "delegates": 2,
                          "delegated_ops": 2, "undelegated_ops": {"CUMSUM": 1}}
