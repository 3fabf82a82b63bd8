"""Model specs load from a file or a module:function, and bad specs fail clearly."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from conftest import TEST_MODELS
from edgepack.errors import SpecError
from edgepack.spec import ModelSpec, load_spec


def test_load_from_file():
    spec = load_spec(str(TEST_MODELS / "two_io.py"))
    assert isinstance(spec, ModelSpec) and spec.name == "two-io"
    assert len(spec.source_sha256) == 64


def test_load_from_module_function(monkeypatch):
    monkeypatch.syspath_prepend(str(TEST_MODELS))
    spec = load_spec("two_io:spec")
    assert spec.name == "two-io" and spec.source == "two_io:spec"


def _spec_file(tmp_path, body: str):
    path = tmp_path / "spec_under_test.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


HEADER = """
import torch
from torch import nn
from edgepack import ModelSpec
"""


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(str(tmp_path / "nope.py"))


def test_syntax_error_names_line(tmp_path):
    path = _spec_file(tmp_path, "def spec(:\n    pass\n")
    with pytest.raises(SpecError, match=r"spec_under_test.py:1:\d+: Python syntax error"):
        load_spec(path)


def test_spec_raises(tmp_path):
    path = _spec_file(tmp_path, "def spec():\n    raise RuntimeError('no weights here')\n")
    with pytest.raises(SpecError, match="spec\\(\\) raised RuntimeError: no weights here"):
        load_spec(path)


def test_spec_wrong_type(tmp_path):
    path = _spec_file(tmp_path, "def spec():\n    return 42\n")
    with pytest.raises(SpecError, match="returned int, not edgepack.ModelSpec"):
        load_spec(path)


def test_training_mode_is_switched_to_eval(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5)).train()
    x = (torch.randn(1, 4),)
    return ModelSpec(name="m", model=m, example_inputs=x, calibration=[x])
""")
    spec = load_spec(path)
    assert not spec.model.training
    assert any("eval mode" in note for note in spec.notes)


def test_example_inputs_do_not_fit(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    x = (torch.randn(1, 5),)
    return ModelSpec(name="m", model=m, example_inputs=x, calibration=[x])
""")
    with pytest.raises(SpecError, match=r"does not run on example_inputs \(\(1, 5\):float32\)"):
        load_spec(path)


def test_empty_calibration(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    return ModelSpec(name="m", model=m, example_inputs=(torch.randn(1, 4),), calibration=[])
""")
    with pytest.raises(SpecError, match="calibration is empty"):
        load_spec(path)


def test_calibration_nan_names_sample(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    good = (torch.randn(1, 4),)
    bad = (torch.tensor([[1.0, float('nan'), 0.0, 2.0]]),)
    return ModelSpec(name="m", model=m, example_inputs=good, calibration=[good, good, bad])
""")
    with pytest.raises(SpecError, match="calibration: sample 2 input 0 has 1 NaN/Inf"):
        load_spec(path)


def test_calibration_wrong_shape(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    return ModelSpec(name="m", model=m, example_inputs=(torch.randn(1, 4),), calibration=[(torch.randn(2, 4),)])
""")
    with pytest.raises(SpecError, match=r"sample 0 input 0 is \(2, 4\)"):
        load_spec(path)


def test_name_must_be_path_safe(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    x = (torch.randn(1, 4),)
    return ModelSpec(name="../escape", model=m, example_inputs=x, calibration=[x])
""")
    with pytest.raises(SpecError, match="not a safe bundle name"):
        load_spec(path)


@pytest.mark.parametrize("name", ["bob's-cnn;$(id)", "nul\x00name", "a b", ".hidden", "x" * 65, "é-net"])
def test_names_that_would_be_unsafe_paths_or_shell_words_are_refused(tmp_path, name):
    """The bundle name becomes a folder on the device and a word in run_android.sh's adb commands."""
    path = _spec_file(tmp_path, HEADER + f"""
def spec():
    m = nn.Linear(4, 3)
    x = (torch.randn(1, 4),)
    return ModelSpec(name={name!r}, model=m, example_inputs=x, calibration=[x])
""")
    with pytest.raises(SpecError, match="letters, digits"):
        load_spec(path)


def test_a_one_shot_calibration_generator_is_refused_at_load(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def spec():
    m = nn.Linear(4, 3)
    x = (torch.randn(1, 4),)
    return ModelSpec(name="gen", model=m, example_inputs=x, calibration=(x for _ in range(8)))
""")
    with pytest.raises(SpecError, match="one-shot iterator") as caught:
        load_spec(path)
    assert "pass a list" in caught.value.hint


def test_the_spec_check_streams_calibration_and_stops_at_the_cap():
    """10,000 samples made on demand: the check looks at 1,024 and keeps none of them."""
    from edgepack.spec import MAX_CALIBRATION, check_spec

    class Samples:
        produced = 0

        def __iter__(self):
            for index in range(10_000):
                Samples.produced += 1
                yield (torch.full((1, 4), float(index)),)

    spec = ModelSpec(name="stream", model=nn.Linear(4, 3).eval(), example_inputs=(torch.zeros(1, 4),),
                     calibration=Samples())
    check_spec(spec, "stream")
    assert Samples.produced == MAX_CALIBRATION


def test_bad_module_reference():
    with pytest.raises(SpecError, match="cannot import module"):
        load_spec("no_such_module_xyz:spec")


def test_a_file_reference_may_name_its_function(tmp_path):
    path = _spec_file(tmp_path, HEADER + """
def small():
    x = (torch.randn(1, 4),)
    return ModelSpec(name="small", model=nn.Linear(4, 2), example_inputs=x, calibration=[x])
""")
    assert load_spec(f"{path}:small").name == "small"
    with pytest.raises(SpecError, match=r"no function spec\(\) found"):
        load_spec(path)
    with pytest.raises(SpecError, match=r"no function other\(\) found"):
        load_spec(f"{path}:other")


def test_an_unimportable_module_reference_suggests_the_file_form():
    with pytest.raises(SpecError) as caught:
        load_spec("not_a_module_here.sub:spec")
    assert "ModuleNotFoundError" in caught.value.message and "path/to/sub.py:spec" in caught.value.hint
