"""LiteRT (.tflite) exporter: litert-torch converts PyTorch straight to TFLite, no TensorFlow.

Precisions and how each is made (litert-torch 0.10.0, ai-edge-quantizer 0.10.0):

- fp32: ``litert_torch.convert(model, example_inputs)``.
- fp16: the fp32 flatbuffer through ai-edge-quantizer's weight-only FLOAT_CASTING recipe
  (float16 weight tensors + DEQUANTIZE ops, float32 compute). This is the float16 form the
  LiteRT GPU delegate consumes natively; CPU kernels dequantize once at load.
- int8: full-integer static quantization calibrated on ``ctx.calibration``, by either
  PT2E (torchao prepare/convert with litert-torch's PT2EQuantizer, then convert) or
  ai-edge-quantizer's static recipe applied to the fp32 flatbuffer. See AUTO_QUANTIZER.
  The PT2E path uses the recipe shared with the .pte exporter (quant/recipe.py: ReLU6
  fused before its output is observed, activation_observer, bias_correction, float_layers);
  on EfficientNet-Lite0 it takes the .tflite from 6/16 top-1 agreement (logit cosine 0.82,
  litert-torch's stock quantizer) to 16/16 (0.997).
- int8-dynamic: dynamic-range (int8 weights, activations quantized at run time by kernels). With
  ``quantizer: auto``, PT2E unless its conversion leaves an EMBEDDING_LOOKUP table LiteRT cannot
  load (int8 with a nonzero zero point: every model with nn.Embedding); then ai-edge-quantizer,
  whose dynamic recipe stores tables int8 per row.

Both int8 paths emit a graph whose IO tensors are already int8. ``io: float`` (the default)
wraps them in QUANTIZE/DEQUANTIZE ops with the calibrated parameters, so the float-IO and
int8-IO artifacts compute exactly the same integers. Inputs keep the PyTorch layout (NCHW):
the converter inserts the TRANSPOSE ops, so golden inputs are fed as-is.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from ..errors import EdgepackError, ExportError, NothingToQuantize, RuntimeUnavailable
from ..quant.calibrate import prepare_corrected
from ..quant.quantizers import make_quantizer
from ..quant.recipe import RECIPE_OPTIONS, Int8Options, recipe_for, recipe_reason
from .base import ArtifactConfig, ExportContext, ExportResult, complex_tensors_in, data_dependent_control_flow
from .tflite_flatbuffer import describe, float_io, repair_bias_scales

Precision = Literal["fp32", "fp16", "int8", "int8-dynamic"]

# "auto" = PT2E: on conv/linear graphs it ties ai-edge-quantizer (AEQ, as calibrated here)
# within 0.7 dB either way, and it is clearly better where a graph has ops PT2E leaves in
# float (out1 below), so its worst case is the better one. Outputs vs torch float on 100-200
# held-out inputs, static int8 per-channel, 32-64 calibration samples, litert-torch 0.10.0,
# ai-edge-quantizer 0.10.0 (reproduce: export with each quantizer, compare as
# tests/test_tflite.py::_compare does):
#                                  PT2E                  AEQ, global min/max    AEQ default (EMA)
#   3x conv-bn-relu + fc, trained  cos .99997  41.7 dB   cos .99998  41.8 dB    cos .99912  24.0 dB
#   same, random init              cos .99998  43.3 dB   cos .99998  44.0 dB    cos .99987  34.5 dB
#   test TinyCNN (conv-bn-relu-    cos .99990  35.3 dB   cos .99991  35.7 dB    cos .99570  18.1 dB
#     pool-fc), top-1 agreement    96%                   98%                    94%
#   test TwoInTwoOut, out0 / out1  29.0 / 46.0 dB        29.0 / 32.3 dB         11.4 / 12.7 dB
#   per-tensor weights (trained)   39.4 dB               39.3 dB                23.9 dB
# Why: AEQ's Quantizer.calibrate() merges per-sample min/max with an exponential moving
# average (0.95): a range is a weighted average of per-sample ranges, not their union, so it
# clips every sample wider than average (and early samples weigh most);
# we calibrate AEQ with a global min/max instead (``_aeq_calibrate``), which closes the gap on
# conv/linear. PT2E's histogram observer also resists outlier samples. PT2E only annotates
# conv/linear/add/mul/cat/pooling: other ops (TwoInTwoOut's SUM) stay float between
# DEQUANTIZE/QUANTIZE, which is where its out1 advantage comes from. details["float_compute_ops"]
# lists them; pick quantizer: ai-edge-quantizer for integer-only accelerators (every op int8).
# int8-dynamic: identical numerics (46.4 dB both), PT2E file 4% smaller, so auto = PT2E too, except
# for a model with lookup tables, whose PT2E flatbuffer LiteRT cannot load (_build): there AEQ.
AUTO_QUANTIZER = "pt2e"

_SIGNATURE = "serving_default"  # litert_torch.model.DEFAULT_SIGNATURE_NAME
_HINT_INSTALL = "pip install 'edgepack[litert]' (litert-torch 0.10.0, ai-edge-litert 2.3)"


class TFLiteArtifact(ArtifactConfig, Int8Options):
    format: Literal["tflite"] = "tflite"
    precision: Precision
    quantizer: Literal["auto", "pt2e", "ai-edge-quantizer"] = Field(
        default="auto", description="int8/int8-dynamic: which quantizer; auto = the one measured best (pt2e)")
    io: Literal["float", "int8"] = Field(
        default="float", description="int8 only: whether the model takes/returns int8 tensors")
    embeddings: Literal["fp32", "int8"] = Field(
        default="fp32", description="int8: EMBEDDING_LOOKUP tables int8 with a scale per row "
                                    "(ai-edge-quantizer, applied to the int8 flatbuffer)")

    @model_validator(mode="after")
    def _recipe_fits_quantizer(self) -> "TFLiteArtifact":
        static_pt2e = self.precision == "int8" and self.quantizer in ("auto", "pt2e") and AUTO_QUANTIZER == "pt2e"
        self.check_recipe_options(static_pt2e, "precision int8 with the pt2e quantizer")
        return self

    @model_validator(mode="after")
    def _options_fit_precision(self) -> "TFLiteArtifact":
        quantized = self.precision in ("int8", "int8-dynamic")
        if self.embeddings != "fp32" and self.precision != "int8":
            raise ValueError(f"tflite embeddings {self.embeddings} applies to precision int8, not {self.precision}")
        if self.io == "int8" and self.precision != "int8":
            raise ValueError(f"io: int8 needs precision: int8 (precision {self.precision} has float activations)")
        if not quantized and self.granularity != "per-channel":
            raise ValueError(f"granularity applies to int8 / int8-dynamic, not precision {self.precision}")
        if self.precision == "fp32" and self.quantizer != "auto":
            raise ValueError("quantizer does not apply to precision fp32")
        if self.precision == "fp16" and self.quantizer == "pt2e":
            raise ValueError("fp16 is made by ai-edge-quantizer (float16 weights); use quantizer: auto")
        return self

    # embeddings: int8-dynamic's tables are whatever its quantizer makes (AEQ: int8 per row)
    STATIC_INT8_ONLY = (*RECIPE_OPTIONS, "io", "embeddings")

    @property
    def extension(self) -> str:
        return "tflite"

    @property
    def resolved_quantizer(self) -> str | None:
        if self.precision == "fp32":
            return None
        if self.precision == "fp16":
            return "ai-edge-quantizer"
        return AUTO_QUANTIZER if self.quantizer == "auto" else self.quantizer


CONFIG = TFLiteArtifact


# --------------------------------------------------------------------------- errors


def _op_in(text: str) -> str | None:
    """The op an exception names, e.g. 'Lowering not found: aten.special_zeta.default'."""
    match = re.search(r"(?:torch\.ops\.)?(aten\.[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", text) or re.search(
        r"'((?:tfl|stablehlo|chlo|mhlo)\.[A-Za-z0-9_]+)'", text)
    return match.group(1) if match else None


@contextmanager
def _step(name: str, hint: str = "run with --debug for the full error"):
    """Turn a toolchain failure into an ExportError naming format, step and op."""
    try:
        yield
    except EdgepackError:
        raise
    except Exception as exc:  # the toolchains raise anything (RuntimeError, AssertionError, jax errors)
        text = str(exc)
        op = _op_in(text)
        first = text.strip().splitlines()[0][:300] if text.strip() else ""
        untraceable = data_dependent_control_flow(exc)
        if untraceable is not None:
            raise untraceable from exc
        if complex_tensors_in(text):
            raise ExportError(f"tflite: {name} failed{' on op ' + op if op else ''}: complex tensors (torch.fft, "
                              f"torch.complex) are not supported by this converter",
                              "compute the complex part outside the exported model, or leave .tflite out of the "
                              "profile") from exc
        raise ExportError(
            f"tflite: {name} failed{' on op ' + op if op else ''}: {type(exc).__name__}: {first}",
            "replace the op with one litert-torch lowers, or drop the tflite artifact from the profile"
            if op else hint,
        ) from exc


# --------------------------------------------------------------------------- conversion


def _import_toolchain():
    # litert-torch prints a rich progress tree on every convert(); edgepack has its own.
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    try:
        import litert_torch
    except ImportError as exc:
        raise RuntimeUnavailable(f"litert-torch is not installed ({exc})", _HINT_INSTALL) from exc
    return litert_torch


@contextmanager
def _eval_mode(model: torch.nn.Module):
    """Convert in eval mode (BatchNorm folding, no dropout) without changing the caller's model."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training


