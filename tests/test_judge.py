"""steps/judge.py: one artifact exported, run in its runtime on the parity set, judged against the
float reference, with golden I/O written, budgets checked and failures recorded in Findings."""

from __future__ import annotations

import json
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


def _judge(tmp_path: Path, model: str = "two_io.py", samples: int = 4, **profile_changes) -> ArtifactJudge:
    spec = load_spec(str(TEST_MODELS / model))
    profile = load_target("x86-64")
    if profile_changes:
        profile = profile.model_copy(update=profile_changes)
    staged = tmp_path / "bundle"
    staged.mkdir(parents=True)
    names = spec.resolved_input_names()
    outputs = spec.resolved_output_names(len(spec.output_names) if spec.output_names else 1)
    reference_onnx = export_float_onnx(spec.model, spec.example_inputs, tmp_path / "ref.onnx", names, outputs)[0]
    inputs = [as_numpy(s) for s in list(spec.calibration)[:samples]]
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


def test_an_export_error_is_recorded_not_raised(tmp_path):
    """An exporter failure becomes a failed entry and exit code 3 in Findings: the build then
    writes its .failed report with what passed (pipeline.py stops unless --keep-going)."""
    judge = _judge(tmp_path)
    judge.ctx.calibration = []  # static int8 with nothing to calibrate on
    entry = judge.judge(OnnxArtifact(precision="int8"))
    assert entry.status == "failed" and "no calibration samples" in entry.error
    assert judge.findings.exit_code == EXIT_EXPORT_OR_RUNTIME


# --- on_static_int8_failure: dynamic ---------------------------------------------------------

def test_a_static_int8_failure_ships_int8_dynamic_when_the_profile_says_so(tmp_path):
    """tests/models/scale_varying.py: inputs three decades apart in scale. Static int8 ranges are
    set by the loud samples and the quietest round to zero; int8-dynamic quantizes each call with
    its own range. Measured on 32 samples, cosine min / mean: static 0.00 / 0.80 in onnxruntime,
    ExecuTorch and LiteRT alike; dynamic 0.9996 (onnxruntime), 0.9999 (ExecuTorch, LiteRT)."""
    failing = _judge(tmp_path / "fail", model="scale_varying.py", samples=16, on_static_int8_failure="fail")
    entry = failing.judge(OnnxArtifact(precision="int8", name="model_int8"))
    assert entry.status == "parity-failed" and "dynamic_fallback" not in entry.export
    # the key's default is fail; the shipped x86-64 and android-arm64 profiles say dynamic
    from edgepack.target import profile_model

    assert profile_model().model_fields["on_static_int8_failure"].default == "fail"
    assert {load_target(name).on_static_int8_failure for name in ("x86-64", "android-arm64")} == {"dynamic"}

    judge = _judge(tmp_path / "dynamic", model="scale_varying.py", samples=16, on_static_int8_failure="dynamic")
    entry = judge.judge(OnnxArtifact(precision="int8", name="model_int8"))
    assert entry.status == "ok" and judge.findings.exit_code == 0 and judge.findings.failures == []
    assert entry.precision == entry.config["precision"] == "int8-dynamic"
    assert entry.config["calibration_method"] == "minmax" and entry.config["reduce_range"]  # kept what applies
    assert entry.export["quantization"]["method"] == "onnxruntime.quantize_dynamic"
    assert entry.parity["thresholds"] == judge.profile.tolerance_for("int8").model_dump(exclude_none=True)
    record = entry.export["dynamic_fallback"]
    assert record["passed"] and record["shipped"] == "int8-dynamic" and record["tolerance"] == "int8"
    static, dynamic = record["tried"]
    assert static["precision"] == "int8" and static["status"] == "parity-failed"
    assert static["parity"]["cosine_min"] < 0.93 and any("cosine min" in f for f in static["failures"])
    assert dynamic["status"] == "ok" and dynamic["parity"]["cosine_min"] > 0.999 and dynamic["failures"] == []
    json.dumps(record)
    # the file in the bundle is the dynamic one (integer MatMuls, no QDQ pairs), with its golden I/O
    import onnx

    ops = {node.op_type for node in onnx.load(str(judge.staged / "model_int8.onnx")).graph.node}
    assert "MatMulInteger" in ops and "QuantizeLinear" not in ops
    assert entry.sha256 and entry.reproducible.reproducible
    for golden in (entry.golden.inputs, entry.golden.outputs):
        assert (judge.staged / golden).is_file()
    (warning,) = judge.findings.warnings
    assert "static int8 failed parity" in warning and "shipped int8-dynamic" in warning
    assert warning in entry.notes


