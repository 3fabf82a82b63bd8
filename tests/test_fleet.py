"""edgepack fleet: the matrix is checked strictly before anything runs, and a fleet on a real local
Ray instance runs every (model, target) build in a child process, retries a build whose worker was
killed, never retries a build that ran and failed, and reports every build (exit code: the worst)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from edgepack.fleet import MatrixError, load_matrix
from edgepack.fleet.task import summarize_manifest
from tests.conftest import TEST_MODELS, leftovers, run_cli

LEAN = {"extends": "x86-64", "name": "x86-64-1t", "device": {"threads": 1}}  # a one-thread device class


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_matrix_resolves_its_paths_against_its_own_folder(tmp_path):
    folder = tmp_path / "ci"
    _write(folder / "specs" / "tiny.py", (TEST_MODELS / "conv_only.py").read_text())
    _write(folder / "lean.yaml", LEAN)
    matrix = _write(folder / "fleet.yaml", {
        "out": "../dist", "set": ["latency.runs=20"],
        "models": ["specs/tiny.py", {"spec": "specs/tiny.py:spec", "set": ["parity.holdout_samples=4"]}],
        "targets": ["x86-64", {"target": "lean.yaml", "set": ["latency.warmup=2"]}]})
    builds, out = load_matrix(matrix, settings=["latency.runs=25"])
    assert out == (tmp_path / "dist").resolve()
    assert [(b.key, b.target_name) for b in builds] == [
        ("tiny--x86-64", "x86-64"), ("tiny--x86-64-1t", "x86-64-1t"),
        ("tiny_spec--x86-64", "x86-64"), ("tiny_spec--x86-64-1t", "x86-64-1t")]
    assert builds[0].spec_ref == str((folder / "specs" / "tiny.py").resolve())
    assert builds[3].spec_ref == str((folder / "specs" / "tiny.py").resolve()) + ":spec"
    assert builds[1].target_ref == str((folder / "lean.yaml").resolve()) and builds[0].target_ref == "x86-64"
    # matrix-wide, then the model's, then the target's, then the command line's
    assert builds[3].settings == ("latency.runs=20", "parity.holdout_samples=4", "latency.warmup=2", "latency.runs=25")


CONV = str(TEST_MODELS / "conv_only.py")


@pytest.mark.parametrize("matrix, expected", [
    ({"models": [{"spec": CONV, "sets": []}], "targets": ["x86-64"]}, "models[0].sets: unknown key"),
    ({"set": ["latency.runs"], "models": [CONV], "targets": ["x86-64"]},
     "set[0]: 'latency.runs' is not key.path=value"),
    ({"models": [], "targets": ["x86-64"]}, "models: List should have at least 1 item"),
    ({"models": [CONV], "targets": [{"target": "x86-64", "set": 3}]}, "targets[0].set: Input should be a valid list"),
    ({"models": ["nowhere/missing.py"], "targets": ["x86-64"]}, "models[0].spec: nowhere/missing.py: spec file not found"),
    ({"models": [CONV, CONV], "targets": ["x86-64"]}, "models[1]: " + CONV + " is listed twice (models[0])"),
    ({"models": [CONV], "targets": ["no-such-device"]}, "targets[0] (no-such-device): unknown target 'no-such-device'"),
    ({"models": [CONV], "targets": [{"target": "x86-64", "set": ["latency.runs=-1"]}]},
     "targets[0] (x86-64): "),
    ({"models": [CONV], "targets": ["x86-64", "lean.yaml", {"target": "lean.yaml", "set": ["latency.runs=30"]}]},
     "targets[2] (lean.yaml) is named 'x86-64-1t' like targets[1]"),
    ({"models": [{"spec": CONV, "set": ["tolerances.int8.min_cosine=2"]}], "targets": ["x86-64"]},
     "models[0].set on targets[0] (x86-64): "),
    ({"schema_version": 2, "models": [CONV], "targets": ["x86-64"]}, "schema_version: Input should be 1"),
    (["x86-64"], "a matrix must be a YAML mapping, got list"),
    ("models: [a\ntargets: b: c\n", "invalid YAML"),
])
def test_matrix_errors_name_the_file_and_the_key(tmp_path, matrix, expected):
    _write(tmp_path / "lean.yaml", LEAN)
    path = _write(tmp_path / "fleet.yaml", matrix)
    with pytest.raises(MatrixError) as info:
        load_matrix(path)
    assert info.value.exit_code == 2 and info.value.kind == "matrix error" and info.value.hint
    assert info.value.message.startswith(str(path)), info.value.message
    assert expected in info.value.message, info.value.message


def test_a_missing_matrix_is_named(tmp_path):
    with pytest.raises(MatrixError, match="matrix file not found"):
        load_matrix(tmp_path / "nope.yaml")


def test_the_cli_reports_a_matrix_error_as_one_json_object_and_exit_2(tmp_path):
    path = _write(tmp_path / "fleet.yaml", {"models": [CONV], "targets": ["x86-64"], "outt": "dist"})
    proc = run_cli("fleet", str(path), "--json", timeout=300)
    assert proc.returncode == 2, proc.stderr
    error = json.loads(proc.stdout)["error"]
    assert error["kind"] == "matrix error" and "outt: unknown key" in error["message"] and error["exit_code"] == 2
    assert "Traceback" not in proc.stderr


def test_without_ray_the_fleet_names_the_extra(tmp_path):
    """An environment without Ray (a package that fails to import stands for it): exit 2, the extra named."""
    shadow = _write(tmp_path / "noray" / "ray" / "__init__.py", "raise ImportError(\"No module named 'ray'\")\n")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(shadow.parent.parent), os.environ.get("PYTHONPATH")]))}
    proc = run_cli("fleet", str(tmp_path / "any.yaml"), env=env, timeout=300)
    assert proc.returncode == 2
    assert "runtime unavailable" in proc.stderr and "edgepack[fleet]" in proc.stderr and "Traceback" not in proc.stderr


def test_an_address_where_nothing_listens_fails_at_once(tmp_path):
    """ray.init retries an unreachable cluster for many minutes, deaf to Ctrl-C: the fleet checks first."""
    path = _write(tmp_path / "fleet.yaml", {"out": "dist", "models": [CONV], "targets": ["x86-64"]})
    proc = run_cli("fleet", str(path), "--address", "127.0.0.1:1", timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot join the Ray cluster at 127.0.0.1:1: nothing answers there" in proc.stderr
    assert not (tmp_path / "dist").exists() and "Traceback" not in proc.stderr


def test_the_build_cache_field_is_reported_when_a_manifest_has_it(tmp_path):
    base = {"status": "passed", "model": {"name": "m"}, "target": {"name": "t"}, "artifacts": []}
    assert summarize_manifest({**base, "cache": {"hit": True, "key": "k"}}, tmp_path)["cached"] is True
    assert summarize_manifest({**base, "cache": {"hit": False}}, tmp_path)["cached"] is False
    assert summarize_manifest(base, tmp_path)["cached"] is None  # no field: unknown


# two_io, except that its first build in a fleet kills the Ray worker running it, mid-build: evaluate()
# runs in the build process after the float reference is exported and the golden data staged. A marker
# file (created exclusively) makes it happen once; the retry finds it and builds normally.
FLAKY = textwrap.dedent('''
    import importlib.util
    import os
    import signal
    import time
    from dataclasses import replace
    from pathlib import Path

    MARKER = Path(__file__).with_name("worker-killed")
    _found = importlib.util.spec_from_file_location("two_io_for_fleet", {two_io!r})
    two_io = importlib.util.module_from_spec(_found)
    _found.loader.exec_module(two_io)


    def _evaluate(run):
        parent = Path(f"/proc/{{os.getppid()}}/cmdline").read_bytes()
        if b"ray" in parent:  # only under a Ray worker: the build's parent
            try:
                fd = os.open(MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.write(fd, f"{{os.getppid()}} {{os.getpid()}}".encode())
                os.close(fd)
                os.kill(os.getppid(), signal.SIGKILL)
                time.sleep(120)  # PR_SET_PDEATHSIG ends this process with its parent long before
        return {{"holdout_samples": 8.0}}


    def spec():
        return replace(two_io.spec(), evaluate=_evaluate)
''')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_a_3x2_fleet_survives_a_killed_worker_and_reports_every_build(tmp_path):
    from edgepack import validate

    _write(tmp_path / "flaky_two_io.py", FLAKY.format(two_io=str(TEST_MODELS / "two_io.py")))
    _write(tmp_path / "lean.yaml", LEAN)
    matrix = _write(tmp_path / "fleet.yaml", {
        "out": "dist", "set": ["latency.runs=20"],
        "models": ["flaky_two_io.py", str(TEST_MODELS / "conv_only.py"), str(TEST_MODELS / "wide_mlp.py")],
        "targets": ["x86-64", "lean.yaml"]})
    cache_env = {"EDGEPACK_BUILD_CACHE": str(tmp_path / "build-cache")}  # shared by every task
    proc = run_cli("fleet", str(matrix), "--json", "--no-repro-check", "--parallel", "2", timeout=900, env=cache_env)
    assert proc.returncode == 0, proc.stderr + proc.stdout[-2000:]
    out = tmp_path / "dist"
    report = json.loads(proc.stdout)
    assert report == json.loads((out / "fleet-report.json").read_text())  # --json: the report alone
    builds = report["builds"]
    assert [(b["model_name"], b["target_name"]) for b in builds] == [
        (m, t) for m in ("two-io", "conv-only", "wide-mlp") for t in ("x86-64", "x86-64-1t")]
    assert all(b["exit_code"] == 0 and b["status"] == "passed" for b in builds), builds
    assert report["exit_code"] == 0 and report["counts"] == {"passed": 6}

    # Exactly one build's worker was killed (the first two-io build to reach evaluate), and Ray ran it again.
    worker_pid, build_pid = map(int, (tmp_path / "worker-killed").read_text().split())
    retried = [b for b in builds if b["attempts"] > 1]
    assert len(retried) == 1 and retried[0]["attempts"] == 2 and retried[0]["model_name"] == "two-io", builds
    assert sum(b["attempts"] for b in builds) == 7
    first = json.loads((Path(retried[0]["logs"]) / "attempt-1.json").read_text())
    assert first["pid"] == build_pid and first["worker_pid"] == worker_pid
    assert "exit_code" not in first  # that attempt never returned: its worker died under it
    assert not _alive(worker_pid) and not _alive(build_pid)  # the build died with its worker (PDEATHSIG)
    assert retried[0]["accuracy_float"] == {"holdout_samples": 8.0}  # the retry ran evaluate() through
    assert not leftovers(out), leftovers(out)  # the killed attempt's staging directory was removed
    assert not Path(first["tmp"]).exists()  # and its private TMPDIR (its scratch files, its captured log)

    for build in builds:
        assert Path(build["bundle_dir"]) == out / build["model_name"] / build["target_name"]
        assert validate(build["bundle_dir"]).exit_code == 0, build["bundle_dir"]
        assert [a["file"] for a in build["artifacts"]] == ["model.onnx", "model_int8.onnx"]
        for art in build["artifacts"]:
            assert art["bytes"] > 0 and art["ratio_to_float"] > 0 and art["parity_passed"] is True
            assert 0.9 < art["cosine_min"] <= 1.0 + 1e-9 and art["sqnr_db"] > 10
        assert build["wall_s"] > 0 and build["cached"] in (None, True, False)
    assert builds[4]["artifacts"][1]["ratio_to_float"] < 0.5  # wide-mlp's int8 weights: a quarter of float

    table = (out / "fleet-report.md").read_text()
    assert table.count("| two-io |") == 4 and table.count("| wide-mlp |") == 4 and "| 2 |" in table
    assert (out / "fleet-report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["ray"]["address"] == "local" and report["ray"]["parallel"] == 2

    # The same matrix again: every export of every build comes from the shared build cache.
    again = run_cli("fleet", str(matrix), "--json", "--no-repro-check", "--parallel", "2", timeout=900, env=cache_env)
    assert again.returncode == 0, again.stderr
    rebuilt = json.loads(again.stdout)["builds"]
    assert [b["cached"] for b in rebuilt] == [True] * 6 and all(b["attempts"] == 1 for b in rebuilt)


@pytest.mark.slow
def test_the_fleet_exit_code_is_the_worst_build_and_failures_are_not_retried(tmp_path):
    _write(tmp_path / "strict.yaml", {"extends": "x86-64", "name": "x86-64-strict",
                                      "tolerances": {"int8": {"min_sqnr_db": 150.0}}})  # int8 never reaches it
    _write(tmp_path / "broken.py", "def spec(:\n")
    matrix = _write(tmp_path / "fleet.yaml", {
        "out": "dist", "set": ["latency.runs=20"], "models": [CONV, "broken.py"],
        "targets": ["x86-64", "strict.yaml"]})
    proc = run_cli("fleet", str(matrix), "--no-repro-check", "--no-zip", timeout=900)
    builds = {(Path(b["model"]).name, b["target_name"]): b
              for b in json.loads((tmp_path / "dist" / "fleet-report.json").read_text())["builds"]}
    assert proc.returncode == 2, proc.stderr
    assert {k: b["exit_code"] for k, b in builds.items()} == {
        ("conv_only.py", "x86-64"): 0, ("conv_only.py", "x86-64-strict"): 1,
        ("broken.py", "x86-64"): 2, ("broken.py", "x86-64-strict"): 2}
    assert all(b["attempts"] == 1 for b in builds.values())  # a build that ran and failed is a result
    failed = builds["conv_only.py", "x86-64-strict"]
    assert failed["status"] == "failed" and failed["bundle_dir"].endswith("x86-64-strict.failed")
    assert any("model_int8.onnx" in f for f in failed["failures"])
    assert [a["parity_passed"] for a in failed["artifacts"]] == [True, False]
    broken = builds["broken.py", "x86-64"]
    assert broken["status"] == "error" and broken["error"]["kind"] == "spec error"
    assert "syntax error" in broken["error"]["message"] and broken["artifacts"] == []
    assert "exit 1" in proc.stderr and "exit 2" in proc.stderr and "Traceback" not in proc.stderr
    assert "## Problems" in (tmp_path / "dist" / "fleet-report.md").read_text()


@pytest.mark.slow
def test_a_build_over_its_timeout_is_stopped_and_counts_as_a_runtime_error(tmp_path):
    matrix = _write(tmp_path / "fleet.yaml", {"out": "dist", "models": [CONV], "targets": ["x86-64"]})
    proc = run_cli("fleet", str(matrix), "--timeout", "1", "--json", timeout=300)
    assert proc.returncode == 3, proc.stderr
    build, = json.loads(proc.stdout)["builds"]
    assert build["status"] == "timeout" and build["exit_code"] == 3 and build["attempts"] == 1  # not retried
    assert "more than 1 s" in build["error"]["message"] and build["bundle_dir"] is None
    assert not leftovers(tmp_path / "dist")  # SIGTERM: the build stopped before placing anything
