"""kitdocs.py: the kit's README and APP.md are written for the bundle they are in."""

from __future__ import annotations

from importlib import resources

from edgepack import kitdocs


def _manifest(arch: str, artifacts: list[dict]) -> dict:
    return {"model": {"name": "wake-word"}, "target": {"name": "pixel-8", "profile": {"device": {"arch": arch,
                                                                                                  "threads": 4}}},
            "artifacts": artifacts}


def _artifact(fmt: str, precision: str, inputs: list[dict], outputs: list[dict], **extra) -> dict:
    return {"file": f"model.{fmt}", "format": fmt, "precision": precision, "runtime_version": "2.3.0",
            "io": {"inputs": inputs, "outputs": outputs}, **extra}


FLOAT_IN = {"name": "audio", "shape": [1, 16000], "dtype": "float32", "scale": None, "zero_point": None}
INT8_IN = {"name": "audio", "shape": [1, 16000], "dtype": "int8", "scale": 0.0078125, "zero_point": -3}
SCORES = {"name": "scores", "shape": [1, 12], "dtype": "float32", "scale": None, "zero_point": None}
TEMPLATE = resources.files("edgepack.device").joinpath("README.md").read_text()


def test_readme_names_this_bundle_and_its_runtimes_not_the_template_model():
    manifest = _manifest("arm64-v8a", [_artifact("tflite", "int8", [INT8_IN], [SCORES]),
                                       _artifact("pte", "int8", [FLOAT_IN], [SCORES])])
    text = kitdocs.render_readme(TEMPLATE, manifest)
    assert "two-io" not in text
    assert "wake-word-pixel-8" in text and "dist/wake-word/pixel-8" in text
    assert "pip install numpy ai-edge-litert executorch" in text
    assert "## On an Android phone over adb" in text and "[APP.md](APP.md)" in text


def test_a_non_android_bundle_has_no_adb_section():
    manifest = _manifest("x86_64", [_artifact("onnx", "fp32", [FLOAT_IN], [SCORES])])
    text = kitdocs.render_readme(TEMPLATE, manifest)
    assert "adb" not in text and "run_android.sh" not in text and "APP.md" not in text
    assert "pip install numpy onnxruntime\n" in text
    assert "## The report and `edgepack ingest`" in text  # the sections after it are kept
    assert kitdocs.render_app(manifest) is None


def test_app_md_feeds_each_artifact_its_exact_io():
    manifest = _manifest("arm64-v8a", [
        _artifact("tflite", "int8", [INT8_IN], [SCORES]),
        _artifact("pte", "int8", [FLOAT_IN, {**FLOAT_IN, "name": "state", "shape": [1, 64]}], [SCORES],
                  runtime_version="1.5.1+cpu",
                  export={"portable_ops": ["quantized_decomposed::embedding_byte.out"]})])
    text = kitdocs.render_app(manifest)
    assert 'implementation("com.google.ai.edge.litert:litert:2.3.0")' in text
    assert 'implementation("org.pytorch:executorch-android:1.5.1")' in text
    assert "ByteBuffer.allocateDirect(16000)" in text  # int8: one byte per element
    assert "real = 0.0078125 * (q - -3)" in text and "Math.round(x / 0.0078125f) + -3" in text
    assert "ByteBuffer.allocateDirect(48)" in text  # 12 float32 scores
    assert "setNumThreads(4)" in text
    assert "Tensor.fromBlob(FloatArray(64), longArrayOf(1, 64))" in text
    assert "module.forward(EValue.from(input0), EValue.from(input1))" in text
    assert "quantized_ops_lib" in text
