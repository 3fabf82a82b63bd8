"""steps/lane.py: the second export process of a build. Its exports are the real exporters run
in a separate interpreter on the model sent there; they must give the bytes the build's own
process gives, fail with the exporter's own error, stop while the build times a runtime, and
feed the reproducibility record and the build cache."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch

from edgepack.cache import BuildCache
from edgepack.errors import ExportError
from edgepack.export.base import ExportContext
from edgepack.export.executorch import ExecuTorchArtifact
from edgepack.export.onnx import OnnxArtifact, export as onnx_export
from edgepack.export.tflite import TFLiteArtifact
from edgepack.measure import quiet_host
from edgepack.package import LANE_REPRO_METHOD
from edgepack.spec import load_spec
from edgepack.measure import lane_jobs
from edgepack.steps.lane import ExportLane, collect_reproducibility, lane_wanted
from edgepack.target import load_target

from int8_support import ChainedResidual
from test_judge import _judge

TEST_MODELS = Path(__file__).resolve().parent / "models"


def _ctx(tmp_path: Path, model: str = "two_io.py") -> ExportContext:
    spec = load_spec(str(TEST_MODELS / model))
    return ExportContext(model=spec.model, example_inputs=spec.example_inputs, calibration=list(spec.calibration),
                         input_names=spec.resolved_input_names(),
                         output_names=spec.resolved_output_names(len(spec.output_names or [None])),
                         workdir=tmp_path / "first")


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def test_the_lane_exports_the_bytes_the_build_process_does_and_reports_the_exporters_error(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.workdir.mkdir()
    config = OnnxArtifact(precision="int8", name="model_int8")
    here = onnx_export(config, ctx).files[0]
    lane, why = ExportLane.start(ctx, jobs=2)
    assert lane is not None, why
    try:
        lane.submit("model_int8.onnx", config, tmp_path / "lane")
        there = lane.result("model_int8.onnx").files[0]
        assert there.parent == tmp_path / "lane" and there.read_bytes() == here.read_bytes()
    finally:
        lane.close()
    assert lane.process.poll() is not None  # closed: the process is gone

    fft = _ctx(tmp_path, "fft.py")
    lane, why = ExportLane.start(fft, jobs=2)
    try:
        lane.submit("fft.pte", ExecuTorchArtifact(precision="fp32", name="fft"), tmp_path / "fft")
        with pytest.raises(ExportError) as raised:
            lane.result("fft.pte")
        assert "complex tensors" in raised.value.message and raised.value.hint
    finally:
        lane.close()


def test_no_lane_for_one_job_or_a_model_that_cannot_be_sent(tmp_path):
    assert ExportLane.start(_ctx(tmp_path), jobs=1) == (None, "one export process (--jobs 1, or fewer than 4 CPUs)")
    ctx = _ctx(tmp_path)
    ctx.model.hook = lambda x: x  # a lambda does not pickle
    lane, why = ExportLane.start(ctx, jobs=2)
    assert lane is None and why.startswith("the model cannot be sent to a second process")
    assert lane_jobs(1) == 1 and lane_jobs(None) in (1, 2)
    profile = load_target("x86-64")
    assert lane_wanted(profile, check_reproducible=True)
    assert not lane_wanted(profile.model_copy(update={"artifacts": []}), check_reproducible=True)


def test_the_lane_stops_while_the_build_runs_a_runtime(tmp_path):
    lane, why = ExportLane.start(_ctx(tmp_path), jobs=2)
    assert lane is not None, why
    try:
        with quiet_host():
            time.sleep(0.2)
            assert _state(lane.process.pid) == "T"  # stopped (SIGSTOP)
            with quiet_host():  # nested: still stopped, continued once, by the outer block
                pass
            assert _state(lane.process.pid) == "T"
        time.sleep(0.2)
        assert _state(lane.process.pid) in "RS"
    finally:
        lane.close()


def test_a_judged_artifact_gets_its_second_export_from_the_lane_and_the_cache_keeps_it(tmp_path):
    judge = _judge(tmp_path)
    judge.cache = BuildCache(tmp_path / "cache")
    judge.lane = ExportLane.start(judge.ctx, jobs=2)[0]
    try:
        entry = judge.judge(OnnxArtifact(precision="int8", name="model_int8"))
        assert entry.status == "ok" and entry.reproducible is None and len(judge.deferred) == 1
        found = collect_reproducibility(judge)
    finally:
        judge.lane.close()
    check = found["model_int8.onnx"]
    assert check.reproducible and check.method == LANE_REPRO_METHOD and check.detail == "1 file(s) byte-identical"
    assert judge.deferred == [] and not list(tmp_path.glob("edgepack-repro-*"))
    # The next build's cached export carries the result; no second export runs.
    judge.lane, judge.cache_log = None, []
    again, repro = judge.export(OnnxArtifact(precision="int8", name="model_int8"), judge.ctx, check_reproducible=True)
    assert judge.cache_log[-1]["hit"] and repro == check
    digest = hashlib.sha256(again.files[0].read_bytes()).hexdigest()
    assert digest == hashlib.sha256((judge.staged / "model_int8.onnx").read_bytes()).hexdigest()


def test_a_lane_that_dies_is_named_and_leaves_the_build_its_error(tmp_path):
    lane, why = ExportLane.start(_ctx(tmp_path), jobs=2)
    assert lane is not None, why
    try:
        lane.process.kill()
        lane.process.wait()
        lane.submit("model.onnx", OnnxArtifact(precision="fp32", name="model"), tmp_path / "lane")
        with pytest.raises(ExportError) as raised:
            lane.result("model.onnx")
        assert "the second export process ended (signal 9)" in raised.value.message
        assert "--jobs 1" in raised.value.hint
    finally:
        lane.close()


def test_a_build_with_two_export_processes_ships_the_bytes_of_one(tmp_path, monkeypatch):
    """The whole build with --jobs 2: every artifact's second export came from the lane and was
    byte-identical, and the payload is the one a --jobs 1 build writes."""
    import edgepack

    monkeypatch.setenv("EDGEPACK_BUILD_CACHE", "off")
    two = edgepack.build(str(TEST_MODELS / "two_io.py"), "x86-64", tmp_path / "two", jobs=2)
    one = edgepack.build(str(TEST_MODELS / "two_io.py"), "x86-64", tmp_path / "one", jobs=1)
    assert two.exit_code == one.exit_code == 0
    assert two.manifest.package.payload_sha256 == one.manifest.package.payload_sha256
    for art in two.manifest.artifacts:
        assert art.reproducible.reproducible and art.reproducible.method == LANE_REPRO_METHOD
    assert all(art.reproducible.method != LANE_REPRO_METHOD for art in one.manifest.artifacts)
    assert any(t["step"].startswith("checking the second exports") for t in two.manifest.timings)


def test_a_lane_dies_with_its_build_even_while_stopped(tmp_path):
    """A build killed while it times a runtime (the lane stopped) leaves no lane behind."""
    import subprocess
    import sys

    probe = (f"import sys, time; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
             f"from pathlib import Path; from test_lane import _ctx; from edgepack.steps.lane import ExportLane; "
             f"from edgepack.measure import quiet_host; lane, _ = ExportLane.start(_ctx(Path({str(tmp_path)!r})), 2); "
             f"q = quiet_host().__enter__(); time.sleep(3); print(lane.process.pid, flush=True); import os; "
             f"os.kill(os.getpid(), 9)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    pid = int(done.stdout.split()[-1])
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or _state(pid) == "Z":
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or _state(pid) == "Z", f"lane {pid} outlived its build"


def test_a_second_export_that_failed_is_recorded_but_not_cached(tmp_path):
    """The lane dying is not a fact about the artifact: the build records it, and the next build
    (no lane) exports the artifact a second time itself instead of replaying the failure."""
    judge = _judge(tmp_path)
    judge.cache = BuildCache(tmp_path / "cache")
    judge.lane = ExportLane.start(judge.ctx, jobs=2)[0]
    try:
        judge.lane.process.kill()  # before any job: its end is certain
        judge.lane.process.wait()
        entry = judge.judge(OnnxArtifact(precision="int8", name="model_int8"))
        found = collect_reproducibility(judge)
    finally:
        judge.lane.close()
    check = found["model_int8.onnx"]
    assert not check.reproducible and check.detail.startswith("the second export failed: the second export process")
    assert judge.stored_reproducibility(judge.export_key(OnnxArtifact(precision="int8", name="model_int8"))) is None
    judge.lane, judge.cache_log = None, []
    _, repro = judge.export(OnnxArtifact(precision="int8", name="model_int8"), judge.ctx, check_reproducible=True)
    assert judge.cache_log[-1]["hit"] and repro.reproducible and repro.method != LANE_REPRO_METHOD
    assert entry.status == "ok"


def test_the_lane_calibrates_once_for_the_pte_and_the_tflite(tmp_path):
    # as in the build's own process (quant/calibrate.py shared_calibration): the .tflite's second
    # export reuses the lane's own .pte calibration where both quantizers place the same observers
    torch.manual_seed(0)
    samples = [(torch.randn(1, 3, 8, 8),) for _ in range(8)]
    ctx = ExportContext(model=ChainedResidual().eval(), example_inputs=samples[0], calibration=samples,
                        input_names=["x"], output_names=["y"], workdir=tmp_path / "first")
    lane, why = ExportLane.start(ctx, jobs=2)
    assert lane is not None, why
    try:
        lane.submit("model.pte", ExecuTorchArtifact(precision="int8", calibration_samples=8), tmp_path / "pte")
        lane.submit("model.tflite", TFLiteArtifact(precision="int8", calibration_samples=8), tmp_path / "tflite")
        pte = lane.result("model.pte").details["quantization"]
        tflite = lane.result("model.tflite").details["quantization"]
    finally:
        lane.close()
    assert "calibration_shared" not in pte and tflite["calibration_shared"] is True
