"""analysis/fallback.py: the fp32 fallback search, alone (format-agnostic callback) and in a build."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from edgepack.analysis.fallback import FallbackStep, fallback_search, rank_layers, with_float_layers
from edgepack.export import executorch as et_export
from edgepack.target import Budgets, FallbackSettings
from int8_support import REPO, TEST_MODELS, export_ctx, parity_in_runtime


def test_fallback_keeps_a_few_layers_float_and_passes(hostile, tmp_path):
    config = et_export.ExecuTorchArtifact(precision="int8")
    float_pte = et_export.export(et_export.ExecuTorchArtifact(precision="fp32", name="float"),
                                 export_ctx(hostile, tmp_path))
    float_bytes = float_pte.files[0].stat().st_size
    ranking = rank_layers(config, hostile.model, hostile.example_inputs, list(hostile.calibration))
    assert ranking.groups[0] == ["hostile", "mix"]

    def try_export(float_layers: list[str]) -> FallbackStep:
        step_config = with_float_layers(config, float_layers)
        workdir = tmp_path / f"step{len(float_layers)}"
        workdir.mkdir()
        result = et_export.export(step_config, export_ctx(hostile, workdir))
        parity = parity_in_runtime(hostile, result.files[0])
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
                             budgets=Budgets(max_bytes=350))
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
