"""ONNX exporter: torch.onnx.export(dynamo=True), checked with onnx.checker (full check).

Precisions (every one starts from the float ONNX; the conversions live in onnx_quant.py):
  fp32          the float export itself.
  fp16          float16 weights and compute, float32 inputs/outputs.
  int8          static QDQ int8, calibrated on the spec's calibration samples: quantized in torch
                with edgepack's PT2E recipe (onnx_qdq.py, the default) or by onnxruntime's
                quantize_static (``quantizer: onnxruntime``, onnx_quant.py).
  int8-dynamic  int8 weights, activations quantized at run time (linear-heavy models).
  int4-weight   int4 block-wise MatMul weights (MatMulNBits), float activations; the 4-bit values
                chosen by GPTQ on calibration inputs (weight_algorithm, quant/gptq.py) or by
                round-to-nearest.

The float export itself (and the build's reference) is onnx_float.py; weights above
``external_data_mb`` go to ``model.onnx.data`` beside the model.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from . import onnx_qdq, onnx_quant
from ..quant.recipe import RecipeOptions
from .base import ArtifactConfig, ExportContext, ExportResult, MixedInt8
from .onnx_float import DEFAULT_OPSET, export_float_onnx


class OnnxArtifact(ArtifactConfig, RecipeOptions):
    format: Literal["onnx"] = "onnx"
    precision: Literal["fp32", "fp16", "int8", "int8-dynamic", "int4-weight"] = "fp32"
    opset: int = Field(default=DEFAULT_OPSET, ge=17, le=23)
    external_data_mb: float = Field(default=1024.0, gt=0, description="weights above this go to model.onnx.data")
    # int8 (static). The torch quantizer is edgepack's PT2E recipe (activation_observer,
    # fuse_clamp, bias_correction, float_layers; onnx_qdq.py has the measurements); onnxruntime
    # is quantize_static (calibration_method, activation_type; onnx_quant.py).
    quantizer: Literal["torch", "onnxruntime"] = Field(
        default="torch", description="int8: quantize in torch with edgepack's PT2E recipe, or with onnxruntime's "
                                     "quantize_static")
    calibration_samples: int = Field(default=64, ge=1, description="int8, and int4-weight with weight_algorithm "
                                                                "gptq: cap on calibration inputs")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="int8 with quantizer onnxruntime: how activation ranges are chosen")
    activation_type: Literal["uint8", "int8"] = Field(
        default="uint8", description="int8 with quantizer onnxruntime: activation integer type (torch: uint8)")
    # int8 and int8-dynamic.
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="int8/int8-dynamic: weight integer type")
    per_channel: bool = Field(default=True, description="int8/int8-dynamic: one weight scale per output channel")
    reduce_range: bool = Field(default=True, description="int8/int8-dynamic: 7-bit weights (avoids int16 saturation "
                               "in u8s8 kernels on CPUs without VNNI); a profile sets it from device.int8_isa")
    # int4-weight.
    group_size: int = Field(default=32, ge=16, le=4096, description="int4-weight: weights per scale (block size)")
    weight_algorithm: Literal["gptq", "rtn"] = Field(
        default="gptq", description="int4-weight: how the 4-bit weights are chosen: gptq (on the first "
                                    "calibration_samples calibration inputs, quant/gptq.py) or rtn "
                                    "(onnxruntime's round-to-nearest, no calibration)")
    mixed_int8: MixedInt8 | None = Field(
        default=None, description="int4-weight with weight_algorithm gptq: {min_cosine, min_sqnr_db}; the Linears "
                                  "whose 4-bit error hurts the model most stay int8 (a scale per output channel) until "
                                  "it reaches this on calibration inputs GPTQ did not use (quant/mixed.py)")

    @model_validator(mode="after")
    def _check_combinations(self) -> "OnnxArtifact":
        if self.mixed_int8 is not None and (self.precision != "int4-weight" or self.weight_algorithm != "gptq"):
            raise ValueError("onnx mixed_int8 only applies to precision int4-weight with weight_algorithm gptq")
        # Compare with the defaults (not model_fields_set) so a dumped config loads back.
        static_only = ("calibration_samples", "calibration_method", "activation_type")
        int8_only = ("weight_type", "per_channel", "reduce_range")
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        gptq = self.precision == "int4-weight" and self.weight_algorithm == "gptq"
        for name in static_only:
            if name == "calibration_samples" and gptq:
                continue
            if self.precision != "int8" and getattr(self, name) != defaults[name]:
                also = " (and int4-weight with weight_algorithm gptq)" if name == "calibration_samples" else ""
                raise ValueError(f"onnx {name} only applies to precision int8{also} (got precision {self.precision})")
        for name in int8_only:
            if self.precision not in ("int8", "int8-dynamic") and getattr(self, name) != defaults[name]:
                raise ValueError(f"onnx {name} only applies to precisions int8 and int8-dynamic "
                                 f"(got precision {self.precision})")
        if self.precision != "int4-weight" and self.group_size != defaults["group_size"]:
            raise ValueError(f"onnx group_size only applies to precision int4-weight (got precision {self.precision})")
        if self.precision != "int4-weight" and self.weight_algorithm != defaults["weight_algorithm"]:
            raise ValueError(f"onnx weight_algorithm only applies to precision int4-weight (got precision "
                             f"{self.precision})")
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"onnx group_size must be a power of two >= 16 (MatMulNBits), got {self.group_size}")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError("onnx int8 activations with uint8 weights (S8U8) have no onnxruntime kernels; "
                             "use weight_type int8")
        if self.precision != "int8" and self.quantizer != defaults["quantizer"]:
            raise ValueError(f"onnx quantizer only applies to precision int8 (got precision {self.precision})")
        torch_int8 = self.precision == "int8" and self.quantizer == "torch"
        for name in ("calibration_method", "activation_type", "weight_type"):
            if torch_int8 and getattr(self, name) != defaults[name]:
                raise ValueError(f"onnx {name} only applies to quantizer onnxruntime (the torch quantizer "
                                 f"takes {defaults[name]}); set quantizer: onnxruntime")
        self.check_recipe_options(torch_int8, "precision int8 with quantizer torch")
        return self

    STATIC_INT8_ONLY = ("calibration_samples", "calibration_method", "activation_type", "quantizer",
                        "activation_observer", "fuse_clamp", "float_layers", "bias_correction")

    @property
    def resolved_quantizer(self) -> str | None:
        """pt2e when edgepack's PT2E recipe makes this artifact (fallback and diagnosis apply)."""
        if self.precision != "int8":
            return None if self.precision == "fp32" else "onnxruntime"
        return "pt2e" if self.quantizer == "torch" else "onnxruntime"

    @property
    def extension(self) -> str:
        return "onnx"


CONFIG = OnnxArtifact


def export(config: OnnxArtifact, ctx: ExportContext) -> ExportResult:
    path = ctx.workdir / config.file_name
    if config.precision == "fp32":
        files = export_float_onnx(ctx.model, ctx.example_inputs, path, ctx.input_names, ctx.output_names,
                                  opset=config.opset, external_data_mb=config.external_data_mb)
        return ExportResult(files=files, runtime="onnxruntime",
                            details={"opset": config.opset, "external_data": len(files) > 1})
    if config.precision == "int8" and config.quantizer == "torch":
        return onnx_quant.export_converted(config, ctx, path, torch_int8=onnx_qdq.to_int8_torch)
    return onnx_quant.export_converted(config, ctx, path)
