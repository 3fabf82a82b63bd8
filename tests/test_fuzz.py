"""Fuzzing: whatever a profile or a manifest contains, loading it gives a value or edgepack's own
error, never another exception; and damaged artifacts given to `edgepack validate` end in a
documented exit code (edgepack/fuzz.py, `make fuzz` runs it longer).
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, TARGETS
from edgepack.bundle import (ArtifactEntry, ArtifactIO, FileEntry, GoldenFiles, GoldenInfo, Manifest, ModelInfo,
                             PackageInfo, ReferenceInfo, TargetInfo, write_manifest)
from edgepack.intake import load_bundle_manifest
from edgepack.errors import BundleError, ConfigError
from edgepack.target import _resolved_data, load_target, parse_profile

FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# --- strategies: YAML/JSON-shaped data and mutations of a valid document -------------------------

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from([0.0, -0.5, 0.5, 1.0, 1.5, 1e300, 2**63, -(2**63), "1e-3", "", "\n", "fp32", "int8", "onnx",
                     "pte", "tflite", "per-tensor", "global", "0" * 64, "f" * 64 + "\n", "passed", "ok", "failed"]),
)
KEYS = st.one_of(st.text(max_size=10), st.integers(), st.none(),
                 st.sampled_from(["type", "format", "precision", "name", "amount", "epochs", "granularity", "status",
                                  "files", "path", "sha256", "bytes", "package", "io", "golden", "artifacts"]))
DATA = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                     st.dictionaries(KEYS, inner, max_size=4)),
                    max_leaves=16)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from _paths(value, prefix + (index,))


@st.composite
def mutations_of(draw, bases, keys=KEYS):
    """A valid document with 1-4 random edits: replace a value, delete it, add a sibling, or bend a string."""
    doc = copy.deepcopy(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        paths = [p for p in _paths(doc) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        edit = draw(st.sampled_from(["replace", "delete", "add", "bend"]))
        if edit == "replace":
            parent[path[-1]] = draw(DATA)
        elif edit == "delete":
            del parent[path[-1]]
        elif edit == "add" and isinstance(parent, dict):
            parent[draw(keys)] = draw(DATA)
        elif edit == "add":
            parent.insert(draw(st.integers(0, len(parent))), draw(DATA))
        elif isinstance(parent[path[-1]], str):
            parent[path[-1]] += draw(st.sampled_from(["\n", " ", "\x00", "é", "/../x", parent[path[-1]]]))
        else:
            parent[path[-1]] = draw(DATA)
    return doc


# --- profiles ----------------------------------------------------------------------------------

def _profile_bases() -> list[dict]:
    shipped = [_resolved_data(p) for p in sorted(TARGETS.glob("*.yaml"))]  # extends: resolved
    every_stage = copy.deepcopy(yaml.safe_load((TARGETS / "android-arm64.yaml").read_text()))
    every_stage["stages"] = [
        {"type": "prune-unstructured", "amount": 0.3},
        {"type": "prune-structured", "ratio": 0.2, "round_to": 8},
        {"type": "sparsify", "ignore": []},
        {"type": "prune-gradual", "final_sparsity": 0.5, "epochs": 2},
        {"type": "distill", "epochs": 1},
        {"type": "qat", "epochs": 2, "freeze_observers_after": 1},
    ]
    every_stage["artifacts"].append({"name": "model", "format": "onnx", "precision": "int8",
                                     "quantizer": "onnxruntime", "calibration_method": "entropy"})
    every_stage["budgets"] = {"max_bytes": 1_000_000, "max_latency_ms": 5}
    return shipped + [every_stage]


PROFILE_BASES = _profile_bases()


def test_profile_bases_are_valid():
    for base in PROFILE_BASES:
        parse_profile(base, "base")


def _profile_or_config_error(data) -> None:
    try:
        parse_profile(data, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.message.startswith("fuzz.yaml") and exc.exit_code == 2


@FUZZ
@given(DATA)
def test_any_data_gives_a_profile_or_config_error(data):
    _profile_or_config_error(data)


@FUZZ
@given(mutations_of(PROFILE_BASES))
def test_mutated_profile_gives_a_profile_or_config_error(data):
    _profile_or_config_error(data)


@st.composite
def yaml_text_mutations(draw):
    text = draw(st.sampled_from([yaml.safe_dump(b, sort_keys=False) for b in PROFILE_BASES]))
    for _ in range(draw(st.integers(1, 3))):
        spot = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "duplicate-line"]))
        if edit == "insert":
            text = text[:spot] + draw(st.sampled_from(["\t", ":", "- ", "[", "{", "&a ", "*a", "!!python/object ",
                                                       "2024-13-45", "\n  ", "'", "%", "@", "\x00"])) + text[spot:]
        elif edit == "delete":
            text = text[:spot] + text[spot + draw(st.integers(1, 20)):]
        else:
            lines = text.splitlines(keepends=True)
            index = draw(st.integers(0, len(lines) - 1))
            text = "".join(lines[: index + 1] + lines[index:])
    return text


@FUZZ
@given(yaml_text_mutations())
def test_mutated_yaml_file_gives_a_profile_or_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "fuzz.yaml"
    path.write_text(text)
    try:
        load_target(str(path))
    except ConfigError as exc:
        assert str(path) in exc.message


@pytest.mark.parametrize("text, words", [
    ("name: x\ndescription: 2024-13-45\n", "artifacts: required key is missing"),  # found by fuzzing: ValueError
    ("name: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),  # found by fuzzing: RecursionError
])
def test_yaml_that_pyyaml_cannot_build_is_a_config_error(tmp_path, text, words):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_target(str(path))
    assert words in info.value.message


def test_a_hundred_errors_are_summarised(tmp_path):
    base = copy.deepcopy(PROFILE_BASES[0])
    base["artifacts"] = [{"format": "onnx", "colour": i} for i in range(100)]
    with pytest.raises(ConfigError) as info:
        parse_profile(base, "many.yaml")
    assert len(info.value.message.splitlines()) <= 21 and "... and" in info.value.message


# --- manifests ---------------------------------------------------------------------------------

SHA = "ab" * 32


def _valid_manifest() -> dict:
    """A manifest with one shipped artifact, one failed one and package info, as a build writes it."""
    tensor = {"name": "image", "shape": [1, 3, 8, 8], "dtype": "float32"}
    scores = {"name": "scores", "shape": [1, 5], "dtype": "float32"}
    parity = {"passed": True, "samples": 4, "thresholds": {"atol": 1e-4, "rtol": 1e-3},
              "outputs": [{"name": "scores", "max_abs_error": 0.0, "cosine_min": 1.0, "sqnr_db": 200.0,
                           "top1_agreement": 1.0, "passed": True, "failures": []}]}
    manifest = Manifest(
        status="failed", failures=["model-int4.onnx (onnx, int4-weight): nothing to quantize"], warnings=[],
        edgepack_version="0.1.0",
        model=ModelInfo(name="m", source="models/m.py", source_sha256=SHA, params=10, nonzero_params=10, macs=100,
                        bytes=40),
        target=TargetInfo(name="x86-64", source="x86-64", profile_sha256=SHA, profile={"name": "x86-64"}),
        io=ArtifactIO(inputs=[tensor], outputs=[scores]),
        reference=ReferenceInfo(runtime_version="1.22", bytes=1000, torch_parity={"passed": True}),
        artifacts=[
            ArtifactEntry(name="model", format="onnx", precision="fp32", status="ok", file="model.onnx",
                          files=[FileEntry(path="model.onnx", bytes=1000, sha256=SHA)], bytes=1000, zip_bytes=500,
                          sha256=SHA, runtime="onnxruntime", runtime_version="1.22",
                          config={"name": "model", "format": "onnx", "precision": "fp32"},
                          io=ArtifactIO(inputs=[tensor], outputs=[scores]),
                          golden=GoldenFiles(inputs="golden/model.onnx.inputs.npz",
                                             outputs="golden/model.onnx.outputs.npz"),
                          parity=parity, latency={"p50_ms": 0.1, "runs": 20}, size={"ratio_to_float": 1.0}),
            ArtifactEntry(name="model-int4", format="onnx", precision="int4-weight", status="failed",
                          error="nothing to quantize", config={"name": "model-int4", "format": "onnx"}),
        ],
        golden=GoldenInfo(inputs="golden/inputs.npz", reference_outputs="golden/reference_outputs.npz", samples=4),
        toolchain={"python": "3.11.7", "torch": "2.13.0"}, host={"machine": "x86_64"},
        package=PackageInfo(files=[FileEntry(path="model.onnx", bytes=1000, sha256=SHA)], payload_sha256=SHA,
                            payload_sha256_method="sha256 over the payload"),
    )
    return manifest.model_dump(mode="json")


MANIFEST_BASE = _valid_manifest()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bundle")


def _manifest_or_bundle_error(bundle: Path, text: str) -> None:
    (bundle / "manifest.json").write_text(text)
    try:
        assert isinstance(load_bundle_manifest(bundle), Manifest)
    except BundleError as exc:
        assert "manifest.json" in exc.message and exc.exit_code == 2


def test_manifest_base_is_valid(bundle_dir):
    write_manifest(bundle_dir / "manifest.json", Manifest.model_validate(MANIFEST_BASE))
    assert load_bundle_manifest(bundle_dir).model_dump(mode="json") == MANIFEST_BASE


@FUZZ
@given(mutations_of([MANIFEST_BASE]))
def test_mutated_manifest_gives_a_manifest_or_bundle_error(bundle_dir, data):
    _manifest_or_bundle_error(bundle_dir, json.dumps(data))


@FUZZ
@given(st.data())
def test_damaged_manifest_text_gives_a_manifest_or_bundle_error(bundle_dir, data):
    text = bytearray(json.dumps(MANIFEST_BASE, indent=2).encode())
    for _ in range(data.draw(st.integers(1, 6))):
        spot = data.draw(st.integers(0, len(text) - 1))
        text[spot] = data.draw(st.integers(0, 255))
    (bundle_dir / "manifest.json").write_bytes(bytes(text))
    try:
        load_bundle_manifest(bundle_dir)
    except BundleError as exc:
        assert exc.exit_code == 2


def test_sha256_with_a_trailing_newline_is_a_bundle_error(bundle_dir):
    data = copy.deepcopy(MANIFEST_BASE)
    data["artifacts"][0]["files"][0]["sha256"] = SHA + "\n"
    with pytest.raises(BundleError):
        (bundle_dir / "manifest.json").write_text(json.dumps(data))
        load_bundle_manifest(bundle_dir)


# --- the artifact byte fuzzer --------------------------------------------------------------------

def test_fuzz_driver_classifies_every_case(tmp_path):
    """30 seeded cases over the ONNX and LiteRT artifacts of a small bundle: every case ends in a
    documented exit code, none is an unexpected exception, no worker outlives its case, and a case
    replays alone with the same damage and outcome. (`make fuzz` adds the .pte: its export and
    ExecuTorch's one-time import in the fork server would double this test's minute.)"""
    work, report = tmp_path / "work", tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "-m", "edgepack.fuzz", "--cases", "30", "--seed", "7", "--formats",
                           "onnx,tflite", "--kinds", "artifact", "--timeout", "60", "--work", str(work), "--json",
                           str(report), "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(report.read_text())
    assert summary["cases"] == 30 and sum(summary["outcomes"].values()) == 30
    assert summary["outcomes"]["internal"] == 0 and summary["leaks"] == []
    assert set(summary["by_format"]) == {"onnx", "tflite"}
    assert summary["fork_servers"] == 2  # one per runtime, started once: no server died along the way
    assert sum(sum(kinds.values()) for kinds in summary["runtime_errors"].values()) == summary["outcomes"]["3"]
    assert summary["outcomes"]["3"] > 0  # most damage stops the runtime from loading the file
    for outcome in ("0", "1", "2", "3"):
        assert f"  {outcome} " in proc.stdout  # the table prints every outcome, even at zero

    case = summary["records"][11]
    bundle = Path(case["bundle"])
    proc = subprocess.run([sys.executable, "-m", "edgepack.fuzz", "--seed", "7", "--case", "11", "--bundle", str(bundle),
                           "--kinds", "artifact", "--keep", str(tmp_path / "case-11"), "--json",
                           str(tmp_path / "replay.json"), "--quiet"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (replay,) = json.loads((tmp_path / "replay.json").read_text())["records"]
    assert {k: replay[k] for k in ("file", "mutation", "detail", "outcome")} == \
           {k: case[k] for k in ("file", "mutation", "detail", "outcome")}
    assert (tmp_path / "case-11" / "manifest.json").is_file()


def test_fuzzing_manifests_golden_files_zips_reports_and_links(tmp_path):
    """60 seeded cases over every kind of damage a bundle can carry: each ends in a documented exit
    code, no case reads outside its bundle, and the fuzzer stays far under 1 GB."""
    report = tmp_path / "fuzz.json"
    proc = subprocess.run([sys.executable, "-m", "edgepack.fuzz", "--cases", "60", "--seed", "3", "--formats", "onnx",
                           "--kinds", "golden,manifest,zip,report,link", "--timeout", "60", "--work",
                           str(tmp_path / "work"), "--json", str(report), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads(report.read_text())
    assert summary["outcomes"]["internal"] == 0 and summary["violations"] == [] and summary["leaks"] == []
    assert set(summary["by_kind"]) == {"golden", "manifest", "zip", "report", "link"}
    assert summary["outcomes"]["2"] > 20  # most damage is a bundle error, named and clean
    assert summary["by_kind"]["link"]["2"] == sum(summary["by_kind"]["link"].values())
    assert summary["peak_memory_mb"]["fuzzer"] < 1024
    assert "per kind" in proc.stdout
