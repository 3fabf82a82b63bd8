"""Target profiles: shipped ones load and round-trip; bad ones fail naming the file and the key."""

from __future__ import annotations

import pytest
import yaml

from conftest import TARGETS, write_profile
from edgepack.errors import ConfigError
from edgepack.target import dump_profile, known_targets, load_target, parse_profile

SHIPPED = sorted(p.stem for p in TARGETS.glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profile_loads_and_round_trips(name):
    profile = load_target(name)
    assert profile.name == name
    again = parse_profile(yaml.safe_load(dump_profile(profile)), "round-trip")
    assert again.model_dump() == profile.model_dump()  # the same profile (where it was read from aside)
    assert again.sha256() == profile.sha256()


def test_known_targets_lists_shipped():
    assert set(SHIPPED) <= set(known_targets())
    assert {"x86-64", "android-arm64", "android-gpu"} <= set(SHIPPED)


def test_unknown_target_lists_known_ones():
    with pytest.raises(ConfigError) as info:
        load_target("no-such-target")
    assert "unknown target 'no-such-target'" in info.value.message
    assert "x86-64" in info.value.message


def _bad(tmp_path, text: str):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_target(str(path))
    assert str(path) in info.value.message
    return info.value.message


def _base_text() -> str:
    return (TARGETS / "x86-64.yaml").read_text()


def test_invalid_yaml_names_line_and_column(tmp_path):
    message = _bad(tmp_path, "name: x\ndevice: [unclosed\n")
    assert "invalid YAML" in message and ":3:1" in message


def test_unknown_key_is_named(tmp_path):
    message = _bad(tmp_path, _base_text() + "colour: blue\n")
    assert "colour: unknown key" in message


def test_unknown_nested_key_is_named(tmp_path):
    message = _bad(tmp_path, _base_text().replace("  ram_mb: 8192", "  ram_mb: 8192\n  ramm_mb: 1"))
    assert "device.ramm_mb: unknown key" in message


def test_wrong_type_is_named(tmp_path):
    message = _bad(tmp_path, _base_text().replace("threads: 2", "threads: many"))
    assert "device.threads" in message and "integer" in message


def test_missing_field_is_named(tmp_path):
    message = _bad(tmp_path, _base_text().replace("  memory_gbps: 20\n", ""))
    assert "device.memory_gbps: required key is missing" in message


def test_tolerance_out_of_range(tmp_path):
    message = _bad(tmp_path, _base_text().replace("min_cosine: 0.9999", "min_cosine: 1.5"))
    assert "tolerances.fp32.min_cosine" in message


def test_unknown_stage_type_lists_known(tmp_path):
    message = _bad(tmp_path, _base_text().replace("stages: []", "stages:\n  - type: prune-magic\n    amount: 0.5"))
    assert "stage type 'prune-magic'" in message and "prune-unstructured" in message


def test_unavailable_format_lists_known(tmp_path):
    message = _bad(tmp_path, _base_text().replace("format: onnx", "format: coreml"))
    assert "format 'coreml' is not available" in message and "'onnx'" in message


def test_precision_without_tolerance(tmp_path):
    text = _base_text().replace("  fp32: {atol: 1.0e-4, rtol: 1.0e-3, min_cosine: 0.9999}\n",
                                "  fp16: {min_cosine: 0.99}\n")
    message = _bad(tmp_path, text)
    assert "no entry for precision(s) ['fp32']" in message


def test_profile_not_a_mapping(tmp_path):
    message = _bad(tmp_path, "- just\n- a list\n")
    assert "must be a YAML mapping" in message


def test_user_profile_by_path(tmp_path):
    path = write_profile(tmp_path, "x86-64", name="my-box")
    assert load_target(str(path)).name == "my-box"


def test_extends_lays_a_small_file_over_a_shipped_profile(tmp_path):
    from edgepack.target import load_target

    path = tmp_path / "mine.yaml"
    path.write_text("extends: android-arm64\nname: mine\ntolerances:\n  int8:\n    min_cosine: 0.97\n")
    profile = load_target(str(path))
    base = load_target("android-arm64")
    assert profile.name == "mine" and profile.tolerances["int8"].min_cosine == 0.97
    # the rest of int8's thresholds and every other section come from the base
    assert profile.tolerances["int8"].min_sqnr_db == base.tolerances["int8"].min_sqnr_db
    assert profile.artifacts == base.artifacts and profile.device == base.device
    child = tmp_path / "child.yaml"
    child.write_text("extends: mine.yaml\nname: child\n")  # a path, relative to the extending file
    assert load_target(str(child)).tolerances["int8"].min_cosine == 0.97


def test_extends_cycles_and_bad_bases_are_named(tmp_path):
    from edgepack.target import load_target

    (tmp_path / "a.yaml").write_text("extends: b.yaml\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\nname: b\n")
    with pytest.raises(ConfigError, match="circle"):
        load_target(str(tmp_path / "a.yaml"))
    (tmp_path / "c.yaml").write_text("extends: [android-arm64]\nname: c\n")
    with pytest.raises(ConfigError, match="extends: give a target name"):
        load_target(str(tmp_path / "c.yaml"))


def test_set_assigns_by_path_and_names_a_bad_path():
    from edgepack.target import load_target

    profile = load_target("android-arm64", settings=["tolerances.int8.min_cosine=0.9", "artifacts.1.granularity=per-tensor",
                                                     "latency.runs=30"])
    assert profile.tolerances["int8"].min_cosine == 0.9 and profile.artifacts[1].granularity == "per-tensor"
    assert profile.latency.runs == 30
    with pytest.raises(ConfigError, match="is not an index"):
        load_target("android-arm64", settings=["artifacts.9.precision=fp32"])
    with pytest.raises(ConfigError, match="bogus"):
        load_target("android-arm64", settings=["bogus=1"])


def test_committed_profile_schema_is_current():
    import json

    from edgepack.target import SCHEMA_PATH, profile_json_schema

    assert json.loads(SCHEMA_PATH.read_text()) == json.loads(json.dumps(profile_json_schema()))
