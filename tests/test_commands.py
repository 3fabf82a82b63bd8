"""commands.py and cli.py as a pipeline runs them: `python -m edgepack.cli ...` in a subprocess,
its exit code, stdout (JSON alone under --json) and stderr (edgepack's lines, not the exporters')."""

from __future__ import annotations

import json
import textwrap
import zipfile

import pytest

from edgepack import __version__
from tests.conftest import TEST_MODELS, run_cli

# A spec that prints when loaded and on every forward pass (so during export too), as user code does.
CHATTY = textwrap.dedent('''
    import torch
    from torch import nn
    from edgepack import ModelSpec

    print("chatty spec loaded")

    class Chatty(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            print("chatty forward")
            return self.fc(x)

    def spec():
        torch.manual_seed(0)
        samples = [(torch.randn(1, 6),) for _ in range(16)]
        return ModelSpec(name="chatty", model=Chatty().eval(), example_inputs=samples[0], calibration=samples[:12],
                         holdout=samples[12:])
''')

BRANCHY = textwrap.dedent('''
    import torch
    from torch import nn
    from edgepack import ModelSpec

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return self.fc(-x)

    def spec():
        samples = [(torch.randn(1, 4),) for _ in range(8)]
        return ModelSpec(name="branchy", model=Branchy().eval(), example_inputs=samples[0], calibration=samples)
''')

# One fp32 .tflite: litert-torch and LiteRT are the loudest libraries a build runs.
TFLITE_ONLY = ["--set", "artifacts=[{format: tflite, precision: fp32}]", "--set", "latency.runs=20",
               "--set", "latency.warmup=1", "--no-repro-check"]
NATIVE_CHATTER = ("absl::", "oneDNN", "WARNING: All log messages", "TfLiteXNNPackDelegate", "chatty forward", "chatty spec loaded")


@pytest.fixture(scope="module")
def chatty_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatty")
    spec = root / "chatty.py"
    spec.write_text(CHATTY)
    proc = run_cli("build", str(spec), "-t", "android-arm64", "-o", str(root / "dist"), "--json", *TFLITE_ONLY)
    return root, proc


def test_json_build_keeps_stdout_pure_and_the_libraries_output_in_a_log(chatty_build):
    root, proc = chatty_build
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads(proc.stdout)  # nothing but the manifest on stdout
    assert manifest["status"] == "passed" and [a["file"] for a in manifest["artifacts"]] == ["model.tflite"]
    # tests/conftest.py switches the emulated arm64 runs off: recorded, not run, no warning
    emulated = manifest["artifacts"][0]["emulated_arm64"]
    assert emulated["status"] == "skipped" and emulated["reason"] == "switched off (EDGEPACK_ARM64_CHECK=off)"
    assert not emulated["runs"] and not any("arm64" in w for w in manifest["warnings"])
    for line in proc.stderr.splitlines():
        assert not any(word in line for word in NATIVE_CHATTER), line
    assert "bundle:" in proc.stderr and "[1/" not in proc.stderr  # first build: no step count known yet
    log = (root / "dist" / "chatty" / "android-arm64.log").read_text(errors="replace")
    assert "chatty spec loaded" in log and "chatty forward" in log


def test_inspect_reads_a_bundle_its_zip_and_a_model_folder(chatty_build):
    root, _ = chatty_build
    bundle = root / "dist" / "chatty" / "android-arm64"
    zipped = root / "dist" / "chatty-android-arm64.zip"
    assert zipfile.is_zipfile(zipped)
    for path in (bundle, zipped):
        proc = run_cli("inspect", str(path), "--json")
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["model"]["name"] == "chatty"
    proc = run_cli("inspect", str(root / "dist" / "chatty"), "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [{"bundle": str(bundle), "target": "android-arm64", "status": "passed",
                                        "artifacts": ["model.tflite"]}]
    narrow = run_cli("inspect", str(bundle), env={"COLUMNS": "80"})
    assert narrow.returncode == 0 and "  host p50 ms" in narrow.stdout  # one block per artifact
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80


def test_data_dependent_control_flow_is_one_line_naming_the_file(tmp_path):
    spec = tmp_path / "branchy.py"
    spec.write_text(BRANCHY)
    proc = run_cli("build", str(spec), "-t", "x86-64", "-o", str(tmp_path / "dist"), "--no-repro-check")
    assert proc.returncode == 3, proc.stderr
    assert "data-dependent control flow" in proc.stderr and f"{spec}:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "dist" / "branchy" / "x86-64").exists()


def test_version_and_debug_after_the_command():
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgepack {__version__}"
    proc = run_cli("inspect", "/nonexistent-bundle", "--debug")
    assert proc.returncode == 2 and "Traceback" in proc.stderr and "not a bundle directory" in proc.stderr


def test_errors_under_json_are_an_object_on_stdout():
    proc = run_cli("inspect", "/nonexistent-bundle", "--json")
    error = json.loads(proc.stdout)["error"]
    assert proc.returncode == error["exit_code"] == 2 and error["kind"] == "bundle error"
    assert "/nonexistent-bundle" in error["message"] and error["hint"]
    proc = run_cli("targets", "show", "x86-64", "--json", "--bogus")
    assert proc.returncode == 2 and json.loads(proc.stdout)["error"]["kind"] == "usage error"
    assert "--bogus" in proc.stderr


def test_targets_show_applies_set():
    proc = run_cli("targets", "show", "x86-64", "--json", "--set", "latency.runs=70",
                   "--set", "tolerances.int8.min_cosine=0.97")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert shown["latency"]["runs"] == 70 and shown["tolerances"]["int8"]["min_cosine"] == 0.97
    proc = run_cli("targets", "show", "x86-64", "--set", "latency.runs")
    assert proc.returncode == 2 and "key.path=value" in proc.stderr


