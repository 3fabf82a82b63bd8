"""api.py: edgepack from Python, as examples/python_api.py and a notebook use it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import edgepack
from edgepack.errors import ConfigError, SpecError
from tests.conftest import REPO

FAST = {"check_reproducible": False, "write_zip": False}


def test_the_example_builds_validates_and_says_so(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "python_api.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "build: exit 0" in proc.stdout and "validate: exit 0 (2 artifact(s)" in proc.stdout
    assert (tmp_path / "digits-example" / "x86-64" / "manifest.json").is_file()


def test_a_bare_module_with_a_profile_object_and_overrides(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    samples = [(torch.randn(1, 6),) for _ in range(20)]
    profile = edgepack.load_target("x86-64", overrides={"artifacts": [{"format": "onnx", "precision": "fp32"}]})
    result = edgepack.build(model, profile, tmp_path, example_inputs=samples[0][0], calibration=samples[:16],
                            holdout=samples[16:], set=["latency.runs=20"], **FAST)
    assert result.passed and result.exit_code == 0
    assert result.manifest.model.name == "sequential"
    assert [a.file for a in result.manifest.artifacts] == ["model.onnx"]
    assert result.manifest.target.name == "x86-64"
    assert edgepack.inspect(result.bundle_dir).status == "passed"
    assert edgepack.validate(result.bundle_dir).exit_code == 0


def test_bad_arguments_raise_the_clis_errors(tmp_path):
    model = nn.Linear(4, 2)
    with pytest.raises(SpecError, match="needs example_inputs= and calibration="):
        edgepack.build(model, "x86-64", tmp_path)
    with pytest.raises(SpecError, match="not int"):
        edgepack.build(3, "x86-64", tmp_path)
    with pytest.raises(ConfigError, match="TargetProfile"):
        edgepack.build(model, 3.5, tmp_path, example_inputs=(torch.randn(1, 4),), calibration=[(torch.randn(1, 4),)])
    with pytest.raises(ConfigError) as caught:
        edgepack.load_target("x86-64", settings=["latency.runs=-1"])
    assert caught.value.exit_code == 2 and "latency.runs" in caught.value.message


def test_the_package_exports_what_its_docstring_names():
    assert edgepack.__version__ and set(edgepack.__all__) >= {"build", "validate", "inspect", "diagnose", "ModelSpec",
                                                             "load_target", "BuildResult", "EdgepackError"}
    for name in edgepack.__all__:
        assert getattr(edgepack, name) is not None


def test_a_format_whose_extra_is_missing_fails_before_any_work(tmp_path, monkeypatch):
    from edgepack import export
    from edgepack.errors import RuntimeUnavailable

    monkeypatch.setitem(export.REQUIRES, "onnx", ("onnxextra", ("edgepack_no_such_package",)))
    model = nn.Linear(4, 2)
    with pytest.raises(RuntimeUnavailable) as caught:
        edgepack.build(model, "x86-64", tmp_path, example_inputs=(torch.randn(1, 4),), calibration=[(torch.randn(1, 4),)])
    assert ".onnx needs edgepack_no_such_package" in caught.value.message
    assert "pip install 'edgepack[onnxextra]'" in caught.value.hint and caught.value.exit_code == 2
    assert not any(tmp_path.iterdir())


def test_the_readme_spec_snippet_builds_as_written(tmp_path):
    text = (REPO / "README.md").read_text()
    block = text.split("A spec file exposes `spec() -> edgepack.ModelSpec`:", 1)[1].split("```python\n", 1)[1]
    spec_file = tmp_path / "readme_spec.py"
    spec_file.write_text(block.split("```", 1)[0])
    result = edgepack.build(str(spec_file), "x86-64", tmp_path / "dist", set=["latency.runs=20"], **FAST)
    assert result.exit_code == 0, result.messages
    assert result.manifest.model.name == "tiny-mlp"
