"""steps/speed.py: a quantized artifact and its float sibling timed side by side, in alternating
rounds, and the slower_than_float policy applied to what that measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli, write_profile
from edgepack.export.onnx import OnnxArtifact
from edgepack.steps.speed import compare_with_float, main_path, side_by_side
from test_judge import _judge

TEST_MODELS = Path(__file__).resolve().parent / "models"


def test_side_by_side_runs_both_in_alternating_rounds(tmp_path):
    judge = _judge(tmp_path)
    entries = [judge.judge(OnnxArtifact(precision=p, name=f"m_{p}")) for p in ("fp32", "int8")]
    result = side_by_side(judge, "onnx", judge.staged / main_path(entries[1]), judge.staged / main_path(entries[0]),
                          judge.reference.inputs[0])
    assert result["p50_ms"] > 0 and result["float_p50_ms"] > 0
    assert len(result["round_speedups"]) == judge.profile.latency.comparison_rounds
    assert "alternating rounds" in result["method"]


def test_the_policy_acts_on_the_measured_ratio(tmp_path):
    """conv_stack's int8-dynamic ONNX (ConvInteger) runs several times slower than fp32 on x86:
    warn records the finding and ships it; keep_float drops its files and points at the float one."""
    from edgepack.target import LatencySettings, Tolerance

    tolerances = {"fp32": Tolerance(atol=1e-4, rtol=1e-3, min_cosine=0.9999), "int8-dynamic": Tolerance(min_cosine=0.99)}
    for policy in ("warn", "keep_float"):
        judge = _judge(tmp_path / policy, model="conv_stack.py", slower_than_float=policy, tolerances=tolerances,
                       latency=LatencySettings(warmup=2, runs=20, comparison_rounds=2))
        configs = [OnnxArtifact(precision="fp32", name="model"), OnnxArtifact(precision="int8-dynamic", name="dyn")]
        entries = [judge.judge(c) for c in configs]
        compare_with_float(judge, configs, entries, tmp_path / policy)
        comparison = entries[1].latency["float_comparison"]
        assert comparison["float_source"] == "artifact model.onnx" and comparison["speedup_vs_float"] < 1.0, comparison
        assert "float_comparison" not in entries[0].latency  # the float artifact itself is not compared
        finding = "dyn.onnx: int8-dynamic is not faster than float on this host"
        if policy == "warn":
            assert entries[1].status == "ok" and finding in judge.findings.warnings[-1]
            assert (judge.staged / "dyn.onnx").is_file()
        else:
            assert entries[1].status == "replaced-by-float" and entries[1].files == [] and entries[1].golden is None
            assert not (judge.staged / "dyn.onnx").exists() and "use model.onnx" in entries[1].notes[-1]
@pytest.mark.parametrize("policy", ["warn", "fail", "keep_float"])
def test_slower_than_float_policy(policy, tmp_path):
    """conv_stack's int8-dynamic ONNX (ConvInteger) runs ~9x slower than fp32 here, measured side
    by side in the build; the profile's slower_than_float decides what the build does about it."""
    profile = write_profile(
        tmp_path, "x86-64", name=f"x86-{policy}", slower_than_float=policy,
        artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"},
                   {"name": "model_dyn", "format": "onnx", "precision": "int8-dynamic"}],
        tolerances={"fp32": {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999},
                    "int8-dynamic": {"min_cosine": 0.99, "min_sqnr_db": 20.0}})
    out = tmp_path / "dist"
    proc = run_cli("build", str(TEST_MODELS / "conv_stack.py"), "--target", str(profile), "--out", str(out),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    manifest = json.loads(proc.stdout)
    dynamic = next(a for a in manifest["artifacts"] if a["name"] == "model_dyn")
    comparison = dynamic["latency"]["float_comparison"]
    assert comparison["float_source"] == "artifact model.onnx" and comparison["speedup_vs_float"] < 1.0, comparison
    assert dynamic["parity"]["passed"]
    finding = "model_dyn.onnx: int8-dynamic is not faster than float on this host"
    bundle = out / "conv-stack" / f"x86-{policy}"
    if policy == "fail":
        assert proc.returncode == 1 and finding in proc.stderr
        assert dynamic["status"] == "slower-than-float" and manifest["status"] == "failed"
        assert not bundle.exists() and (bundle.parent / f"x86-{policy}.failed" / "model_dyn.onnx").is_file()
        return
    assert proc.returncode == 0, proc.stderr
    assert manifest["status"] == "passed"
    assert any(finding in note for note in dynamic["notes"])
    assert any(finding in warning for warning in manifest["warnings"])
    if policy == "warn":
        assert dynamic["status"] == "ok" and (bundle / "model_dyn.onnx").is_file()
    else:
        assert dynamic["status"] == "replaced-by-float" and dynamic["files"] == [] and dynamic["golden"] is None
        assert not (bundle / "model_dyn.onnx").exists() and (bundle / "model.onnx").is_file()
        assert not list((bundle / "golden").glob("model_dyn*"))