def test_diagnose_says_when_nothing_needs_keeping_in_float(tmp_path):
    proc = run_cli("diagnose", str(TEST_MODELS / "two_io.py"), "-t", "android-arm64", "-o", str(tmp_path), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "dB margin over the profile's SQNR threshold (14.0 dB)" in proc.stderr
    assert "nothing to keep in float" in proc.stderr and "float_layers:" not in proc.stderr
    report = json.loads((tmp_path / "diagnosis.json").read_text())
    assert report["thresholds"]["min_sqnr_db"] == 14.0
    assert report["margin_db"] == pytest.approx(report["output"]["sqnr_db"] - 14.0, abs=1e-3)
    assert report["quantizer"].startswith("executorch.")


def test_several_targets_in_one_run_share_the_spec_and_the_reference(tmp_path):
    other = tmp_path / "x86-64-lean.yaml"
    other.write_text("extends: x86-64\nname: x86-64-lean\nartifacts:\n  - {name: model, format: onnx, precision: fp32}\n")
    proc = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", "x86-64", "-t", str(other), "-o",
                   str(tmp_path / "dist"), "--json", "--no-repro-check", "--set", "latency.runs=20",
                   env={"EDGEPACK_BUILD_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    manifests = json.loads(proc.stdout)
    assert [m["target"]["name"] for m in manifests] == ["x86-64", "x86-64-lean"]
    assert [t["step"] for t in manifests[0]["timings"][:2]] == [
        "starting edgepack (Python, imports) and reading the profile", "loading the spec"]
    assert manifests[1]["timings"][0]["step"] != "loading the spec"  # loaded once, for the first
    assert proc.stderr.count("float reference: cached") == 1  # made by the first target, reused by the second
    assert (tmp_path / "dist" / "two-io" / "x86-64+x86-64-lean.log").is_file()


def test_a_target_that_errors_does_not_stop_the_others(tmp_path):
    # two_io.py has no train_data: prune-gradual raises a stage error (exit 3) before any export.
    pruned = tmp_path / "x86-64-pruned.yaml"
    pruned.write_text("extends: x86-64\nname: x86-64-pruned\nstages:\n  - {type: prune-gradual, final_sparsity: 0.5, "
                      "epochs: 1}\nartifacts:\n  - {name: model, format: onnx, precision: fp32}\n")
    lean = tmp_path / "x86-64-lean.yaml"
    lean.write_text("extends: x86-64\nname: x86-64-lean\nartifacts:\n  - {name: model, format: onnx, precision: fp32}\n")
    dist = tmp_path / "dist"
    common = ["-o", str(dist), "--json", "--no-repro-check", "--set", "latency.runs=20"]
    alone = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", str(pruned), *common)
    assert alone.returncode == 3, alone.stderr
    single = json.loads(alone.stdout)  # one target: the error object alone, as any command prints it
    assert list(single) == ["error"] and single["error"]["kind"] == "stage error"
    assert single["error"]["exit_code"] == 3 and "train_data" in single["error"]["message"] and single["error"]["hint"]

    proc = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", str(pruned), "-t", str(lean), *common)
    assert proc.returncode == 3, proc.stderr  # the worst of 3 and 0
    failed, built = json.loads(proc.stdout)
    log = dist / "two-io" / "x86-64-pruned+x86-64-lean.log"
    assert failed == {"target": {"name": "x86-64-pruned"},
                      "error": {**single["error"], "log": str(log)}}  # the single-target object, with the run's log
    assert built["target"]["name"] == "x86-64-lean" and built["status"] == "passed"
    assert (dist / "two-io" / "x86-64-lean" / "manifest.json").is_file() and log.is_file()
    assert not (dist / "two-io" / "x86-64-pruned").exists() and not (dist / "two-io" / "x86-64-pruned.failed").exists()
    assert "stage error: target x86-64-pruned: stage 1 (prune-gradual) failed" in proc.stderr
    assert "1 of 2 targets built: x86-64-pruned exit 3, x86-64-lean passed" in proc.stderr
    assert "Traceback" not in proc.stderr

    debug = run_cli("build", str(TEST_MODELS / "two_io.py"), "-t", str(pruned), "-t", str(lean), *common, "--debug",
                    "-o", str(tmp_path / "debug"))
    assert debug.returncode == 3 and "Traceback" in debug.stderr  # --debug: the first error ends the run
    assert list(json.loads(debug.stdout)) == ["error"] and not (tmp_path / "debug" / "two-io" / "x86-64-lean").exists()


def test_a_build_with_a_second_export_process_makes_openmp_wait_passively(monkeypatch, tmp_path):
    """Set before torch loads libgomp, which reads it once; only with the second process (alone on
    a quiet host, passive waiting cost 7%); a value in the environment stands."""
    import os

    from edgepack.cli import main
    from edgepack.measure import lane_jobs

    for jobs, before, after in (("1", None, None), ("2", None, "PASSIVE"), ("2", "ACTIVE", "ACTIVE")):
        if before is None:
            monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
        else:
            monkeypatch.setenv("OMP_WAIT_POLICY", before)
        code = main(["build", str(tmp_path / "missing.py"), "-t", "x86-64", "--jobs", jobs, "--quiet"])
        assert code == 2 and os.environ.get("OMP_WAIT_POLICY") == after
    assert lane_jobs(1) == 1 and lane_jobs(2) == 2 and lane_jobs(None) in (1, 2)
