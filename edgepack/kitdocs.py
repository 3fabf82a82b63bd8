"""The device kit's documents, written for the bundle they are in: device/README.md (the kit's
guide with this bundle's model, target, files and runtimes) and, for an Android bundle,
device/APP.md (Gradle coordinates and Kotlin that feeds each artifact its exact IO).

Both are rendered from the bundle's manifest (a plain dict) before the bundle is sealed, so
their bytes are part of the payload digest and as reproducible as the rest of the bundle.
"""

from __future__ import annotations

import math
from typing import Any

# Device ABIs that name an Android build (Linux and other systems say aarch64 / x86-64).
ANDROID_ABIS = ("arm64-v8a", "armeabi-v7a")
# The placeholder bundle the kit's README template is written for.
TEMPLATE_MODEL, TEMPLATE_TARGET = "two-io", "android-arm64"
PIP_RUNTIME = {"onnx": "onnxruntime", "pte": "executorch", "tflite": "ai-edge-litert"}
GRADLE = {
    "tflite": ("com.google.ai.edge.litert:litert", "LiteRT"),
    "pte": ("org.pytorch:executorch-android", "ExecuTorch"),
    "onnx": ("com.microsoft.onnxruntime:onnxruntime-android", "onnxruntime"),
}
KOTLIN_ARRAY = {"float32": ("FloatArray", 4), "int8": ("ByteArray", 1), "uint8": ("ByteArray", 1),
                "int32": ("IntArray", 4), "int64": ("LongArray", 8), "float16": ("ShortArray", 2)}


def is_android(manifest: dict[str, Any]) -> bool:
    device = ((manifest.get("target") or {}).get("profile") or {}).get("device") or {}
    return device.get("arch") in ANDROID_ABIS


def _formats(manifest: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(a["format"] for a in manifest.get("artifacts", []) if a.get("file")))


def render_readme(template: str, manifest: dict[str, Any]) -> str:
    """The kit's README with this bundle's names, runtimes and (for Android) the adb section."""
    model, target = manifest["model"]["name"], manifest["target"]["name"]
    text = template.replace(f"{TEMPLATE_MODEL}-{TEMPLATE_TARGET}", f"{model}-{target}")
    text = text.replace(f"dist/{TEMPLATE_MODEL}/{TEMPLATE_TARGET}", f"dist/{model}/{target}")
    formats = _formats(manifest)
    runtimes = " ".join(PIP_RUNTIME[f] for f in formats if f in PIP_RUNTIME)
    text = text.replace("pip install numpy ai-edge-litert        # or tflite-runtime; onnxruntime for .onnx; "
                        "executorch for .pte", f"pip install numpy {runtimes}")
    if not is_android(manifest):
        start = text.find("## On an Android phone over adb")
        end = text.find("\n## ", start + 1)
        if start >= 0 and end > start:
            text = text[:start] + text[end + 1:]
        text = "\n".join(line for line in text.splitlines() if "device/run_android.sh" not in line) + "\n"
    files = ", ".join(f"`{a['file']}` ({a['format']} {a['precision']})" for a in manifest.get("artifacts", [])
                      if a.get("file"))
    header = f"This bundle: **{model}** for **{target}**: {files}."
    if is_android(manifest):
        header += " Putting it in an Android app: [APP.md](APP.md)."
    title, _, rest = text.partition("\n")
    return f"{title}\n\n{header}\n{rest}"


def _elements(shape: list[int]) -> int:
    return int(math.prod(int(d) for d in shape)) if shape else 1


def _io_comment(tensor: dict[str, Any]) -> str:
    note = f'"{tensor["name"]}": {tensor["dtype"]} {list(tensor["shape"])}'
    if tensor.get("scale") is not None:
        note += f', quantized: real = {tensor["scale"]!r} * (q - {tensor["zero_point"]})'
    return note


def _tflite_kotlin(art: dict[str, Any]) -> list[str]:
    lines = ["import org.tensorflow.lite.Interpreter", "import java.io.FileInputStream",
             "import java.nio.ByteBuffer", "import java.nio.ByteOrder", "import java.nio.channels.FileChannel", "",
             f'val model = context.assets.openFd("{art["file"]}").use {{ fd ->',
             "    FileInputStream(fd.fileDescriptor).channel.map(FileChannel.MapMode.READ_ONLY, fd.startOffset, "
             "fd.declaredLength)", "}",
             "val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(THREADS))"]
    for index, tensor in enumerate(art["io"]["inputs"]):
        size = _elements(tensor["shape"]) * KOTLIN_ARRAY.get(tensor["dtype"], ("", 4))[1]
        lines += [f"// input {index} {_io_comment(tensor)}",
                  f"val input{index} = ByteBuffer.allocateDirect({size}).order(ByteOrder.nativeOrder())"]
        if tensor.get("scale") is not None:
            lines.append(f"// fill: input{index}.put((Math.round(x / {tensor['scale']!r}f) + {tensor['zero_point']})"
                         f".coerceIn(-128, 127).toByte())")
    for index, tensor in enumerate(art["io"]["outputs"]):
        size = _elements(tensor["shape"]) * KOTLIN_ARRAY.get(tensor["dtype"], ("", 4))[1]
        lines += [f"// output {index} {_io_comment(tensor)}",
                  f"val output{index} = ByteBuffer.allocateDirect({size}).order(ByteOrder.nativeOrder())"]
    ins = ", ".join(f"input{i}" for i in range(len(art["io"]["inputs"])))
    outs = ", ".join(f"{i} to output{i}" for i in range(len(art["io"]["outputs"])))
    lines.append(f"interpreter.runForMultipleInputsOutputs(arrayOf<Any>({ins}), mapOf<Int, Any>({outs}))")
    return lines


