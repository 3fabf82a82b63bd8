"""The device kit on arm64 code under qemu-aarch64, end to end with the real LiteRT on the real
emulator: recorded by the build per CPU model, re-run by `edgepack validate --arm64`, a perturbed
golden output failing it, and an emulator that cannot be set up failing or skipping as the
profile says. The setup (~80 MB) goes through the product's own code on first use."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml

from conftest import TARGETS, run_cli
from edgepack import package
from edgepack.emulators.debian import DownloadRefused
from edgepack.errors import ConfigError, RuntimeCheckError
from edgepack.intake import load_bundle_manifest
from edgepack.steps.arm64_check import SWITCHED_OFF, check_bundle, switched_off
from edgepack.target import Arm64CheckSettings, parse_profile

UNREACHABLE = "http://127.0.0.1:9"


def _build_digits(tmp, out: str, *extra: str):
    proc = run_cli("build", "models/digits_cnn.py", "--target", str(tmp / "arm64-check.yaml"), "--out", str(tmp / out),
                   "--json", "--quiet", "--no-repro-check", *extra,
                   env={"EDGEPACK_ARM64_CHECK": "on", "EDGEPACK_BUILD_CACHE": str(tmp / "cache")})  # conftest: off, off
    return proc, json.loads(proc.stdout) if proc.stdout.strip() else None


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """`edgepack build models/digits_cnn.py --target android-arm64` (16 golden samples), zip included,
    with a build cache of its own (tmp/cache)."""
    tmp = tmp_path_factory.mktemp("digits-arm64")
    data = yaml.safe_load((TARGETS / "android-arm64.yaml").read_text())
    data.update(name="arm64-check", parity={"calibration_samples": 8, "holdout_samples": 8})
    (tmp / "arm64-check.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    proc, manifest = _build_digits(tmp, "dist")
    assert proc.returncode == 0, proc.stderr
    return tmp / "dist" / "digits-cnn" / "arm64-check", manifest


def test_the_build_validates_the_tflite_on_two_emulated_cpu_models(digits):
    _, manifest = digits
    by_file = {a["file"]: a for a in manifest["artifacts"]}
    record = by_file["model.tflite"]["emulated_arm64"]
    assert record["status"] == "passed" and [r["cpu"] for r in record["runs"]] == ["cortex-a53", "cortex-a76"]
    assert record["emulator"]["emulator"].startswith("qemu-aarch64 version 10.")
    assert record["emulator"]["kit"].startswith("the bundle's device/validate.py (byte-identical")
    assert "ai-edge-litert==" + manifest["toolchain"]["ai-edge-litert"] in record["emulator"]["wheels"]
    families = {r["cpu"]: r["kernel_family"]["family"] for r in record["runs"]}
    assert families == {"cortex-a53": "NEON SMLAL/SMULL (widening multiply-accumulate)",
                        "cortex-a76": "SDOT (dot product)"}
    recorded = by_file["model.tflite"]["parity"]
    for run in record["runs"]:
        assert run["status"] == "passed" and run["bit_identical"] is True and run["kernel_family"]["inferred"]
        assert run["runtime"] == "litert" and run["runtime_version"] == manifest["toolchain"]["ai-edge-litert"]
        # int8 kernels of another instruction set, the build host's outputs bit for bit: the same parity
        assert run["parity"]["passed"] and run["parity"]["thresholds"] == recorded["thresholds"]
        assert run["parity"]["outputs"][0]["cosine_min"] == recorded["outputs"][0]["cosine_min"]
        assert run["seconds"]["wall"] > 0 and "not device time" in run["seconds"]["label"]
        assert "latency" not in run  # emulated time is never recorded as latency
    assert "asimddp" in record["runs"][1]["features"] and "asimddp" not in record["runs"][0]["features"]
    pte = by_file["model.pte"]["emulated_arm64"]
    assert pte["status"] == "skipped" and pte["reason"].startswith("opt-in: ExecuTorch under emulation")
    assert not any("arm64" in w for w in manifest["warnings"])  # an opt-in left out is not a warning


def test_the_cpu_models_run_at_once_in_their_order_as_one_step(monkeypatch):
    """On 2 CPUs the emulated runs overlap (each keeps one host thread busy), keep the profile's
    order, and are one line of the build's timings; on 1 CPU they run one after the other."""
    import threading
    import time

    from edgepack.steps import arm64_check

    said, started = [], {}

    def run(cpu, say):
        started[cpu] = time.perf_counter()
        say(f"a line of {cpu}")
        time.sleep(0.3)
        return f"run on {cpu} in {threading.current_thread().name}"

    monkeypatch.setattr(arm64_check, "usable_cpus", lambda: 2)
    runs = arm64_check._each_cpu("model.tflite", ["cortex-a53", "cortex-a76"], said.append, run)
    assert [r.split(" in ")[0] for r in runs] == ["run on cortex-a53", "run on cortex-a76"]
    assert all("edgepack-arm64" in r for r in runs) and abs(started["cortex-a53"] - started["cortex-a76"]) < 0.25
    assert said == ["running model.tflite under qemu-aarch64 -cpu cortex-a53, cortex-a76 at once (the device kit "
                    "on arm64 code; emulated)"]
    said.clear()
    monkeypatch.setattr(arm64_check, "usable_cpus", lambda: 1)
    runs = arm64_check._each_cpu("model.tflite", ["cortex-a53", "cortex-a76"], said.append, run)
    assert said == ["a line of cortex-a53", "a line of cortex-a76"] and "MainThread" in runs[0]
    assert started["cortex-a76"] - started["cortex-a53"] >= 0.3


