"""The GPU check of mobile-GPU .tflite files, end to end through the CLI with the real LiteRT GPU
accelerator on the real lavapipe: recorded by the build, re-run by `edgepack validate --gpu`, ops
the GPU does not take listed, an fp16 failure only the GPU shows failing the build, and an
emulator that cannot be set up failing or skipping as the profile says."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from conftest import TARGETS, TEST_MODELS, run_cli
from edgepack import package
from edgepack.emulators import lavapipe
from edgepack.errors import ConfigError
from edgepack.target import parse_profile

UNREACHABLE = "http://127.0.0.1:9"


def _profile(tmp_path, **gpu_check) -> str:
    """android-gpu with its .tflite only (the Vulkan .pte is not what is tested here) and 16 samples."""
    data = yaml.safe_load((TARGETS / "android-gpu.yaml").read_text())
    data.update(name="gpu-check", artifacts=[a for a in data["artifacts"] if a["format"] == "tflite"],
                parity={"calibration_samples": 8, "holdout_samples": 8})
    data["gpu_check"].update(gpu_check)
    path = tmp_path / "gpu-check.yaml"
    tmp_path.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _build(spec: str, tmp_path, *extra: str, env: dict | None = None, **gpu_check):
    proc = run_cli("build", spec, "--target", _profile(tmp_path, **gpu_check), "--out", str(tmp_path / "dist"),
                   "--json", "--quiet", "--no-repro-check", *extra, env=env)
    manifest = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc, manifest


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """`edgepack build models/digits_cnn.py` for android-gpu's .tflite, zip included."""
    lavapipe.ensure()
    tmp_path = tmp_path_factory.mktemp("digits-gpu")
    proc, manifest = _build("models/digits_cnn.py", tmp_path)
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "dist" / "digits-cnn" / "gpu-check", manifest


@pytest.mark.build  # builds through _build (the conftest's marker looks for build( calls)
def test_the_build_records_a_passing_gpu_path(digits):
    _, manifest = digits
    (art,) = manifest["artifacts"]
    gpu = art["emulated_gpu"]
    assert art["status"] == "ok" and gpu["status"] == "passed" and gpu["precision"] == "fp16"
    assert gpu["accelerator"].startswith("LiteRT GPU accelerator: WebGPU (Dawn) on Vulkan (ai-edge-litert 2.")
    driver = gpu["driver"]
    assert driver["name"] == "Mesa lavapipe" and driver["driver_info"].startswith("Mesa 25.")
    assert driver["device_type"] == "cpu" and "not a phone GPU driver" in driver["not_a_phone_gpu_driver"]
    assert driver["seen_by_the_runtime"]["dawn_adapter"].startswith("llvmpipe")
    assert gpu["fully_accelerated"] is True and gpu["fallback_ops"] == {}
    assert gpu["ops"] == {"total": sum(art["export"]["ops"].values()), "on_gpu": sum(art["export"]["ops"].values()),
                          "on_cpu": 0}
    thresholds = {k: v for k, v in manifest["target"]["profile"]["tolerances"]["fp16"].items() if v is not None}
    for record in (gpu["parity"], gpu["cpu_agreement"]):
        assert record["passed"] and record["samples"] == 16 and record["thresholds"] == thresholds
        (output,) = record["outputs"]
        # fp16 arithmetic on the GPU: visibly different from the CPU interpreter's fp32, same classes
        assert 1e-3 < output["max_abs_error"] < 0.1 and output["cosine_min"] > 0.99999
        assert output["top1_agreement"] == 1.0
    seconds = gpu["seconds"]
    assert "not device time" in seconds["label"] and seconds["later_runs"] == 15
    assert seconds["first_run"] > 0 and 0 < seconds["later_runs_p50"] < 1.0


