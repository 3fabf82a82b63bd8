"""steps/runs.py: an artifact run in its runtime on the parity set, through the build cache: the
second run with the same bytes, runtime, inputs and host replays the outputs and reuses the
latency without starting the runtime; without a cache, or with other bytes, it runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgepack.cache import BuildCache
from edgepack.export.onnx import OnnxArtifact
from edgepack.steps import runs
from edgepack.steps.runs import run_artifact, run_reference
from test_judge import _judge


def _no_runtime(*args, **kwargs):
    raise AssertionError("a runtime was started for a run the cache holds")


def test_a_second_run_of_the_same_bytes_is_replayed_without_a_runtime(tmp_path, monkeypatch):
    judge = _judge(tmp_path / "j")
    judge.cache = BuildCache(tmp_path / "cache")
    files = judge.export(OnnxArtifact(precision="int8", name="m"), judge.ctx)[0].files
    first = run_artifact(judge, "onnxruntime", files)
    assert first.cache["hit"] is False and first.latency_cache["hit"] is False
    assert first.bench["times_ms"] and first.bench["load_ms"] > 0 and first.info["version"]

    monkeypatch.setattr(runs, "RuntimeSession", _no_runtime)
    again = run_artifact(judge, "onnxruntime", files)
    assert again.cache["hit"] and again.latency_cache["hit"] and again.cache["key"] == first.cache["key"]
    assert again.latency_cache["measured_at"] == first.latency_cache["measured_at"] and again.latency_cache["host"]
    assert again.bench == first.bench and again.info == first.info and again.inputs == first.inputs
    for mine, theirs in zip(again.native_outputs, first.native_outputs):
        for a, b in zip(mine, theirs):
            assert a.dtype == b.dtype and np.array_equal(a, b)
    assert [t.scale for t in again.inputs] == [t.scale for t in first.inputs]  # int8 IO: scale/zero point kept

    # other bytes: another key, so the runtime is needed
    with pytest.raises(AssertionError, match="a runtime was started"):
        run_artifact(judge, "onnxruntime", judge.export(OnnxArtifact(precision="fp32", name="f"), judge.ctx)[0].files)


def test_without_a_cache_everything_runs_and_nothing_says_cached(tmp_path):
    judge = _judge(tmp_path)
    files = judge.export(OnnxArtifact(precision="fp32", name="m"), judge.ctx)[0].files
    ran = run_artifact(judge, "onnxruntime", files)
    assert ran.cache is None and ran.latency_cache is None and len(ran.native_outputs) == len(judge.reference.inputs)


def test_an_evaluate_from_no_spec_file_is_never_replayed(tmp_path, monkeypatch):
    """evaluate() is the spec's code: without the spec file's sha256 in the key it runs each time."""
    judge = dataclasses.replace(_judge(tmp_path / "j"), cache=BuildCache(tmp_path / "cache"),
                                evaluate=lambda run: {"calls": 1.0}, evaluate_key=None)
    files = judge.export(OnnxArtifact(precision="fp32", name="m"), judge.ctx)[0].files
    assert run_artifact(judge, "onnxruntime", files).cache is None
    assert run_artifact(judge, "onnxruntime", files).accuracy == {"calls": 1.0}


def test_the_reference_run_is_replayed_too(tmp_path, monkeypatch):
    judge = _judge(tmp_path / "j")
    cache, reference = BuildCache(tmp_path / "cache"), [judge.ctx.reference_onnx]
    settings = judge.profile.latency
    outputs, version, bench, note = run_reference(cache, reference, judge.reference.inputs, 1, 60.0, settings)
    assert note["hit"] is False and version and bench["times_ms"]
    monkeypatch.setattr(runs, "RuntimeSession", _no_runtime)
    again, version_again, bench_again, note_again = run_reference(cache, reference, judge.reference.inputs, 1, 60.0,
                                                                  settings)
    assert note_again["hit"] and version_again == version and bench_again == bench
    assert all(np.array_equal(a, b) for x, y in zip(again, outputs) for a, b in zip(x, y))
    assert all(np.array_equal(a, b) for x, y in zip(again, judge.reference.outputs) for a, b in zip(x, y))
