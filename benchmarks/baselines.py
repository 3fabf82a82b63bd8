"""What a user would do without edgepack: each toolchain's plain, documented path, default settings.

Exports run in a child process per toolchain group (``python benchmarks/baselines.py GROUP
SPEC OUTDIR``), so a crash or a hang in one toolchain costs only that group, and its memory
is returned when it exits. The parent (run.py) then runs every file through edgepack's
RuntimeSession with the same warmup/runs/threads and inputs as the pipeline's artifacts.

APIs (versions pinned in pyproject.toml):
  onnx:       torch.onnx.export(model, example_inputs, path)  (torch 2.13 default: dynamo exporter,
              weights in path.data); onnxruntime.quantization.quantize_dynamic(fp32, out) and
              quantize_static(fp32, out, CalibrationDataReader) with every other argument left at
              its default (QDQ, QInt8 activations and weights, per-tensor, MinMax; no
              quant_pre_process).
  litert:     litert_torch.convert(model, example_inputs).export(path); ai-edge-quantizer
              Quantizer(fp32_bytes, recipe.dynamic_wi8_afp32()).quantize().quantized_model
              (int8 channelwise weights, float activations quantized at run time).
  executorch: torch.export.export -> to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])
              -> to_executorch(), written as .pte; fp32, no quantization.
  PT2E int8:  the documented static int8 path of each mobile toolchain, calibrated on the same
              samples as edgepack: torch.export(...).module() -> prepare_pt2e(quantizer) ->
              calibrate -> convert_pt2e, with ExecuTorch's XNNPACKQuantizer and
              get_symmetric_quantization_config(is_per_channel=True), then lowered to XNNPACK
              (pte-int8-pt2e); with litert-torch's PT2EQuantizer and its symmetric per-channel
              config, then litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))
              (tflite-int8-pt2e). What an edgepack cold build is compared with in time.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Baseline:
    name: str
    group: str | None      # export group (one child process); None: nothing to export
    format: str
    precision: str
    runtime: str           # RuntimeSession runtime: an edgepack runner, or a dotted module
    recipe: str


EAGER = "torch-eager"
BASELINES: tuple[Baseline, ...] = (
    Baseline(EAGER, None, "torch", "fp32", "benchmarks.torch_runner",
             "spec.model.eval() under torch.inference_mode(), torch.set_num_threads(threads)"),
    Baseline("onnx-fp32", "onnx", "onnx", "fp32", "onnxruntime",
             "torch.onnx.export(model, example_inputs, path) defaults; onnxruntime CPU EP"),
    Baseline("onnx-int8-dynamic", "onnx", "onnx", "int8-dynamic", "onnxruntime",
             "onnxruntime.quantization.quantize_dynamic(fp32, out), defaults"),
    Baseline("onnx-int8-static", "onnx", "onnx", "int8", "onnxruntime",
             "onnxruntime.quantization.quantize_static(fp32, out, reader), defaults (QDQ, QInt8, per-tensor, MinMax)"),
    Baseline("tflite-fp32", "litert", "tflite", "fp32", "litert",
             "litert_torch.convert(model, example_inputs)"),
    Baseline("tflite-int8-dynamic", "litert", "tflite", "int8-dynamic", "litert",
             "ai_edge_quantizer Quantizer(fp32, recipe.dynamic_wi8_afp32()).quantize()"),
    Baseline("pte-fp32", "executorch", "pte", "fp32", "executorch",
             "torch.export -> to_edge_transform_and_lower(XnnpackPartitioner()) -> to_executorch()"),
    Baseline("pte-int8-pt2e", "executorch", "pte", "int8", "executorch",
             "prepare_pt2e(XNNPACKQuantizer symmetric per-channel) -> calibrate -> convert_pt2e -> XNNPACK"),
    Baseline("tflite-int8-pt2e", "litert", "tflite", "int8", "litert",
             "prepare_pt2e(litert-torch PT2EQuantizer symmetric per-channel) -> calibrate -> convert_pt2e -> convert"),
)
# The plain conversions an edgepack cold build's wall time is compared with (their export seconds summed).
PT2E_PEERS = ("pte-int8-pt2e", "tflite-int8-pt2e")
BY_NAME = {b.name: b for b in BASELINES}
GROUPS = tuple(sorted({b.group for b in BASELINES if b.group}))
# The plain fp32 baseline each format's size is compared with ("int8 bytes <= 0.30x float").
FLOAT_OF_FORMAT = {"onnx": "onnx-fp32", "tflite": "tflite-fp32", "pte": "pte-fp32"}


def _files(outdir: Path, stem: str) -> list[str]:
    """The main file first, then side files the exporter wrote next to it (ONNX external data)."""
    main = sorted(outdir.glob(stem))
    side = sorted(p for p in outdir.glob(stem + ".*") if p not in main)
    return [str(p) for p in main + side]


class _Recorder:
    """Runs one baseline export, times it, and records the files or the error."""

    def __init__(self):
        self.results: list[dict] = []

    def run(self, name: str, fn) -> bool:
        start = time.perf_counter()
        try:
            files = fn()
        except Exception as exc:  # any toolchain failure is a result to report, not a crash
            self.results.append({"name": name, "status": "failed", "export_s": round(time.perf_counter() - start, 3),
                                 "error": f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:400]}",
                                 "traceback": traceback.format_exc()[-3000:]})
            return False
        self.results.append({"name": name, "status": "ok", "export_s": round(time.perf_counter() - start, 3),
                             "files": files})
        return True

    def skip(self, name: str, reason: str) -> None:
        self.results.append({"name": name, "status": "failed", "export_s": 0.0, "error": reason})


def export_onnx(spec, calibration, outdir: Path, rec: _Recorder) -> None:
    import torch

    fp32 = outdir / "onnx-fp32.onnx"

    def plain_export():
        torch.onnx.export(spec.model, tuple(spec.example_inputs), str(fp32))
        return _files(outdir, fp32.name)

    if not rec.run("onnx-fp32", plain_export):
        for name in ("onnx-int8-dynamic", "onnx-int8-static"):
            rec.skip(name, "onnx-fp32 export failed")
        return

    from onnxruntime import quantization

    def dynamic():
        out = outdir / "onnx-int8-dynamic.onnx"
        quantization.quantize_dynamic(str(fp32), str(out))
        return _files(outdir, out.name)

    def static():
        import onnx

        out = outdir / "onnx-int8-static.onnx"
        graph = onnx.load(str(fp32), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        names = [i.name for i in graph.input if i.name not in initializers]

        class Reader(quantization.CalibrationDataReader):
            def __init__(self):
                self._feeds = iter([{n: t.numpy() for n, t in zip(names, sample)} for sample in calibration])

            def get_next(self):
                return next(self._feeds, None)

        quantization.quantize_static(str(fp32), str(out), Reader())
        return _files(outdir, out.name)

    rec.run("onnx-int8-dynamic", dynamic)
    rec.run("onnx-int8-static", static)


def export_litert(spec, calibration, outdir: Path, rec: _Recorder) -> None:
    fp32 = outdir / "tflite-fp32.tflite"

    def convert():
        import litert_torch

        litert_torch.convert(spec.model, tuple(spec.example_inputs)).export(str(fp32))
        return _files(outdir, fp32.name)

    if not rec.run("tflite-fp32", convert):
        rec.skip("tflite-int8-dynamic", "tflite-fp32 conversion failed")
        return

    def dynamic():
        from ai_edge_quantizer import quantizer, recipe

        out = outdir / "tflite-int8-dynamic.tflite"
        result = quantizer.Quantizer(fp32.read_bytes(), recipe.dynamic_wi8_afp32()).quantize()
        out.write_bytes(bytes(result.quantized_model))
        return _files(outdir, out.name)

    rec.run("tflite-int8-dynamic", dynamic)

    def pt2e_int8():
        import litert_torch
        import torch
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        model = prepare_pt2e(torch.export.export(spec.model, tuple(spec.example_inputs)).module(), quantizer)
        for sample in calibration:
            model(*sample)
        model = convert_pt2e(model, fold_quantize=False)
        out = outdir / "tflite-int8-pt2e.tflite"
        litert_torch.convert(model, tuple(spec.example_inputs),
                             quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(out))
        return _files(outdir, out.name)

    rec.run("tflite-int8-pt2e", pt2e_int8)


def export_executorch(spec, calibration, outdir: Path, rec: _Recorder) -> None:
    def lower():
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

        program = torch.export.export(spec.model, tuple(spec.example_inputs))
        et_program = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        out = outdir / "pte-fp32.pte"
        out.write_bytes(et_program.buffer)
        return _files(outdir, out.name)

    rec.run("pte-fp32", lower)

    def pt2e_int8():
        import torch
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        model = prepare_pt2e(torch.export.export(spec.model, tuple(spec.example_inputs)).module(), quantizer)
        for sample in calibration:
            model(*sample)
        model = convert_pt2e(model)
        program = torch.export.export(model, tuple(spec.example_inputs))
        et_program = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()]).to_executorch()
        out = outdir / "pte-int8-pt2e.pte"
        out.write_bytes(et_program.buffer)
        return _files(outdir, out.name)

    rec.run("pte-int8-pt2e", pt2e_int8)


EXPORTERS = {"onnx": export_onnx, "litert": export_litert, "executorch": export_executorch}


def main(argv: list[str]) -> int:
    """python benchmarks/baselines.py GROUP SPEC OUTDIR CALIBRATION_SAMPLES -> OUTDIR/GROUP.json"""
    group, spec_path, outdir, n_calibration = argv[0], argv[1], Path(argv[2]), int(argv[3])
    import torch

    from edgepack.spec import calibration_list, load_spec

    torch.manual_seed(0)
    outdir.mkdir(parents=True, exist_ok=True)
    spec = load_spec(spec_path)
    calibration = calibration_list(spec.calibration, f"{spec_path}: calibration", tuple(spec.example_inputs),
                                   n_calibration)
    rec = _Recorder()
    EXPORTERS[group](spec, calibration, outdir, rec)
    result = {"group": group, "spec": spec_path, "calibration_samples": len(calibration), "baselines": rec.results}
    partial = outdir / f"{group}.json.partial"
    partial.write_text(json.dumps(result, indent=2))
    partial.replace(outdir / f"{group}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