@pytest.mark.build
def test_validate_gpu_rechecks_from_the_bundle_and_its_zip(digits):
    bundle, _ = digits
    for source in (bundle, bundle.parent.parent / "digits-cnn-gpu-check.zip"):
        proc = run_cli("validate", str(source), "--gpu", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        (gpu,) = result["gpu"]
        assert gpu["file"] == "model.tflite" and gpu["passed"] and gpu["fully_accelerated"]
        assert gpu["cpu_agreement"]["outputs"][0]["top1_agreement"] == 1.0
    table = run_cli("validate", str(bundle), "--gpu")
    assert table.returncode == 0 and "GPU path, re-run on this host" in table.stdout
    assert "1 on the GPU path" in table.stderr and "pass" in table.stdout


@pytest.mark.build
@pytest.mark.parametrize("golden", ["golden/model.tflite.outputs.npz", "golden/reference_outputs.npz"])
def test_validate_gpu_fails_with_exit_1_when_a_golden_output_is_perturbed(digits, tmp_path, golden):
    """The CPU interpreter's recorded outputs perturbed: only the GPU path (judged against them)
    fails; the reference perturbed: both fail. The checksums are resealed, as a tamperer would."""
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(digits[0], bundle)
    data = dict(np.load(bundle / golden))
    key = next(iter(data))
    data[key] = np.roll(data[key], 1, axis=-1)  # every sample's scores shifted by one class
    np.savez(bundle / golden, **data)
    package.seal_bundle(bundle)
    proc = run_cli("validate", str(bundle), "--gpu", "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    (gpu,) = result["gpu"]
    assert not gpu["passed"] and gpu["status"] == "failed"
    if golden.endswith("outputs.npz") and "reference" not in golden:
        assert result["artifacts"][0]["passed"] and gpu["parity"]["passed"] and not gpu["cpu_agreement"]["passed"]
        assert gpu["reason"].startswith("vs the CPU interpreter: ")
    else:
        assert not result["artifacts"][0]["passed"] and not gpu["parity"]["passed"]


@pytest.mark.build
def test_ops_the_gpu_does_not_take_are_listed_per_artifact(tmp_path):
    proc, manifest = _build(str(TEST_MODELS / "gpu_fallback.py"), tmp_path, "--no-zip")
    assert proc.returncode == 0, proc.stderr
    gpu = manifest["artifacts"][0]["emulated_gpu"]
    assert gpu["status"] == "passed" and gpu["fully_accelerated"] is False
    assert gpu["fallback_ops"]["GATHER_ND"] == ["Operation is not supported."]
    assert gpu["ops"]["on_cpu"] >= 1 and gpu["ops"]["on_gpu"] >= 1
    assert any(w.startswith("model.tflite: LiteRT's GPU accelerator runs") and "GATHER_ND" in w
               for w in manifest["warnings"])


@pytest.mark.build
def test_an_fp16_overflow_only_the_gpu_shows_fails_the_build(tmp_path):
    """Activations beyond fp16's range: fine in the CPU interpreter (fp32 arithmetic), infinite on
    the GPU: parity failed, exit 1, the report in <target>.failed/."""
    proc, manifest = _build(str(TEST_MODELS / "fp16_overflow.py"), tmp_path, "--no-zip")
    assert proc.returncode == 1, proc.stderr
    (art,) = manifest["artifacts"]
    assert art["status"] == "parity-failed" and art["parity"]["passed"]
    gpu = art["emulated_gpu"]
    assert gpu["status"] == "failed" and "output contains NaN/Inf" in gpu["reason"]
    assert "GPU path (fp16 on Mesa lavapipe): failed" in manifest["failures"][0]
    assert (tmp_path / "dist" / "fp16-overflow" / "gpu-check.failed" / "manifest.json").is_file()


@pytest.mark.build
def test_an_emulator_that_cannot_be_set_up_fails_when_required_and_is_skipped_when_not(tmp_path):
    env = {"EDGEPACK_CACHE": str(tmp_path / "cache"), "EDGEPACK_DEBIAN_MIRROR": UNREACHABLE}
    spec = str(TEST_MODELS / "gpu_fallback.py")
    proc, _ = _build(spec, tmp_path / "a", "--no-zip", env=env, required=True)
    assert proc.returncode == 2, proc.stderr
    assert "emulator unavailable: cannot download" in proc.stderr and "EDGEPACK_DEBIAN_MIRROR" in proc.stderr
    assert not (tmp_path / "a" / "dist" / "gpu-fallback" / "gpu-check").exists()
    proc, manifest = _build(spec, tmp_path / "b", "--no-zip", env=env, required=False)
    assert proc.returncode == 0, proc.stderr
    gpu = manifest["artifacts"][0]["emulated_gpu"]
    assert gpu["status"] == "skipped" and gpu["reason"].startswith("cannot download")
    assert any("GPU path skipped: cannot download" in w for w in manifest["warnings"])


def test_the_profile_refuses_a_gpu_check_with_nothing_to_check():
    data = yaml.safe_load((TARGETS / "android-gpu.yaml").read_text())
    no_tflite = {**data, "artifacts": [a for a in data["artifacts"] if a["format"] != "tflite"]}
    with pytest.raises(ConfigError, match="gpu_check runs .tflite artifacts of precision fp16 or fp32"):
        parse_profile(no_tflite, "no-tflite.yaml")
    with pytest.raises(ConfigError, match="gpu_check: tolerances has no entry 'fp32'"):
        parse_profile({**data, "tolerances": {"fp16": data["tolerances"]["fp16"]},
                       "gpu_check": {"enabled": True, "tolerance": "fp32"}}, "no-fp32.yaml")
    # fp32 arithmetic on an fp16-weight .tflite is still judged by fp16's thresholds (the weights are fp16)
    fp32_gpu = parse_profile({**data, "gpu_check": {"enabled": True, "precision": "fp32"}}, "fp32.yaml").gpu_check
    assert fp32_gpu.tolerance_key("fp16") == "fp16" and fp32_gpu.tolerance_key("fp32") == "fp32"
    assert parse_profile({**no_tflite, "gpu_check": {"enabled": False}}, "off.yaml").gpu_check.required


@pytest.mark.build
def test_the_device_kit_runs_the_tflite_on_the_gpu_with_gpu(digits, tmp_path):
    """device/validate.py --gpu (what a phone with ai-edge-litert runs), here on lavapipe: the
    .tflite through LiteRT's GPU accelerator, judged by the thresholds of the build's GPU check."""
    import os
    import shutil
    import subprocess
    import sys

    bundle = tmp_path / "bundle"
    shutil.copytree(digits[0], bundle)
    report = tmp_path / "device_report.json"
    proc = subprocess.run([sys.executable, "device/validate.py", "--gpu", "--runs", "5", "--warmup", "1",
                           "--report", str(report)], cwd=bundle, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **lavapipe.ensure().environment()}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (art,) = json.loads(report.read_text())["artifacts"]
    assert art["runtime"] == "litert-gpu" and art["status"] == "passed" and art["fully_accelerated"] is True
    assert art["parity"]["thresholds"] == digits[1]["artifacts"][0]["emulated_gpu"]["parity"]["thresholds"]
    assert 1e-3 < art["parity"]["outputs"][0]["max_abs_error"] < 0.1  # fp16 arithmetic, as on the build host's check
    assert "GPU: every op on the GPU" in proc.stderr