def _pte_kotlin(art: dict[str, Any]) -> list[str]:
    lines = ["import java.io.File", "import org.pytorch.executorch.EValue", "import org.pytorch.executorch.Module",
             "import org.pytorch.executorch.Tensor", "",
             f'// Module.load takes a file path: copy "{art["file"]}" from assets to filesDir once.',
             f'val module = Module.load(File(context.filesDir, "{art["file"]}").path)']
    for index, tensor in enumerate(art["io"]["inputs"]):
        array = KOTLIN_ARRAY.get(tensor["dtype"], ("FloatArray", 4))[0]
        shape = ", ".join(str(int(d)) for d in tensor["shape"])
        lines += [f"// input {index} {_io_comment(tensor)}",
                  f"val input{index} = Tensor.fromBlob({array}({_elements(tensor['shape'])}), longArrayOf({shape}))"]
    args = ", ".join(f"EValue.from(input{i})" for i in range(len(art["io"]["inputs"])))
    lines.append(f"val outputs = module.forward({args})")
    for index, tensor in enumerate(art["io"]["outputs"]):
        getter = {"float32": "dataAsFloatArray", "int64": "dataAsLongArray", "int32": "dataAsIntArray",
                  "int8": "dataAsByteArray"}.get(tensor["dtype"], "dataAsFloatArray")
        lines += [f"// output {index} {_io_comment(tensor)}",
                  f"val output{index} = outputs[{index}].toTensor().{getter}"]
    return lines


def _onnx_kotlin(art: dict[str, Any]) -> list[str]:
    lines = ["import ai.onnxruntime.OnnxTensor", "import ai.onnxruntime.OrtEnvironment", "import ai.onnxruntime.OrtSession",
             "import java.io.File", "import java.nio.FloatBuffer", "import java.nio.IntBuffer", "import java.nio.LongBuffer",
             "", "val env = OrtEnvironment.getEnvironment()",
             "val options = OrtSession.SessionOptions().apply { setIntraOpNumThreads(THREADS) }",
             f'val session = env.createSession(File(context.filesDir, "{art["file"]}").path, options)']
    feeds = []
    for index, tensor in enumerate(art["io"]["inputs"]):
        shape = ", ".join(str(int(d)) for d in tensor["shape"])
        array = {"int64": "LongArray", "int32": "IntArray"}.get(tensor["dtype"], "FloatArray")
        buffer = {"int64": "LongBuffer", "int32": "IntBuffer"}.get(tensor["dtype"], "FloatBuffer")
        lines += [f"// input {index} {_io_comment(tensor)}",
                  f"val input{index} = OnnxTensor.createTensor(env, {buffer}.wrap({array}("
                  f"{_elements(tensor['shape'])})), longArrayOf({shape}))"]
        feeds.append(f'"{tensor["name"]}" to input{index}')
    lines.append(f"session.run(mapOf({', '.join(feeds)})).use {{ results ->")
    for index, tensor in enumerate(art["io"]["outputs"]):
        lines += [f"    // output {index} {_io_comment(tensor)}",
                  f"    val output{index} = (results[{index}] as OnnxTensor).floatBuffer"]
    lines.append("}")
    return lines


def render_app(manifest: dict[str, Any]) -> str | None:
    """device/APP.md for an Android bundle with a .tflite or .pte; None otherwise."""
    shipped = [a for a in manifest.get("artifacts", []) if a.get("file") and a.get("io") and a["format"] in GRADLE]
    if not is_android(manifest) or not shipped:
        return None
    model, target = manifest["model"]["name"], manifest["target"]["name"]
    threads = ((manifest["target"].get("profile") or {}).get("device") or {}).get("threads", 4)
    out = [f"# Into your Android app: {model} for {target}", "",
           "Generated from this bundle's manifest: the IO below is exactly what the build fed and read back "
           "(golden/<file>.inputs.npz holds test inputs in that form). Put the artifact in `app/src/main/assets/` "
           "and keep it uncompressed in the APK (`androidResources { noCompress += listOf(\"tflite\", \"pte\") }`).",
           ]
    for art in shipped:
        coordinate, runtime = GRADLE[art["format"]]
        version = str(art.get("runtime_version") or "").split("+")[0]
        out += ["", f"## {art['file']} ({art['precision']})", "",
                f"Validated in {runtime} {version or '(version in manifest.json)'} on the build host; use the "
                f"Android release of the same version or newer.", "", "```kotlin",
                f'// app/build.gradle.kts: implementation("{coordinate}:{version or "VERSION"}")']
        kotlin = {"tflite": _tflite_kotlin, "pte": _pte_kotlin, "onnx": _onnx_kotlin}[art["format"]](art)
        out += [line.replace("THREADS", str(threads)) for line in kotlin]
        out.append("```")
        portable = (art.get("export") or {}).get("portable_ops") or []
        quantized = [op for op in portable if str(op).startswith("quantized_decomposed::")]
        if quantized:
            out += ["", f"This .pte runs {len(quantized)} op(s) outside XNNPACK with ExecuTorch's quantized kernels "
                        f"({', '.join(sorted(set(map(str, quantized)))[:4])}): the Maven AAR includes them; a runtime "
                        "you build yourself must link `quantized_ops_lib`."]
    return "\n".join(out) + "\n"
