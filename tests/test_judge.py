"""steps/judge.py: one artifact exported, run in its runtime on the parity set, judged against the
float reference, with golden I/O written, budgets checked and failures recorded in Findings."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgepack.errors import EXIT_EXPORT_OR_RUNTIME, EXIT_PARITY_OR_BUDGET, ExportError
from edgepack.export.base import ExportContext
from edgepack.export.onnx import OnnxArtifact
from edgepack.export.onnx_float import export_float_onnx
from edgepack.runtimes.session import RuntimeSession
from edgepack.spec import as_numpy, load_spec
from edgepack.steps.judge import ArtifactJudge, Findings, Reference
from edgepack.target import load_target

TEST_MODELS = Path(__file__).resolve().parent / "models"


def _judge(tmp_path: Path, model: str = "two_io.py", **profile_changes) -> ArtifactJudge:
    spec = load_spec(str(TEST_MODELS / model))
    profile = load_target("x86-64")
    if profile_changes:
        profile = profile.model_copy(update=profile_changes)
    staged = tmp_path / "bundle"
    staged.mkdir(parents=True)
    names = spec.resolved_input_names()
    outputs = spec.resolved_output_names(len(spec.output_names) if spec.output_names else 1)
    reference_onnx = export_float_onnx(spec.model, spec.example_inputs, tmp_path / "ref.onnx", names, outputs)[0]
    inputs = [as_numpy(s) for s in list(spec.calibration)[:4]]
    with RuntimeSession("onnxruntime", reference_onnx, 1) as session:
        reference = [session.run(x) for x in inputs]
    ctx = ExportContext(model=spec.model, example_inputs=spec.example_inputs, calibration=list(spec.calibration),
                        input_names=names, output_names=outputs, workdir=staged, reference_onnx=reference_onnx)
    return ArtifactJudge(profile=profile, ctx=ctx, staged=staged,
                         reference=Reference(inputs, reference, outputs, reference_onnx.stat().st_size),
                         findings=Findings(), say=lambda message: None, threads=1, check_reproducible=True,
                         score_outputs=list(spec.score_outputs) if spec.score_outputs else None)


def test_an_artifact_is_run_judged_and_recorded(tmp_path):
    judge = _judge(tmp_path)
    entry = judge.judge(OnnxArtifact(precision="int8", name="model_int8"))
    assert entry.status == "ok" and judge.findings.failures == [] and judge.findings.exit_code == 0
    assert entry.parity["passed"] and entry.parity["samples"] == 4
    assert [o["name"] for o in entry.parity["outputs"]] == ["scores", "embedding"]
    assert entry.parity["outputs"][0]["top1_agreement"] is not None and entry.parity["outputs"][1]["top1_agreement"] is None
    assert entry.reproducible.reproducible and entry.size["bytes"] == (judge.staged / "model_int8.onnx").stat().st_size
    assert entry.latency["source"] == "host" and entry.latency["p50_ms"] > 0 and entry.latency["device_estimate"]
    for golden in (entry.golden.inputs, entry.golden.outputs):
        assert (judge.staged / golden).is_file()
    assert (judge.staged / "model_int8.onnx").is_file() and entry.budgets is None


def test_a_budget_the_artifact_exceeds_fails_it(tmp_path):
    from edgepack.target import Budgets

    judge = _judge(tmp_path, budgets=Budgets(max_bytes=100))
    entry = judge.judge(OnnxArtifact(precision="fp32", name="model"))
    assert entry.status == "budget-exceeded" and entry.budgets["failures"][0].endswith("> max_bytes 100")
    assert judge.findings.exit_code == EXIT_PARITY_OR_BUDGET
    assert judge.findings.failures[0].startswith("model.onnx (onnx, fp32): budget exceeded")


def test_an_export_error_raises_or_is_recorded_with_keep_going(tmp_path):
    judge = _judge(tmp_path)
    judge.ctx.calibration = []  # static int8 with nothing to calibrate on
    with pytest.raises(ExportError, match="no calibration samples"):
        judge.judge(OnnxArtifact(precision="int8"))
    judge.keep_going = True
    entry = judge.judge(OnnxArtifact(precision="int8"))
    assert entry.status == "failed" and "no calibration samples" in entry.error
    assert judge.findings.exit_code == EXIT_EXPORT_OR_RUNTIME