def test_a_rebuild_judges_the_cached_emulated_runs_again(digits):
    """The same build again: no qemu run (each run's outputs come from the build cache and are judged
    again), latency reused, the payload byte-identical; tolerances changed: the cached outputs are
    judged by the new thresholds, not the old verdict reused."""
    bundle, cold = digits
    tmp = bundle.parent.parent.parent
    proc, warm = _build_digits(tmp, "dist-warm")
    assert proc.returncode == 0, proc.stderr
    assert warm["package"]["payload_sha256"] == cold["package"]["payload_sha256"]
    assert warm["cache"]["hit"] and all(e["hit"] for e in warm["cache"]["latency"])
    assert [(r["cpu"], r["hit"]) for r in warm["cache"]["arm64_runs"]] == [("cortex-a53", True), ("cortex-a76", True)]
    assert [(r["cpu"], r["hit"]) for r in cold["cache"]["arm64_runs"]] == [("cortex-a53", False), ("cortex-a76", False)]
    warm_runs = {a["file"]: a for a in warm["artifacts"]}["model.tflite"]["emulated_arm64"]["runs"]
    cold_runs = {a["file"]: a for a in cold["artifacts"]}["model.tflite"]["emulated_arm64"]["runs"]
    for run, before in zip(warm_runs, cold_runs):
        assert run["status"] == "passed" and run["bit_identical"] and run["cache"]["hit"]
        assert run["cache"]["emulated_at"] == before["cache"]["emulated_at"] and run["seconds"] == before["seconds"]
        assert run["parity"] == before["parity"] and run["features"] == before["features"]
    assert not any("running model.tflite under qemu" in t["step"] for t in warm["timings"])
    assert any("cached emulated run" in t["step"] for t in warm["timings"])

    # stricter thresholds on the recorded artifact: the same cached outputs, judged again, now fail
    manifest = load_bundle_manifest(bundle)
    strict = manifest.model_copy(update={"artifacts": [
        a.model_copy(update={"parity": {**a.parity, "thresholds": {**a.parity["thresholds"], "min_sqnr_db": 90.0}}})
        if a.file == "model.tflite" else a for a in manifest.artifacts]})
    from edgepack.cache import BuildCache
    from edgepack.runtimes import forkserver

    forkserver.prestart("onnxruntime", 1)
    records = check_bundle(bundle, strict, Arm64CheckSettings(), say=lambda m: None, only="model.tflite",
                           cache=BuildCache(tmp / "cache"))
    assert forkserver.fork_server_pids() == []  # stopped: nothing runs in them under emulation
    runs = records["model.tflite"].runs
    assert records["model.tflite"].status == "failed" and all(r.cache["hit"] for r in runs)
    assert all(r.parity["thresholds"]["min_sqnr_db"] == 90.0 and not r.parity["passed"] for r in runs)
    assert all(r.bit_identical for r in runs)  # the outputs are the same; only the verdict changed