def _to_float_flatbuffer(litert_torch, model, example_inputs) -> bytes:
    with _step("convert"):
        return bytes(litert_torch.convert(model, example_inputs).model_content())


def _pt2e_static(litert_torch, config: TFLiteArtifact, model, example_inputs, calibration) -> tuple[bytes, dict]:
    """Static int8 with the recipe shared with the .pte exporter (quant/recipe.py): litert-torch's
    PT2EQuantizer plus clamp fusion, the chosen observer, fp32 layers and bias correction."""
    try:
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"the PT2E quantizer needs torchao ({exc})", "pip install 'torchao==0.18.*'") from exc
    with _step("quantize (pt2e)", "try quantizer: ai-edge-quantizer, which quantizes the converted graph"):
        recipe = recipe_for(config)
        prepared, record = prepare_corrected(model, example_inputs, calibration, recipe)
        quantizer = make_quantizer(recipe)  # litert-torch's convert takes its own quantizer
        graph = convert_pt2e(prepared, fold_quantize=False)
        move_exported_model_to_eval(graph)
        graph.training = False  # the flag litert-torch checks; the ops are already eval-mode ops
    record["reason"] = recipe_reason(config)
    with _step("convert"):
        edge = litert_torch.convert(graph, example_inputs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(edge.model_content()), record


def _pt2e(litert_torch, model, example_inputs, calibration, per_channel: bool, dynamic: bool) -> bytes:
    try:
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"the PT2E quantizer needs torchao ({exc})", "pip install 'torchao==0.18.*'") from exc

    with _step("quantize (pt2e)", "try quantizer: ai-edge-quantizer, which quantizes the converted graph"):
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic))
        graph = torch.export.export(model, example_inputs, strict=False).module()
        graph = prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            # dynamic: one pass only initialises the per-channel weight observers
            for sample in (calibration if not dynamic else [example_inputs]):
                graph(*sample)
        graph = convert_pt2e(graph, fold_quantize=False)
        move_exported_model_to_eval(graph)
        graph.training = False  # the flag litert-torch checks; the ops are already eval-mode ops
    with _step("convert"):
        edge = litert_torch.convert(graph, example_inputs, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        return bytes(edge.model_content())


def _aeq(float_model: bytes, precision: str, per_channel: bool = True, calibration=None,
         threads: int = 1) -> bytes:
    """Apply an ai-edge-quantizer recipe to the float flatbuffer: fp16 weights, dynamic-range
    int8, or static int8 (calibrated)."""
    try:
        from ai_edge_quantizer import qtyping, quantizer as aeq
        from ai_edge_quantizer.algorithm_manager import AlgorithmName
    except ImportError as exc:
        raise RuntimeUnavailable(f"ai-edge-quantizer is not installed ({exc})", _HINT_INSTALL) from exc
    every_op = qtyping.TFLOperationName.ALL_SUPPORTED
    granularity = qtyping.QuantGranularity.CHANNELWISE if per_channel else qtyping.QuantGranularity.TENSORWISE
    with _step("quantize (ai-edge-quantizer)"):
        qz = aeq.Quantizer(float_model)
        if precision == "fp16":
            qz.add_weight_only_config(".*", every_op, 16, algorithm_key=AlgorithmName.FLOAT_CASTING)
        elif precision == "int8-dynamic":
            qz.add_dynamic_config(".*", every_op, 8, granularity)
        else:
            qz.add_static_config(".*", every_op, 8, 8, granularity)
        ranges = _aeq_calibrate(float_model, qz, calibration, threads) if precision == "int8" else None
        return _quantized_flatbuffer(qz, ranges)


def _quantized_flatbuffer(qz, ranges: dict | None = None) -> bytes:
    """Run an ai-edge-quantizer Quantizer, keeping its tqdm progress bars out of the build's
    stderr (the build reports its own progress)."""
    with redirect_stderr(io.StringIO()):
        return bytes(qz.quantize(ranges, enable_progress_report=False).quantized_model)


def quantize_embeddings(buffer: bytes) -> tuple[bytes, dict[str, Any] | None]:
    """The int8 flatbuffer with its EMBEDDING_LOOKUP tables int8, one scale per row
    (ai-edge-quantizer's dynamic_wi8c_afp32 recipe, restricted to that op, so the rest of the
    graph is left as quantized). None when the model looks nothing up. Tiny encoder
    (android-arm64): 1,540,912 -> 1,169,328 bytes, cosine min 0.99996 -> 0.99994, SQNR 41.9 ->
    40.7 dB (LiteRT interpreter, 16 held-out sequences vs the torch model)."""
    try:
        from ai_edge_quantizer import quantizer as aeq, recipe
        from ai_edge_quantizer.qtyping import TFLOperationName
    except ImportError as exc:
        raise RuntimeUnavailable(f"ai-edge-quantizer is not installed ({exc})", _HINT_INSTALL) from exc
    if "EMBEDDING_LOOKUP" not in describe(buffer)["ops"]:
        return buffer, None
    with _step("quantize (embedding tables)"):
        qz = aeq.Quantizer(buffer)
        qz.load_quantization_recipe(recipe.dynamic_wi8c_afp32(operation_name=TFLOperationName.EMBEDDING_LOOKUP))
        quantized = _quantized_flatbuffer(qz)
    return quantized, {"method": "ai-edge-quantizer", "recipe": "dynamic_wi8c_afp32 on EMBEDDING_LOOKUP",
                       "weights": "int8 symmetric, per-row", "bytes_before": len(buffer), "bytes_after": len(quantized)}


def _aeq_calibrate(float_model: bytes, qz, calibration, threads: int) -> dict:
    """Quantizer.calibrate() with one change: ranges are the global min/max over all samples,
    not AEQ's default moving average of per-sample ranges, which clips (see the measurements
    above AUTO_QUANTIZER)."""
    from ai_edge_quantizer import calibrator, recipe_manager
    from ai_edge_quantizer.utils import qsv_utils

    recipe = recipe_manager.RecipeManager()
    recipe.load_quantization_recipe(qz.get_quantization_recipe())
    calib = calibrator.Calibrator(float_model, num_threads=max(1, threads),
                                  qsv_update_func=qsv_utils.min_max_update)
    samples = [{f"args_{i}": t.detach().cpu().numpy() for i, t in enumerate(s)} for s in calibration]
    with redirect_stderr(io.StringIO()):  # its tqdm progress bars: the build reports its own progress
        calib.calibrate({_SIGNATURE: samples}, recipe)
    return calib.get_model_qsvs()


def _build(config: TFLiteArtifact, ctx: ExportContext, litert_torch) -> tuple[bytes, dict | None]:
    """The flatbuffer, and the int8 recipe record when the pt2e static recipe made it (or, when
    ``quantizer: auto`` fell back to ai-edge-quantizer, a record saying why)."""
    model, inputs = ctx.model, tuple(ctx.example_inputs)
    calibration = [tuple(sample) for sample in ctx.calibration[: config.calibration_samples]]
    if config.precision == "int8" and not calibration:
        raise ExportError("tflite: int8 needs calibration inputs and the model spec gave none",
                          "add calibration data to the model spec, or use precision int8-dynamic")
    if config.resolved_quantizer == "pt2e" and config.precision == "int8":
        try:
            return _pt2e_static(litert_torch, config, model, inputs, calibration)
        except NothingToQuantize:
            raise
        except ExportError as exc:
            # quantizer: auto lets another quantizer take a model PT2E cannot (a GRU's recurrent
            # ops): ai-edge-quantizer on the converted float graph. An explicit pt2e, or recipe
            # options only PT2E honours (float_layers, ...), keep the error.
            if config.quantizer != "auto" or config.changed_options():
                raise
            float_model = _to_float_flatbuffer(litert_torch, model, inputs)
            flatbuffer = _aeq(float_model, "int8", config.granularity == "per-channel", calibration, ctx.threads)
            return flatbuffer, {"quantizer": "ai-edge-quantizer", "fallback_from": "pt2e",
                                "fallback_reason": exc.message.splitlines()[0]}
    if config.resolved_quantizer == "pt2e":
        flatbuffer = _pt2e(litert_torch, model, inputs, calibration, per_channel=config.granularity == "per-channel",
                           dynamic=True)
        unloadable = [t for t in describe(flatbuffer)["lookup_tables"] if t["nonzero_zero_point"]]
        if not unloadable:
            return flatbuffer, None
        # litert-torch's DYNAMIC conversion quantizes an nn.Embedding table per tensor with a nonzero
        # zero point, which LiteRT's EMBEDDING_LOOKUP kernel refuses at load (embedding_lookup.cc:73);
        # ai-edge-quantizer's dynamic recipe stores tables per row, symmetric (tests/models/padded_encoder.py).
        why = (f"litert-torch's dynamic conversion stored {len(unloadable)} EMBEDDING_LOOKUP table(s) int8 with a "
               f"nonzero zero point, which LiteRT's lookup kernel refuses to load")
        if config.quantizer != "auto":
            raise ExportError(f"tflite int8-dynamic: {why}", "use quantizer: auto or ai-edge-quantizer, which "
                                                             "quantizes lookup tables per row, symmetric")
        float_model = _to_float_flatbuffer(litert_torch, model, inputs)
        flatbuffer = _aeq(float_model, config.precision, config.granularity == "per-channel", calibration, ctx.threads)
        return flatbuffer, {"quantizer": "ai-edge-quantizer", "fallback_from": "pt2e", "fallback_reason": why}
    float_model = _to_float_flatbuffer(litert_torch, model, inputs)
    if config.precision == "fp32":
        return float_model, None
    return _aeq(float_model, config.precision, config.granularity == "per-channel", calibration, ctx.threads), None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- entry point


def _quantization_record(config: TFLiteArtifact, ctx: ExportContext, pt2e_record: dict | None = None,
                         embeddings: dict | None = None) -> dict[str, Any] | None:
    quantizer = config.resolved_quantizer
    if quantizer is None:
        return None
    record: dict[str, Any] = {"quantizer": quantizer, "precision": config.precision}
    if config.precision == "int8":
        record["embeddings"] = embeddings
    if pt2e_record is not None and "fallback_from" in pt2e_record:  # auto: PT2E failed, AEQ made it
        quantizer = record["quantizer"] = "ai-edge-quantizer"
        record.update(fallback_from="pt2e", fallback_reason=pt2e_record["fallback_reason"])
    elif pt2e_record is not None:  # static int8 via the shared PT2E recipe: its own record
        return {**record, **pt2e_record, "quantizer": quantizer, "pt2e_quantizer": pt2e_record["quantizer"]}
    if config.precision == "fp16":
        record["recipe"] = "weight-only float16 (FLOAT_CASTING), float32 compute"
        return record
    record["weights"] = "int8 symmetric"
    record["granularity"] = config.granularity
    if config.precision == "int8-dynamic":
        record["activations"] = "float32, quantized per inference by the kernels"
    else:
        record["activations"] = "int8 per-tensor affine, " + (
            "histogram observer" if quantizer == "pt2e" else "global min/max")
        record["calibration_samples"] = min(config.calibration_samples, len(ctx.calibration))
    return record


def _notes(config: TFLiteArtifact, ctx: ExportContext, facts: dict[str, Any]) -> list[str]:
    notes = []
    io = facts["signature_io"]
    float_io_tensors = [name for group in io.values() for name, dtype in group.items() if dtype != "int8"]
    if config.precision == "int8" and config.io == "int8" and float_io_tensors:
        notes.append(f"tflite int8: IO {', '.join(float_io_tensors)} remain float32 ({config.resolved_quantizer} "
                     "did not quantize the op next to them); the runner reports them without scale")
    if config.precision == "int8" and facts["float_compute_ops"]:
        notes.append(f"tflite int8: ops still computing in float: {facts['float_compute_ops']}")
    if any(t.dtype in (torch.int64, torch.float64) for t in ctx.example_inputs):
        notes.append("tflite: 64-bit inputs/outputs are 32-bit in the .tflite (litert-torch enable_x64=False); "
                     "to_native casts golden inputs to the runner's dtype")
    return notes


def export(config: TFLiteArtifact, ctx: ExportContext) -> ExportResult:
    litert_torch = _import_toolchain()
    with _eval_mode(ctx.model):
        flatbuffer, pt2e_record = _build(config, ctx, litert_torch)
    repaired: list[dict[str, Any]] = []
    if config.precision == "int8":
        with _step("quantize (bias scales)"):
            flatbuffer, repaired = repair_bias_scales(flatbuffer)
    if config.precision == "int8" and config.io == "float":
        with _step("quantize (float io)"):
            flatbuffer = float_io(flatbuffer)
    embeddings = None
    if config.embeddings == "int8":
        flatbuffer, embeddings = quantize_embeddings(flatbuffer)

    path = Path(ctx.workdir) / config.file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(flatbuffer)
    os.replace(partial, path)

    facts = describe(flatbuffer)
    details = {
        "quantization": _quantization_record(config, ctx, pt2e_record, embeddings),
        "io": {"type": config.io if config.precision == "int8" else "float", **facts["signature_io"]},
        "layout": "inputs keep the PyTorch layout (e.g. NCHW); the converter inserts TRANSPOSE ops",
        "signature": _SIGNATURE,
        "ops": facts["ops"],
        # only meaningful for int8: the ops an integer-only accelerator could not take
        "float_compute_ops": facts["float_compute_ops"] if config.precision == "int8" else None,
        "activation_bytes_upper_bound": facts["activation_bytes_upper_bound"],
        # int8: biases the converter left on the wrong scale, requantized (repair_bias_scales)
        "bias_scales_repaired": repaired if config.precision == "int8" else None,
        # int8-dynamic: how the converter stored the EMBEDDING_LOOKUP tables (int8 per row with ai-edge-quantizer)
        **({"lookup_tables": facts["lookup_tables"]} if config.precision == "int8-dynamic" else {}),
        "toolchain": {name: _version(name) for name in ("litert-torch", "ai-edge-quantizer", "ai-edge-litert")},
    }
    notes = _notes(config, ctx, facts)
    if pt2e_record is not None and "fallback_from" in pt2e_record:
        notes.append(f"tflite {config.precision}: made by ai-edge-quantizer because the PT2E path failed on this "
                     f"model ({pt2e_record['fallback_reason']}); quantizer: auto allows it, quantizer: pt2e would fail")
    return ExportResult(files=[path], runtime="litert", details=details, notes=notes)