def test_when_int8_dynamic_fails_too_the_static_artifact_is_reported(tmp_path):
    from edgepack.target import Tolerance

    strict = Tolerance(min_cosine=0.999999, min_sqnr_db=90.0)
    judge = _judge(tmp_path, model="scale_varying.py", samples=16, on_static_int8_failure="dynamic",
                   tolerances={"fp32": Tolerance(atol=1e-4, rtol=1e-3), "int8": strict})
    entry = judge.judge(OnnxArtifact(precision="int8", name="model_int8"))
    assert entry.status == "parity-failed" and entry.precision == "int8"
    assert judge.findings.exit_code == EXIT_PARITY_OR_BUDGET
    assert judge.findings.failures[0].startswith("model_int8.onnx (onnx, int8): parity failed")
    record = entry.export["dynamic_fallback"]
    assert not record["passed"] and record["shipped"] == "int8"
    assert [t["status"] for t in record["tried"]] == ["parity-failed", "parity-failed"]
    assert "int8-dynamic did not pass either" in entry.notes[-1]
    import onnx

    ops = {node.op_type for node in onnx.load(str(judge.staged / "model_int8.onnx")).graph.node}
    assert "QuantizeLinear" in ops  # the static file stayed; the dynamic one was made aside


def test_a_mostly_float_dynamic_form_is_not_shipped_as_int8(tmp_path):
    """tests/models/hostile.py (a CNN) fails static int8 in ExecuTorch; XNNPACK's dynamic quantizer
    leaves its convolutions fp32, so its int8-dynamic .pte passes parity as a float model would,
    at several times the static bytes: that is not an int8 artifact, and the static failure stands."""
    from edgepack.export.executorch import ExecuTorchArtifact
    from edgepack.steps.judge import DYNAMIC_MAX_GROWTH
    from edgepack.target import Tolerance

    judge = _judge(tmp_path, model="hostile.py", samples=16, on_static_int8_failure="dynamic",
                   tolerances={"int8": Tolerance(min_cosine=0.98, min_sqnr_db=14.0)})
    judge.check_reproducible = False  # one export each: this test is about what ships
    entry = judge.judge(ExecuTorchArtifact(precision="int8", activation_observer="minmax", bias_correction=False))
    assert entry.status == "parity-failed" and entry.precision == "int8"
    static, dynamic = entry.export["dynamic_fallback"]["tried"]
    assert dynamic["status"] == "ok" and dynamic["bytes"] > DYNAMIC_MAX_GROWTH * static["bytes"]
    assert "left much of the model in float" in dynamic["failures"][0]
    assert not entry.export["dynamic_fallback"]["passed"] and judge.findings.warnings == []


def test_int8_dynamic_form_keeps_what_applies_and_resets_static_only_settings():
    from edgepack.export.executorch import ExecuTorchArtifact
    from edgepack.export.tflite import TFLiteArtifact

    onnx_config = OnnxArtifact(precision="int8", quantizer="onnxruntime", calibration_method="entropy",
                               reduce_range=False, name="m")
    assert onnx_config.int8_dynamic_form() == OnnxArtifact(precision="int8-dynamic", reduce_range=False, name="m")
    pte = ExecuTorchArtifact(precision="int8", activation_observer="histogram", float_layers=("a",),
                             bias_correction=False, embeddings="int8")
    assert pte.int8_dynamic_form() == ExecuTorchArtifact(precision="int8-dynamic", embeddings="int8")
    tflite = TFLiteArtifact(precision="int8", io="int8", fuse_clamp=False)
    assert tflite.int8_dynamic_form() == TFLiteArtifact(precision="int8-dynamic")
    for config in (OnnxArtifact(precision="fp32"), OnnxArtifact(precision="int8-dynamic"),
                   ExecuTorchArtifact(precision="int4-weight"), TFLiteArtifact(precision="fp16")):
        assert config.int8_dynamic_form() is None


# --- no dead ends: real models that once stopped a build -------------------------------------

def _android(tmp_path: Path, **changes) -> Path:
    from conftest import write_profile

    return write_profile(tmp_path, "android-arm64", name=changes.pop("name", "arm64-test"), **changes)


