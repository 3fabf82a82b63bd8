"""The tiny BERT-style encoder (models/tiny_encoder.py) through the precision paths that apply to
a transformer, each artifact run in its own runtime; and the int8 recipe's handling of linears
over [batch, sequence, hidden] tensors (their channels are the last dim, not dim 1)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from conftest import MODELS
from edgepack.compress.equalize import EqualizeConfig
from edgepack.compress.equalize import run as equalize
from edgepack.export import executorch as et_export
from edgepack.export import onnx as onnx_export
from edgepack.export.base import ExportContext
from edgepack.parity import compare
from edgepack.runtimes import executorch as et_runtime
from edgepack.spec import load_spec
from edgepack.stage import StageContext
from edgepack.target import load_target

HELD_OUT = 8  # sequences per parity check: enough for cosine min / SQNR, fast on 2 busy cores


@pytest.fixture(scope="module")
def encoder_spec():
    return load_spec(str(MODELS / "tiny_encoder.py"))


def _encoder_module(spec):
    return sys.modules[type(spec.model).__module__]


def _ctx(model, example, calibration, workdir) -> ExportContext:
    return ExportContext(model=model, example_inputs=example, calibration=calibration,
                         input_names=["input_ids", "attention_mask"], output_names=["pooled"], workdir=workdir)


def _reference(model, samples) -> list[list[np.ndarray]]:
    with torch.no_grad():
        return [[model(*sample).numpy()] for sample in samples]


def _run_pte(path, samples) -> list[list[np.ndarray]]:
    runner = et_runtime.load(str(path), threads=1)
    return [runner.run([t.numpy() for t in sample]) for sample in samples]


def _run_onnx(path, samples) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, dict(zip(names, (t.numpy() for t in sample)))) for sample in samples]


def _sqnr(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    signal = sum(float((r ** 2).sum()) for r in reference)
    noise = sum(float(((a - r) ** 2).sum()) for a, r in zip(actual, reference))
    return 10 * math.log10(signal / noise)


def _stage_ctx(calibration) -> StageContext:
    return StageContext(example_inputs=calibration[0], calibration=calibration, teacher=nn.Identity())


def _float_bytes(model: nn.Module) -> int:
    """fp32 weight bytes: a lower bound on any float artifact's size (the float ONNX of the
    tiny encoder is 3.92 MB for these 3.77 MB of weights)."""
    return sum(p.numel() * 4 for p in model.parameters())


# --------------------------------------------------------------------------- the shipped int4 profile


# The .pte takes ~60 s: ExecuTorch's XNNPACK lowering passes run once per delegated partition.
@pytest.mark.parametrize("fmt", [pytest.param("pte", marks=pytest.mark.slow), "onnx"])
def test_int4_profile_artifacts_pass_parity_at_a_third_of_the_bytes(encoder_spec, fmt, tmp_path):
    """android-arm64-int4: 4-bit group-32 weights, run in ExecuTorch (XNNPACK) / onnxruntime
    (MatMulNBits); the .pte's embedding tables int8; GPTQ weights (here on 4 calibration sequences).
    Measured with round-to-nearest weights: .pte 665,088 B, cosine min 0.995, SQNR 20 dB; .onnx
    1,180,064 B, 0.995, 20 dB (0.18x / 0.31x the fp32 weight bytes)."""
    profile = load_target("android-arm64-int4")
    (config,) = [a for a in profile.artifacts if a.format == fmt]
    assert config.precision == "int4-weight" and config.group_size == 32
    spec = encoder_spec
    held_out = list(spec.holdout)[:HELD_OUT]
    result = (et_export if fmt == "pte" else onnx_export).export(
        config, _ctx(spec.model, spec.example_inputs, list(spec.calibration)[:4], tmp_path))
    quantization = result.details["quantization"]
    if fmt == "pte":
        assert quantization["granularity"] == "per-group(32)" and quantization["skipped_layers"] == []
        assert len(quantization["quantized_layers"]) == 25  # 4 x (q, k, v, out, up, down) + pooler
        assert result.details["delegated_op_counts"]["aten::linear.default"] == 25
        assert quantization["embeddings"]["weights"] == "int8 symmetric, per-row"
        assert {"op": "quantized_decomposed::embedding_byte.out", "count": 1} in result.details["portable_ops"]
        outputs = _run_pte(result.files[0], held_out)
    else:
        assert quantization["group_size"] == 32 and quantization["quantized_op_counts"] == {"MatMulNBits": 25}
        outputs = _run_onnx(result.files[0], held_out)
    parity = compare(_reference(spec.model, held_out), outputs,
                     profile.tolerance_for("int4-weight").model_dump(), ["pooled"])
    assert parity.passed, parity.summary()
    figures = parity.outputs[0]
    assert figures.cosine_min > 0.99 and figures.sqnr_db > 17.0
    size = sum(f.stat().st_size for f in result.files)
    assert size <= 0.35 * _float_bytes(spec.model), (size, _float_bytes(spec.model))


# --------------------------------------------------------------------------- static int8 (android-arm64)


def _encoder_layer_case(spec, fmt: str):
    """A one-layer encoder, 8 calibration and HELD_OUT held-out sequences, and android-arm64's
    ``fmt`` artifact config calibrated on those 8."""
    module = _encoder_module(spec)
    torch.manual_seed(0)
    model = module.TinyEncoder(layers=1).eval()
    calibration = module.token_samples(8, seed=1)
    held_out = module.token_samples(HELD_OUT, seed=2)
    profile = load_target("android-arm64")
    (config,) = [a for a in profile.artifacts if a.format == fmt]
    return model, calibration, held_out, profile, config.model_copy(update={"calibration_samples": 8})


def test_static_int8_pte_of_an_encoder_layer(encoder_spec, tmp_path):
    """The android-arm64 int8 recipe (MSE ranges, bias correction) on a one-layer encoder, run in
    the ExecuTorch runtime: bias correction works on the [1, 32, 128] linear outputs (it once
    averaged over the sequence and crashed) and parity holds with android-arm64's int8 tolerance.
    The four-layer encoder measured in a build: cosine min 0.9996, SQNR 32 dB (.pte)."""
    model, calibration, held_out, profile, config = _encoder_layer_case(encoder_spec, "pte")
    result = et_export.export(config, _ctx(model, calibration[0], calibration, tmp_path))
    quantization = result.details["quantization"]
    assert quantization["bias_correction"]["corrected_layers"] == 7  # q, k, v, out, up, down, pooler
    # android-arm64 quantizes the embedding tables too: a quantized lookup outside the delegate
    assert quantization["embeddings"]["tables"] == ["positions", "tokens"]
    portable = {entry["op"] for entry in result.details["portable_ops"]}
    assert "quantized_decomposed::embedding_byte.out" in portable, portable
    assert sum(f.stat().st_size for f in result.files) <= 0.30 * _float_bytes(model)
    parity = compare(_reference(model, held_out), _run_pte(result.files[0], held_out),
                     profile.tolerance_for("int8").model_dump(), ["pooled"])
    assert parity.passed, parity.summary()
    assert parity.outputs[0].cosine_min > 0.99 and parity.outputs[0].sqnr_db > 20.0


def test_static_int8_tflite_of_an_encoder_layer_has_int8_tables(encoder_spec, tmp_path):
    """android-arm64's .tflite: the PT2E int8 flatbuffer, then its EMBEDDING_LOOKUP tables int8 per
    row (ai-edge-quantizer), run in the LiteRT interpreter with the int8 tolerance. The four-layer
    encoder measured: 1,540,912 -> 1,169,328 bytes, cosine min 0.99994, SQNR 40.7 dB."""
    from edgepack.export import tflite as tflite_export
    from edgepack.runtimes import litert as litert_runtime

    model, calibration, held_out, profile, config = _encoder_layer_case(encoder_spec, "tflite")
    assert config.embeddings == "int8"
    result = tflite_export.export(config, _ctx(model, calibration[0], calibration, tmp_path))
    tables = result.details["quantization"]["embeddings"]
    # the 1000 x 128 token table: 4 bytes a weight -> 1 (plus a scale per row)
    assert tables["bytes_before"] - tables["bytes_after"] > 0.7 * 1000 * 128 * 3, tables
    assert result.files[0].stat().st_size == tables["bytes_after"]
    runner = litert_runtime.load(str(result.files[0]), threads=1)
    outputs = [runner.run([t.numpy().astype(np.int32) for t in sample]) for sample in held_out]
    parity = compare(_reference(model, held_out), outputs, profile.tolerance_for("int8").model_dump(), ["pooled"])
    assert parity.passed, parity.summary()
    assert parity.outputs[0].cosine_min > 0.99 and parity.outputs[0].sqnr_db > 20.0


# --------------------------------------------------------------------------- sequence (transformer) shapes


class SequenceMLP(nn.Module):
    """Linears over a [batch, sequence, features] tensor, as in a transformer block: the output
    channels are the last dim, not dim 1 (sequence 6 != any feature count, so a mix-up shows)."""

    def __init__(self, act: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights whichever tests ran before
            torch.manual_seed(0)
            self.up, self.act, self.down = nn.Linear(16, 24), act(), nn.Linear(24, 8)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.up.weight.mul_(torch.logspace(-1.0, 1.0, 24).view(-1, 1))  # uneven channel ranges
            self.up.bias.uniform_(-0.5, 0.5, generator=generator)
            self.up.weight.add_(0.3)  # a weight error with a per-channel mean bias correction can remove

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def _sequences(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 6, 16, generator=generator) * 0.5 + 0.2,) for _ in range(count)]


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_equalize_linears_over_a_sequence(act):
    """Linear -> ReLU(6) -> Linear over [B, S, H] is a pair on the feature dim; calibrated ReLU6
    measures each feature's peak over batch and sequence (it once took dim 1, the sequence)."""
    model = SequenceMLP(act).eval()
    calibration = _sequences(16, 1)
    config = EqualizeConfig(relu6="calibrated") if act is nn.ReLU6 else EqualizeConfig()
    equalized, details = equalize(config, model, _stage_ctx(calibration))
    assert [(p["first"], p["second"]) for p in details["pairs"]] == [("up", "down")]
    assert details["pairs"][0]["log2_scale_mean_abs"] > 0.1  # the uneven ranges were evened out
    with torch.no_grad():
        for (x,) in calibration:
            before, after = model(x), equalized(x)
            assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())


class HeadSplit(nn.Module):
    """A view that splits the features into heads, then a linear over the head dim: channel c
    of the first linear is not input c of the second, so the pair must not be equalized."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(16, 16), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).reshape(1, 6, 4, 4))


def test_equalize_skips_a_view_that_moves_the_channels():
    model = HeadSplit().eval()
    calibration = _sequences(4, 1)
    _, details = equalize(EqualizeConfig(), model, _stage_ctx(calibration))
    assert details["pairs"] == []