def test_validate_arm64_rechecks_from_the_bundle_and_its_zip(digits):
    bundle, _ = digits
    for source in (bundle, bundle.parent.parent / "digits-cnn-arm64-check.zip"):
        proc = run_cli("validate", str(source), "--arm64", "--cpu", "cortex-a53", "--artifact", "model.tflite", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        (run,) = result["arm64"]["model.tflite"]["runs"]
        assert run["cpu"] == "cortex-a53" and run["bit_identical"] and run["status"] == "passed"
    table = run_cli("validate", str(bundle), "--arm64", "--cpu", "cortex-a53")
    assert table.returncode == 0 and "under qemu-aarch64" in table.stdout and "bit-identical" in table.stdout
    assert "1 on 1 emulated arm64 CPU(s)" in table.stderr
    assert run_cli("validate", str(bundle), "--cpu", "cortex-a53").returncode == 2  # --cpu goes with --arm64
    bad = run_cli("validate", str(bundle), "--arm64", "--cpu", "cortex-a99")
    assert bad.returncode == 2 and "qemu-aarch64's CPU models are" in bad.stderr


@pytest.mark.parametrize("golden", ["golden/model.tflite.outputs.npz", "golden/reference_outputs.npz"])
def test_validate_arm64_exits_1_when_a_golden_output_is_perturbed(digits, tmp_path, golden):
    """The build host's outputs perturbed: int8 must be bit-identical, so only the arm64 check fails;
    the reference perturbed: parity fails on the host and under emulation. Checksums are resealed,
    as a tamperer would."""
    bundle = tmp_path / "bundle"
    shutil.copytree(digits[0], bundle)
    data = dict(np.load(bundle / golden))
    key = next(iter(data))
    data[key] = np.roll(data[key], 1, axis=-1) if "reference" in golden else data[key] + np.float32(0.5)
    np.savez(bundle / golden, **data)
    package.seal_bundle(bundle)
    proc = run_cli("validate", str(bundle), "--arm64", "--cpu", "cortex-a53", "--artifact", "model.tflite", "--json")
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    (run,) = result["arm64"]["model.tflite"]["runs"]
    assert run["status"] == "failed"
    if "reference" in golden:
        assert not result["artifacts"][0]["passed"] and not run["parity"]["passed"]
    else:
        assert result["artifacts"][0]["passed"] and run["parity"]["passed"] and not run["bit_identical"]
        assert "must be bit-identical" in run["reason"]


def test_the_bundle_s_own_script_is_never_run(digits, tmp_path):
    """A bundle is untrusted input and qemu-user is no sandbox: a changed device/validate.py (resealed)
    is not executed; this edgepack's kit runs and the record says the bundle's differs."""
    bundle = tmp_path / "bundle"
    shutil.copytree(digits[0], bundle)
    (bundle / "device/validate.py").write_text("import os\nos.system('touch PWNED')\n")
    manifest = package.seal_bundle(bundle)
    records = check_bundle(bundle, manifest, Arm64CheckSettings(cpus=["cortex-a76"]), say=lambda m: None,
                           only="model.tflite")
    record = records["model.tflite"]
    assert record.status == "passed" and record.emulator["kit"].startswith("this edgepack's device/validate.py")
    assert not list(tmp_path.rglob("PWNED"))


def test_the_build_leaves_out_what_it_already_failed(digits):
    """A build runs the emulated check on artifacts that passed on the host only (a failure is
    recorded once); validate --arm64 runs whatever the bundle ships."""
    bundle, _ = digits
    manifest = load_bundle_manifest(bundle)
    failed = manifest.model_copy(update={"artifacts": [a.model_copy(update={"status": "parity-failed"})
                                                       for a in manifest.artifacts]})
    records = check_bundle(bundle, failed, Arm64CheckSettings(), say=pytest.fail, passed_only=True)
    assert {r.status for r in records.values()} == {"skipped"}
    assert records["model.tflite"].reason == "its build status is parity-failed"


def test_switched_off_records_skipped_and_sets_nothing_up(digits, monkeypatch):
    """EDGEPACK_ARM64_CHECK=off (the test suite's default): what would run is recorded as skipped,
    nothing is set up or run; validate --arm64 ignores it."""
    bundle, _ = digits
    records = check_bundle(bundle, load_bundle_manifest(bundle), Arm64CheckSettings(), say=pytest.fail, off=True)
    assert records["model.tflite"].status == "skipped" and records["model.tflite"].reason == SWITCHED_OFF
    assert records["model.pte"].reason.startswith("opt-in")  # what the profile leaves out stays so


def test_the_switch_takes_on_or_off(monkeypatch):
    for value, off in (("", False), ("on", False), ("OFF", True), ("off", True)):
        monkeypatch.setenv("EDGEPACK_ARM64_CHECK", value)
        assert switched_off() is off
    monkeypatch.setenv("EDGEPACK_ARM64_CHECK", "maybe")
    with pytest.raises(ConfigError, match="EDGEPACK_ARM64_CHECK='maybe': give on or off"):
        switched_off()


def test_a_hang_under_emulation_is_a_runtime_error(digits):
    bundle, _ = digits
    with pytest.raises(RuntimeCheckError, match=r"model.tflite under qemu-aarch64 -cpu cortex-a53: no answer within"):
        check_bundle(bundle, load_bundle_manifest(bundle), Arm64CheckSettings(timeout_s=0.2), say=lambda m: None)


def test_an_emulator_that_cannot_be_set_up_fails_when_required_and_is_skipped_when_not(digits, monkeypatch, tmp_path):
    bundle, _ = digits
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEPACK_DEBIAN_MIRROR", UNREACHABLE)
    manifest = load_bundle_manifest(bundle)
    with pytest.raises(DownloadRefused, match="cannot download"):
        check_bundle(bundle, manifest, Arm64CheckSettings(), say=lambda m: None)
    records = check_bundle(bundle, manifest, Arm64CheckSettings(required=False), say=lambda m: None)
    assert records["model.tflite"].status == "skipped" and records["model.tflite"].reason.startswith("cannot download")
    proc = run_cli("validate", str(bundle), "--arm64", env={"EDGEPACK_CACHE": str(tmp_path / "cache"),
                                                            "EDGEPACK_DEBIAN_MIRROR": UNREACHABLE})
    assert proc.returncode == 2 and "emulator unavailable: cannot download" in proc.stderr


@pytest.mark.slow
def test_instructions_per_inference_are_counted_and_repeat(digits):
    """count_instructions: the .tflite under cortex-a76 in the plugin-enabled qemu (built on first
    use), twice: the same figure to the instruction, its SDOT share the kernel's."""
    bundle, _ = digits
    settings = Arm64CheckSettings(cpus=["cortex-a76"], count_instructions=True)
    counts = [check_bundle(bundle, load_bundle_manifest(bundle), settings, say=lambda m: None,
                           only="model.tflite")["model.tflite"].instructions for _ in range(2)]
    first, second = counts
    assert first["cpu"] == "cortex-a76" and first["repeatable"] and first["spread"] == 0
    assert first["per_inference"] == second["per_inference"] and first["counts"] == second["counts"]
    # 3.12 M MACs: SDOT by element does 16 int8 MACs, so ~195k of them (225,920 measured)
    assert 150_000 < first["by_class"]["sdot_udot_elem"] < 300_000 < first["per_inference"] < 1_000_000
    assert "float_sibling" not in first  # this bundle ships no fp32 .tflite and no baseline was given


def test_the_profile_section_is_checked_when_it_loads():
    data = yaml.safe_load((TARGETS / "android-arm64.yaml").read_text())
    assert data["arm64_check"]["enabled"] and data["arm64_check"]["cpus"] == ["cortex-a53", "cortex-a76"]
    with pytest.raises(ConfigError, match=r"arm64_check.cpus\[0\]: Input should be 'a64fx'"):
        parse_profile({**data, "arm64_check": {"cpus": ["cortex-a99"]}}, "bad.yaml")
    with pytest.raises(ConfigError, match="arm64_check.cpus: Value error, names .* repeat"):
        parse_profile({**data, "arm64_check": {"cpus": ["cortex-a53", "cortex-a53"]}}, "bad.yaml")
    with pytest.raises(ConfigError, match="arm64_check.runtimes"):
        parse_profile({**data, "arm64_check": {"runtimes": ["tensorrt"]}}, "bad.yaml")
    settings = parse_profile(data, "ok.yaml").arm64_check
    assert settings.runtimes == ["litert", "onnxruntime"] and settings.identical == ["int8"]
    assert not settings.count_instructions and settings.required
