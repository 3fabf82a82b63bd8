"""cache.py and the cached build: entries are whole or absent, one process computes a key,
keys move with every input, and a second identical build replays exports byte for byte."""

from __future__ import annotations

import importlib.util
import json
import multiprocessing
import time

import pytest
import torch

from edgepack.cache import BuildCache, model_fingerprint
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
    env = {"EDGEPACK_BUILD_CACHE": str(tmp_path / "cache")}
    proc = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", "android-arm64", "-o", str(tmp_path / "dist"),
                   "--json", "--set", "artifacts=[{format: tflite, precision: int8}]", "--set", "latency.runs=20",
                   *extra, env=env)
    return proc, (json.loads(proc.stdout) if proc.stdout.strip() else None)


def test_a_second_identical_build_replays_every_export_byte_for_byte(tmp_path):
    proc, cold = _build(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert cold["cache"]["enabled"] and not cold["cache"]["hit"]
    assert [e["hit"] for e in cold["cache"]["exports"]] == [False, False]  # the artifact, its fp32 baseline
    assert cold["artifacts"][0]["reproducible"]["reproducible"] is True
    proc, warm = _build(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert warm["cache"]["hit"] and "cached export" in proc.stderr and "again to check" not in proc.stderr
    assert warm["package"]["payload_sha256"] == cold["package"]["payload_sha256"]
    assert warm["artifacts"][0]["reproducible"] == cold["artifacts"][0]["reproducible"]  # recorded when made
    steps = [t["step"] for t in warm["timings"]]
    assert steps[0].startswith("starting edgepack") and steps[1] == "loading the spec" and steps[-1].startswith("packaging")
    # thresholds changed only: judged again from the cached export, no export runs
    # (on_static_int8_failure: fail, or the failing artifact would be exported again as int8-dynamic)
    proc, strict = _build(tmp_path, "--set", "tolerances.int8.min_sqnr_db=90", "--set", "on_static_int8_failure=fail")
    assert proc.returncode == 1 and strict["cache"]["hit"] and strict["status"] == "failed"
    proc, fresh = _build(tmp_path, "--no-cache")
    assert proc.returncode == 0 and fresh["cache"] == {"enabled": False, "hit": False, "exports": []}
    assert fresh["package"]["payload_sha256"] == cold["package"]["payload_sha256"]
    info = json.loads(run_cli("cache", "info", "--json", env={"EDGEPACK_BUILD_CACHE": str(tmp_path / "cache")}).stdout)
    assert info["kinds"]["export"]["entries"] == 2 and info["kinds"]["reference"]["entries"] == 1
