"""int8 quality: per-layer diagnosis, fallback to fp32 layers, the equalize stage, the PT2E
recipe options. Real PT2E quantization, real ExecuTorch export and runtime, small models."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError
from torch import nn

from edgepack.compress import registry
from edgepack.compress.equalize import EqualizeConfig
from edgepack.compress.equalize import run as equalize
from edgepack.compress.pt2e import Recipe, quantize_pt2e_xnnpack
from edgepack.diagnose import diagnose_pt2e
from edgepack.export import executorch as et_export
from edgepack.export.base import ExportContext
from edgepack.fallback import FallbackSettings, FallbackStep, fallback_search, rank_layers, with_float_layers
from edgepack.parity import compare
from edgepack.runtimes import executorch as et_runtime
from edgepack.spec import load_spec
from edgepack.stage import StageContext

TEST_MODELS = Path(__file__).resolve().parent / "models"
REPO = TEST_MODELS.parent.parent
# android-arm64's int8 tolerance (the profile the hostile model is built for).
INT8_TOLERANCE = {"min_cosine": 0.98, "min_sqnr_db": 14.0}


@pytest.fixture(scope="module")
def hostile():
    return load_spec(str(TEST_MODELS / "hostile.py"))


def _ctx(spec, workdir: Path, model: nn.Module | None = None) -> ExportContext:
    return ExportContext(model=model or spec.model, example_inputs=spec.example_inputs,
                         calibration=list(spec.calibration), input_names=["image"], output_names=["logits"],
                         workdir=workdir)


def _parity_in_runtime(spec, path: Path):
    """Run the .pte in the ExecuTorch runtime on the held-out inputs; parity vs torch float."""
    runner = et_runtime.load(str(path), threads=1)
    reference, outputs = [], []
    with torch.no_grad():
        for (x,) in spec.holdout:
            reference.append([spec.model(x).numpy()])
            outputs.append(runner.run([x.numpy()]))
    return compare(reference, outputs, INT8_TOLERANCE, ["logits"])


def _sqnr(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    signal = sum(float((r ** 2).sum()) for r in reference)
    noise = sum(float(((a - r) ** 2).sum()) for a, r in zip(actual, reference))
    return 10 * math.log10(signal / noise)


# --------------------------------------------------------------------------- diagnosis


def test_diagnosis_ranks_the_hostile_layer_first(tmp_path):
    """`edgepack diagnose` prints the worst layers and writes diagnosis.json and the chart."""
    from conftest import run_cli

    proc = run_cli("diagnose", str(TEST_MODELS / "hostile.py"), "--target", "android-arm64", "--out", str(tmp_path),
                   "--samples", "4", "--top", "3")
    assert proc.returncode == 0, proc.stderr
    table = [line for line in proc.stdout.splitlines() if "conv2d" in line or "linear" in line]
    assert len(table) == 3 and "hostile" in table[0]
    assert "float_layers: ['hostile', 'mix']" in proc.stderr
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["ranked"][0] == "hostile"
    worst = next(r for r in report["layers"] if r["layer"] == "hostile")
    assert worst["error_share"] > 0.5
    # its output activation is the problem, not its weights, so the layer reading it comes along
    assert worst["output_sqnr_db_activation_only"] < worst["output_sqnr_db_weights_only"]
    assert report["float_groups"][0] == ["hostile", "mix"]
    assert (tmp_path / "diagnosis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # layers come in network order with every figure filled for the quantized ones
    names = [r["layer"] for r in report["layers"]]
    assert names.index("stem") < names.index("hostile") < names.index("mix") < names.index("head")
    bad = run_cli("diagnose", str(TEST_MODELS / "hostile.py"), "--target", "android-arm64", "--samples", "0")
    assert bad.returncode == 2 and "--samples" in bad.stderr


def test_diagnosis_emulation_matches_the_converted_graph(hostile):
    """The switch-instrumented graph with everything int8 computes what convert_pt2e emits."""
    recipe = Recipe(bias_correction=False)
    report = diagnose_pt2e(hostile.model, hostile.example_inputs, hostile.calibration, recipe, samples=4)
    converted, _ = quantize_pt2e_xnnpack(hostile.model, hostile.example_inputs, hostile.calibration,
                                         bias_correction=False)
    with torch.no_grad():
        samples = list(hostile.calibration)[:4]
        reference = [hostile.model(*x) for x in samples]
        actual = [converted(*x) for x in samples]
    assert _sqnr(reference, actual) == pytest.approx(report["output"]["sqnr_db"], abs=0.05)


# --------------------------------------------------------------------------- fallback


def test_fallback_keeps_a_few_layers_float_and_passes(hostile, tmp_path):
    config = et_export.ExecuTorchArtifact(precision="int8")
    float_pte = et_export.export(et_export.ExecuTorchArtifact(precision="fp32", name="float"),
                                 _ctx(hostile, tmp_path))
    float_bytes = float_pte.files[0].stat().st_size
    ranking = rank_layers(config, hostile.model, hostile.example_inputs, list(hostile.calibration))
    assert ranking.groups[0] == ["hostile", "mix"]

    def try_export(float_layers: list[str]) -> FallbackStep:
        step_config = with_float_layers(config, float_layers)
        workdir = tmp_path / f"step{len(float_layers)}"
        workdir.mkdir()
        result = et_export.export(step_config, _ctx(hostile, workdir))
        parity = _parity_in_runtime(hostile, result.files[0])
        out = parity.outputs[0]
        return FallbackStep(float_layers=float_layers, passed=parity.passed, bytes=result.files[0].stat().st_size,
                            parity={"cosine_min": out.cosine_min, "sqnr_db": out.sqnr_db}, artifact=result)

    initial = try_export([])
    assert not initial.passed  # the hostile model fails int8 parity without fallback
    outcome = fallback_search(ranking.groups, try_export, settings=FallbackSettings(group_size=1, max_steps=3),
                              initial=initial, why=ranking.why)
    assert outcome.passed, outcome.to_dict()
    assert outcome.float_layers == ["hostile", "mix"]
    assert len(outcome.steps) == 2  # the all-int8 export, then one fallback step
    final = outcome.final
    assert final.bytes <= 0.40 * float_bytes
    # the artifact really runs the two layers in fp32 and says so
    quantization = final.artifact.details["quantization"]
    assert quantization["float_layers"] == ["hostile", "mix"]
    record = outcome.to_dict()
    assert set(record["kept_float"]) == {"hostile", "mix"} and "output activation" in record["kept_float"]["hostile"]
    json.dumps(record)  # serializable for the manifest


def test_fallback_stops_at_a_budget():
    calls = []

    def try_export(float_layers):
        calls.append(list(float_layers))
        return FallbackStep(float_layers=float_layers, passed=False, bytes=100 * (1 + len(float_layers)))

    result = fallback_search([["a", "b"], "c", "d"], try_export, settings=FallbackSettings(group_size=1),
                             budgets=type("B", (), {"max_bytes": 350, "max_latency_ms": None})())
    assert not result.passed
    assert calls == [["a", "b"], ["a", "b", "c"]]
    assert "budget" in result.reason and result.float_layers == ["a", "b"]
    assert result.final.float_layers == ["a", "b"]


def test_fallback_respects_max_float_layers_and_steps():
    def never(float_layers):
        return FallbackStep(float_layers=float_layers, passed=False, bytes=1)

    result = fallback_search(["a", "b", "c", "d", "e"], never, settings=FallbackSettings(group_size=2,
                                                                                          max_float_layers=3))
    assert result.float_layers == ["a", "b", "c"] and "max_float_layers" in result.reason
    result = fallback_search(["a", "b", "c"], never, settings=FallbackSettings(group_size=1, max_steps=2))
    assert result.float_layers == ["a", "b"] and "max_steps" in result.reason


def test_float_layers_must_name_modules(hostile, tmp_path):
    with pytest.raises(Exception, match="float_layers names no module"):
        et_export.export(et_export.ExecuTorchArtifact(precision="int8", float_layers=["nope"]),
                         _ctx(hostile, tmp_path))
    with pytest.raises(ValidationError, match="only applies to precision int8"):
        et_export.ExecuTorchArtifact(precision="fp32", float_layers=["stem"])


# --------------------------------------------------------------------------- equalize


class SeparableNet(nn.Module):
    """Depthwise-separable blocks with very uneven per-channel weight ranges."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights whichever tests ran before
            torch.manual_seed(0)
            self._layers(act)

    def _layers(self, act: type[nn.Module]) -> None:
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.pw2 = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 10)
        self.act = act()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for bn in (self.stem_bn, self.dw_bn):
                bn.running_mean.uniform_(-0.2, 0.2, generator=generator)
                bn.running_var.uniform_(0.5, 2.0, generator=generator)
            # per-channel ranges spread over ~3 decades: what hurts per-tensor weights
            self.dw.weight.mul_(torch.logspace(-1.5, 1.5, 16).view(-1, 1, 1, 1))
            self.dw2.weight.mul_(torch.logspace(1.5, -1.5, 24).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        x = self.act(self.dw_bn(self.dw(x)))
        x = self.act(self.pw(x))
        x = self.act(self.dw2(x))
        x = self.act(self.pw2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _images(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    batch = (nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) - 0.45) / 0.25
    return [(batch[i:i + 1],) for i in range(count)]


def _stage_ctx(calibration) -> StageContext:
    return StageContext(example_inputs=calibration[0], calibration=calibration, teacher=nn.Identity())


@pytest.mark.parametrize("act", [nn.ReLU, nn.ReLU6])
def test_equalize_preserves_float_outputs(act):
    model = SeparableNet(act).eval()
    calibration, held_out = _images(16, 1), _images(16, 2)
    equalized, details = equalize(EqualizeConfig(), model, _stage_ctx(calibration))
    with torch.no_grad():
        for (x,) in held_out:
            before, after = model(x), equalized(x)
            assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())
    if act is nn.ReLU:
        assert len(details["pairs"]) == 5, details  # stem-dw, dw-pw, pw-dw2, dw2-pw2, pw2-fc (via the pool)
    else:  # exact mode leaves pairs joined by ReLU6 alone and says so
        assert details["pairs"] == [] and len(details["skipped"]) == 5
        assert all("clip at 6" in reason for reason in details["skipped"])
    assert model.dw.weight is not equalized.dw.weight  # the stage works on a copy


def test_equalize_improves_int8():
    model = SeparableNet(nn.ReLU).eval()
    calibration, held_out = _images(32, 1), _images(16, 2)
    equalized, _ = equalize(EqualizeConfig(), model, _stage_ctx(calibration))
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for name, candidate in (("plain", model), ("equalized", equalized)):
        converted, _ = quantize_pt2e_xnnpack(candidate, calibration[0], calibration, per_channel=False,
                                             bias_correction=False)
        with torch.no_grad():
            figures[name] = _sqnr(reference, [converted(x) for (x,) in held_out])
    assert figures["equalized"] > figures["plain"] + 1.5, figures  # measured: 32.1 -> 35.0 dB


def test_equalize_is_registered_validated_and_round_trips():
    entry = registry()["equalize"]
    assert entry.config is EqualizeConfig
    with pytest.raises(ValidationError, match="headroom only applies"):
        EqualizeConfig(headroom=0.5)
    config = EqualizeConfig(relu6="calibrated", headroom=0.5, iterations=2)
    assert EqualizeConfig.model_validate(config.model_dump(mode="json")) == config
    with pytest.raises(ValidationError):
        EqualizeConfig.model_validate({"type": "equalize", "unknown": 1})


def test_recipe_options_round_trip():
    config = et_export.ExecuTorchArtifact(precision="int8", activation_observer="mse", fuse_clamp=False,
                                          float_layers=["a.b", "c"], bias_correction=False)
    assert et_export.ExecuTorchArtifact.model_validate(config.model_dump(mode="json")) == config
    assert with_float_layers(config, ["c", "d"]).float_layers == ("a.b", "c", "d")


def test_equalize_calibrated_relu6_keeps_calibration_outputs():
    model = SeparableNet(nn.ReLU6).eval()
    calibration = _images(16, 1)
    equalized, details = equalize(EqualizeConfig(relu6="calibrated"), model, _stage_ctx(calibration))
    assert any(p["activation"] == "relu6" for p in details["pairs"])
    with torch.no_grad():
        for (x,) in calibration:
            before, after = model(x), equalized(x)
            assert float((after - before).abs().max()) <= 1e-4 * float(before.abs().max())


# --------------------------------------------------------------------------- recipe options


def test_observer_options_give_different_valid_artifacts(tmp_path):
    model = SeparableNet(nn.ReLU6).eval()
    calibration, held_out = _images(16, 1), _images(8, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    files = {}
    for observer in ("minmax", "percentile", "mse"):
        config = et_export.ExecuTorchArtifact(precision="int8", activation_observer=observer, name=observer)
        ctx = ExportContext(model=model, example_inputs=calibration[0], calibration=calibration,
                            input_names=["x"], output_names=["y"], workdir=tmp_path)
        result = et_export.export(config, ctx)
        assert result.details["quantization"]["activation_observer"] == observer
        assert result.details["delegates"] >= 1
        runner = et_runtime.load(str(result.files[0]), threads=1)
        got = [torch.from_numpy(runner.run([x.numpy()])[0]) for (x,) in held_out]
        assert _sqnr(reference, got) > 15.0, observer
        files[observer] = result.files[0].read_bytes()
    assert len(set(files.values())) == 3, "each observer should give its own activation scales"


def test_every_observer_chooses_its_own_ranges():
    from edgepack.compress.pt2e import prepare_calibrated
    from edgepack.diagnose import _is_observer

    model = SeparableNet(nn.ReLU6).eval()
    calibration = _images(8, 1)
    chosen = {}
    for observer in ("minmax", "moving-average", "histogram", "percentile", "mse"):
        prepared, used = prepare_calibrated(model, calibration[0], calibration,
                                            Recipe(activation_observer=observer, calibration_samples=8))
        assert used == 8
        scales = [float(m.calculate_qparams()[0].flatten()[0]) for _, m in sorted(prepared.named_modules())
                  if _is_observer(m) and m.qscheme == torch.per_tensor_affine]
        assert scales and all(math.isfinite(v) and v > 0 for v in scales), observer
        chosen[observer] = tuple(round(v, 7) for v in scales)
    assert len(set(chosen.values())) == 5, chosen


def test_clamp_fusion_and_bias_correction_help_relu6_nets():
    """The stock XNNPACK recipe observes ReLU6 outputs with the conv's pre-activation scale."""
    model = SeparableNet(nn.ReLU6).eval()
    calibration, held_out = _images(32, 1), _images(16, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for name, options in (("stock", {"fuse_clamp": False, "activation_observer": "histogram",
                                     "bias_correction": False}),
                          ("fused", {"bias_correction": False}), ("default", {})):
        converted, record = quantize_pt2e_xnnpack(model, calibration[0], calibration, **options)
        with torch.no_grad():
            figures[name] = _sqnr(reference, [converted(x) for (x,) in held_out])
    assert figures["fused"] > figures["stock"], figures
    assert figures["default"] >= figures["fused"] - 0.5, figures
    assert record["bias_correction"]["corrected_layers"] >= 4


def test_tflite_shares_the_recipe_and_float_layers(hostile, tmp_path):
    pytest.importorskip("litert_torch", reason="litert-torch is not installed")
    from edgepack.export import tflite
    from edgepack.runtimes import litert

    config = tflite.TFLiteArtifact(precision="int8", float_layers=["hostile", "mix"])
    result = tflite.export(config, _ctx(hostile, tmp_path))
    quantization = result.details["quantization"]
    assert quantization["float_layers"] == ["hostile", "mix"] and quantization["clamp_fusion"] is True
    assert quantization["bias_correction"]["corrected_layers"] >= 4
    assert result.details["float_compute_ops"] == {"CONV_2D": 2}  # exactly the two fp32 layers
    runner = litert.load(str(result.files[0]), threads=1)
    reference, outputs = [], []
    with torch.no_grad():
        for (x,) in hostile.holdout:
            reference.append([hostile.model(x).numpy()])
            outputs.append(runner.run([x.numpy()]))
    assert compare(reference, outputs, INT8_TOLERANCE, ["logits"]).passed
    with pytest.raises(ValidationError, match="only applies to precision int8 with the pt2e quantizer"):
        tflite.TFLiteArtifact(precision="int8", quantizer="ai-edge-quantizer", float_layers=["hostile"])


# --------------------------------------------------------------------------- fallback in a build


def _hostile_profile(tmp_path: Path, **changes) -> Path:
    from conftest import write_profile

    data = yaml.safe_load((REPO / "targets" / "android-arm64.yaml").read_text())
    pte = next(a for a in data["artifacts"] if a["format"] == "pte")
    name = changes.pop("name", "arm64-pte")
    return write_profile(tmp_path, "android-arm64", name=name, artifacts=[pte], **changes)


def test_build_fails_int8_parity_without_fallback_and_a_budget_stops_the_fallback(tmp_path):
    """Without fallback the hostile model fails int8 parity. With fallback but a byte budget the
    all-int8 artifact meets and a fallback step would not, the build still fails on parity, keeps
    the last artifact within budget and says the budget stopped the search."""
    from conftest import run_cli

    profile = _hostile_profile(tmp_path)
    proc = run_cli("build", str(TEST_MODELS / "hostile.py"), "--target", str(profile), "--out", str(tmp_path / "dist"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 1, proc.stderr
    assert "model.pte (pte, int8): parity failed" in proc.stderr
    entry = json.loads(proc.stdout)["artifacts"][0]
    assert entry["status"] == "parity-failed" and "fallback" not in entry["export"]
    assert (tmp_path / "dist" / "hostile-cnn" / "arm64-pte.failed" / "manifest.json").is_file()

    int8_bytes = entry["bytes"]
    profile = _hostile_profile(tmp_path, name="arm64-budget", on_parity_failure="fallback",
                               budgets={"max_bytes": int8_bytes + 16})
    proc = run_cli("build", str(TEST_MODELS / "hostile.py"), "--target", str(profile), "--out", str(tmp_path / "d"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 1
    entry = json.loads(proc.stdout)["artifacts"][0]
    assert entry["status"] == "parity-failed"
    fallback = entry["export"]["fallback"]
    assert "budget" in fallback["reason"] and fallback["steps"][-1]["budget_failures"]
    assert entry["bytes"] == int8_bytes and entry["config"]["float_layers"] == []  # the last one within budget


def test_build_with_fallback_keeps_the_hostile_layer_float(tmp_path):
    from conftest import run_cli

    profile = _hostile_profile(tmp_path, on_parity_failure="fallback", fallback={"group_size": 1, "max_steps": 3})
    out = tmp_path / "dist"
    proc = run_cli("build", str(TEST_MODELS / "hostile.py"), "--target", str(profile), "--out", str(out),
                   "--json", "--quiet", "--no-zip")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    entry = manifest["artifacts"][0]
    assert entry["status"] == "ok" and manifest["status"] == "passed"
    fallback = entry["export"]["fallback"]
    assert fallback["passed"] and fallback["float_layers"] == ["hostile", "mix"]
    assert fallback["ranked_layers"][0] == "hostile"
    assert "output activation" in fallback["kept_float"]["hostile"]
    # two steps: the all-int8 artifact that failed, then one with the first group in fp32; each step's cost
    first, second = fallback["steps"]
    assert not first["passed"] and first["float_layers"] == []
    assert second["passed"] and second["added"] == ["hostile", "mix"]
    assert second["bytes"] >= first["bytes"] and second["latency_ms"] > 0
    assert second["parity"]["cosine_min"] > first["parity"]["cosine_min"]
    # what ships is that artifact: its config and quantization record name the float layers,
    # it passed parity in the ExecuTorch runtime, it is small, and its bytes were reproducible
    assert entry["config"]["float_layers"] == ["hostile", "mix"]
    assert entry["export"]["quantization"]["float_layers"] == ["hostile", "mix"]
    assert entry["parity"]["passed"] and entry["size"]["ratio_to_float"] <= 0.40
    assert entry["reproducible"]["reproducible"]
    assert any("kept 2 layer(s) in fp32" in note for note in entry["notes"])
    bundle = out / "hostile-cnn" / "arm64-pte"
    assert (bundle / "model.pte").stat().st_size == entry["bytes"]