def test_a_gru_builds_for_android_with_the_tflite_made_by_ai_edge_quantizer(tmp_path):
    """litert-torch's PT2E path fails on a GRU; quantizer: auto falls back to ai-edge-quantizer and
    says so. Both int8 artifacts come out larger than float: the build states it."""
    from conftest import run_cli

    proc = run_cli("build", str(TEST_MODELS / "gru.py"), "--target", str(_android(tmp_path)), "--out",
                   str(tmp_path / "dist"), "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)
    tflite = next(a for a in manifest["artifacts"] if a["format"] == "tflite")
    quantization = tflite["export"]["quantization"]
    assert quantization["quantizer"] == "ai-edge-quantizer" and quantization["fallback_from"] == "pt2e"
    assert "IndexError" in quantization["fallback_reason"] and tflite["parity"]["passed"]
    assert any("larger" in w or "x the float model's bytes" in w for w in manifest["warnings"])
    assert "Running Calibration" not in proc.stderr  # ai-edge-quantizer's progress bars stay out


def test_an_artifact_larger_than_float_fails_a_max_ratio_budget(tmp_path):
    from conftest import run_cli

    profile = _android(tmp_path, name="arm64-ratio", budgets={"max_ratio_to_float": 1.0})
    proc = run_cli("build", str(TEST_MODELS / "gru.py"), "--target", str(profile), "--out", str(tmp_path / "dist"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 1 and "max_ratio_to_float 1.0" in proc.stderr


def test_nothing_to_quantize_ships_fp32_and_an_export_error_still_writes_the_report(tmp_path):
    """An FFT model: int8 has nothing to quantize, so (unquantizable: keep_float) the .tflite ships
    fp32 with a warning; the .pte cannot hold complex tensors at all: one clear line, and the
    build still writes its .failed report with what passed (exit 3), stopping at the failure."""
    from conftest import run_cli

    profile = _android(tmp_path, name="arm64-fft")
    data = __import__("yaml").safe_load(profile.read_text())
    data["artifacts"] = list(reversed(data["artifacts"]))  # the .tflite first, then the .pte
    profile.write_text(__import__("yaml").safe_dump(data))
    proc = run_cli("build", str(TEST_MODELS / "fft.py"), "--target", str(profile), "--out", str(tmp_path / "dist"),
                   "--json", "--quiet", "--no-zip", "--no-repro-check")
    assert proc.returncode == 3, proc.stderr
    assert "complex tensors (torch.fft, torch.complex) are not supported by ExecuTorch's .pte" in proc.stderr
    failed = tmp_path / "dist" / "spectrum" / "arm64-fft.failed"
    manifest = json.loads((failed / "manifest.json").read_text())
    tflite, pte = manifest["artifacts"]
    assert tflite["status"] == "ok" and tflite["precision"] == "fp32" and (failed / "model.tflite").is_file()
    assert any("nothing to quantize" in w for w in manifest["warnings"])
    assert pte["status"] == "failed" and "complex tensors" in pte["error"]


def test_a_failed_float_baseline_leaves_the_artifact_and_says_why(tmp_path, monkeypatch):
    """The fp32 baseline exported only to time a quantized artifact against is auxiliary: when it
    cannot be made, the comparison is recorded as unavailable and the artifact stands."""
    from edgepack.steps import speed

    def no_baseline(judge, config, scratch):
        raise ExportError("onnx: torch.onnx.export failed on op aten.fft_r2c")

    monkeypatch.setattr(speed, "export_float_baseline", no_baseline)
    judge = _judge(tmp_path)
    configs = [OnnxArtifact(precision="int8", name="model_int8")]
    entries = [judge.judge(configs[0])]
    speed.compare_with_float(judge, configs, entries, tmp_path)
    assert entries[0].status == "ok"
    assert entries[0].latency["float_comparison"] == {"unavailable": "onnx: torch.onnx.export failed on op aten.fft_r2c"}
    assert "no speed comparison with float" in judge.findings.warnings[-1]


def test_an_export_stops_the_other_runtimes_idle_servers_and_starts_them_again_after(tmp_path):
    """What keeps an idle ExecuTorch server (~310 MB) out of a MobileNetV2 .tflite export: the
    export's own runtime keeps its server, the others get new ones once the export is done."""
    from edgepack.runtimes import forkserver

    if not forkserver.use_fork_server():
        pytest.skip("fork servers run on Linux only")
    forkserver.stop_fork_servers()
    try:
        judge = _judge(tmp_path)  # runs the reference in onnxruntime: its server is up
        forkserver.prestart("litert", 1)
        before = set(forkserver.fork_server_pids())
        judge.export(OnnxArtifact(precision="fp32", name="model"), judge.ctx)
        after = set(forkserver.fork_server_pids())
        assert len(before) == len(after) == 2 and len(before & after) == 1  # onnxruntime's kept, litert's new
        judge.export(OnnxArtifact(precision="fp32", name="again"), judge.ctx, pause_runtimes=False)
        assert set(forkserver.fork_server_pids()) == after
    finally:
        forkserver.stop_fork_servers()
