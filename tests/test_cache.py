"""cache.py and the cached build: entries are whole or absent, one process computes a key,
keys move with every input, and a second identical build replays exports byte for byte."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import time

import pytest
import torch

import numpy as np

from edgepack.cache import BuildCache, measured, model_fingerprint, replayed
from tests.conftest import TEST_MODELS, run_cli


def test_put_get_and_a_failed_put_leaves_nothing(tmp_path):
    cache = BuildCache(tmp_path / "c")
    source = tmp_path / "model.bin"
    source.write_bytes(b"abc")
    key = cache.key({"a": 1})
    assert key == cache.key({"a": 1}) != cache.key({"a": 2})
    assert cache.get("export", key) is None
    entry = cache.put("export", key, [source], {"runtime": "r"})
    again = cache.get("export", key)
    assert again.record["runtime"] == "r" and again.files[0].read_bytes() == b"abc" == entry.files[0].read_bytes()
    with pytest.raises(FileNotFoundError):
        cache.put("export", cache.key({"a": 3}), [tmp_path / "missing"], {})
    assert cache.get("export", cache.key({"a": 3})) is None
    assert not any((tmp_path / "c" / "tmp").iterdir())
    assert cache.info()["entries"] == 1 and cache.clear() == 1 and cache.info()["entries"] == 0


def test_the_least_recently_used_entries_go_over_the_cap(tmp_path):
    cache = BuildCache(tmp_path / "c", max_bytes=2500)
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * 1000)
    keys = [cache.key({"n": n}) for n in range(3)]
    cache.put("export", keys[0], [blob], {})
    time.sleep(0.05)
    cache.put("export", keys[1], [blob], {})
    time.sleep(0.05)
    assert cache.get("export", keys[0]) is not None  # used: now the most recent
    time.sleep(0.05)
    cache.put("export", keys[2], [blob], {})
    assert cache.get("export", keys[1]) is None
    assert cache.get("export", keys[0]) is not None and cache.get("export", keys[2]) is not None


def test_a_measurement_is_made_once_per_key_and_says_when_and_where(tmp_path):
    cache, calls = BuildCache(tmp_path / "c"), []

    def measure():
        calls.append(1)
        return {"p50_ms": 1.5}

    figures, note = measured(cache, "latency", {"files": "a"}, measure)
    assert figures == {"p50_ms": 1.5} and note["hit"] is False and note["measured_at"].endswith("Z") and note["host"]
    again, note_again = measured(cache, "latency", {"files": "a"}, measure)
    assert again == figures and note_again["hit"] and note_again["measured_at"] == note["measured_at"]
    assert len(calls) == 1
    assert measured(cache, "latency", {"files": "b"}, measure)[1]["hit"] is False and len(calls) == 2
    assert measured(None, "latency", {"files": "a"}, measure) == ({"p50_ms": 1.5}, None) and len(calls) == 3


def test_replayed_outputs_come_back_with_their_dtypes(tmp_path):
    cache = BuildCache(tmp_path / "c")
    arrays = {"s0_o0": np.arange(6, dtype=np.int8).reshape(2, 3), "s0_o1": np.linspace(0, 1, 4, dtype=np.float32)}
    record, got, note = replayed(cache, "runtime-run", {"files": "a"}, lambda: ({"version": "1"}, arrays))
    assert note["hit"] is False and record == {"version": "1"}
    record, got, note = replayed(cache, "runtime-run", {"files": "a"}, lambda: pytest.fail("ran again"))
    assert note["hit"] and note["run_at"].endswith("Z") and record == {"version": "1"}
    assert all(got[k].dtype == v.dtype and np.array_equal(got[k], v) for k, v in arrays.items())
    with pytest.raises(RuntimeError):  # a run that fails stores nothing
        replayed(cache, "runtime-run", {"files": "b"}, lambda: (_ for _ in ()).throw(RuntimeError("crash")))
    assert cache.get("runtime-run", cache.key({"files": "b"})) is None


def _claim_and_count(root: str, counter: str) -> bool:
    cache = BuildCache(__import__("pathlib").Path(root))
    key = cache.key({"shared": True})
    with cache.claim("export", key) as slot:
        if slot.entry is None:
            with open(counter, "a") as handle:
                handle.write("computed\n")
            time.sleep(0.5)  # the other process arrives while this one computes
            out = __import__("pathlib").Path(root).parent / f"out-{multiprocessing.current_process().pid}"
            out.write_bytes(b"result")
            slot.store([out], {})
        return slot.hit


def test_two_processes_wanting_one_key_compute_it_once(tmp_path):
    counter = tmp_path / "count"
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        hits = pool.starmap(_claim_and_count, [(str(tmp_path / "c"), str(counter))] * 2)
    assert sorted(hits) == [False, True]
    assert counter.read_text() == "computed\n"


def _module_from(path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fingerprint_moves_with_weights_structure_and_module_source(tmp_path):
    code = "import torch\nclass Net(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n" \
           "        self.fc = torch.nn.Linear(3, 2)\n    def forward(self, x):\n        return self.fc(x)\n"
    path = tmp_path / "netdef.py"
    path.write_text(code)
    torch.manual_seed(0)
    net = _module_from(path).Net()
    first = model_fingerprint(net)
    assert model_fingerprint(net) == first
    path.write_text(code.replace("return self.fc(x)", "return self.fc(x).relu()"))  # forward edited
    assert model_fingerprint(net)["sources"] != first["sources"]
    path.write_text(code)
    with torch.no_grad():
        net.fc.weight[0, 0] += 1e-6
    assert model_fingerprint(net)["weights"] != first["weights"]
    assert model_fingerprint(torch.nn.Linear(3, 4))["structure"] != model_fingerprint(torch.nn.Linear(3, 2))["structure"]


def _build(tmp_path, *extra):
    """The build, its manifest, and the coverage of its wall time (measured here) by its steps."""
    env = {"EDGEPACK_BUILD_CACHE": str(tmp_path / "cache")}
    started = time.monotonic()
    proc = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", "android-arm64", "-o", str(tmp_path / "dist"),
                   "--json", "--set", "artifacts=[{format: tflite, precision: int8}]", "--set", "latency.runs=20",
                   *extra, env=env)
    wall = time.monotonic() - started
    manifest = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, manifest, (sum(t["seconds"] for t in manifest["timings"]) / wall if manifest else None)


def test_a_second_identical_build_replays_every_export_byte_for_byte(tmp_path):
    proc, cold, coverage = _build(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert cold["cache"]["enabled"] and not cold["cache"]["hit"]
    assert [e["hit"] for e in cold["cache"]["exports"]] == [False, False]  # the artifact, its fp32 baseline
    assert cold["artifacts"][0]["reproducible"]["reproducible"] is True
    assert coverage > 0.9, cold["timings"]  # the steps account for the build's wall time, start to exit
    proc, warm, coverage = _build(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert warm["cache"]["hit"] and "cached export" in proc.stderr and "again to check" not in proc.stderr
    assert warm["package"]["payload_sha256"] == cold["package"]["payload_sha256"]
    assert warm["artifacts"][0]["reproducible"] == cold["artifacts"][0]["reproducible"]  # recorded when made
    assert coverage > 0.9, warm["timings"]
    steps = [t["step"] for t in warm["timings"]]
    assert steps[0].startswith("starting edgepack") and steps[1] == "loading the spec"
    assert steps[-1] == "writing the zip (deflate level 9)"
    # the outputs replayed, the latency reused: the manifest says when they were made, the terminal says cached
    art, cold_art = warm["artifacts"][0], cold["artifacts"][0]
    assert art["latency"]["outputs_cache"]["hit"] and "cached run in litert" in proc.stderr
    for latency, before in ((art["latency"], cold_art["latency"]), (warm["reference"]["latency"], cold["reference"]["latency"]),
                            (art["latency"]["float_comparison"], cold_art["latency"]["float_comparison"])):
        assert latency["cache"]["hit"] and latency["cache"]["measured_at"] == before["cache"]["measured_at"]
        assert latency["p50_ms"] == before["p50_ms"] and not before["cache"]["hit"]
    assert [e["hit"] for e in warm["cache"]["latency"]] == [True, True, True]
    assert "cached: every export, host latency (measured " in proc.stderr
    # thresholds changed only: judged again from the cached export and outputs, nothing exported or run
    # (on_static_int8_failure: fail, or the failing artifact would be exported again as int8-dynamic)
    proc, strict, _ = _build(tmp_path, "--set", "tolerances.int8.min_sqnr_db=90", "--set", "on_static_int8_failure=fail")
    assert proc.returncode == 1 and strict["cache"]["hit"] and strict["status"] == "failed"
    assert strict["artifacts"][0]["latency"]["outputs_cache"]["hit"]
    assert strict["artifacts"][0]["parity"]["thresholds"]["min_sqnr_db"] == 90
    proc, fresh, _ = _build(tmp_path, "--no-cache")
    assert proc.returncode == 0 and fresh["cache"] == {"enabled": False, "hit": False, "exports": []}
    assert fresh["package"]["payload_sha256"] == cold["package"]["payload_sha256"]
    assert "cache" not in fresh["artifacts"][0]["latency"] and "cache" not in fresh["reference"]["latency"]
    info = json.loads(run_cli("cache", "info", "--json", env={"EDGEPACK_BUILD_CACHE": str(tmp_path / "cache")}).stdout)
    kinds = {kind: row["entries"] for kind, row in info["kinds"].items()}
    assert kinds["export"] == 2 and kinds["reference"] == 1 and kinds["runtime-run"] == 1
    assert kinds["reference-run"] == 1 and kinds["latency"] == 2 and kinds["latency-pair"] == 1
