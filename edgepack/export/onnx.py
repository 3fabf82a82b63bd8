"""ONNX exporter: torch.onnx.export(dynamo=True), checked with onnx.checker (full check).

Precisions (every one starts from the float ONNX; the conversions live in onnx_quant.py):
  fp32          the float export itself.
  fp16          float16 weights and compute, float32 inputs/outputs.
  int8          static QDQ int8, calibrated on the spec's calibration samples.
  int8-dynamic  int8 weights, activations quantized at run time (linear-heavy models).
  int4-weight   int4 block-wise MatMul weights (MatMulNBits), float activations.

Weights go to an external ``.onnx.data`` file when they exceed ``external_data_mb``
(protobuf caps a single file at 2 GB); the bundle then carries both files side by side,
which is how onnxruntime loads them.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, model_validator

from ..errors import ExportError, RuntimeUnavailable
from .base import ArtifactConfig, ExportContext, ExportResult

DEFAULT_OPSET = 18


class OnnxArtifact(ArtifactConfig):
    format: Literal["onnx"] = "onnx"
    precision: Literal["fp32", "fp16", "int8", "int8-dynamic", "int4-weight"] = "fp32"
    opset: int = Field(default=DEFAULT_OPSET, ge=17, le=23)
    external_data_mb: float = Field(default=1024.0, gt=0, description="weights above this go to model.onnx.data")
    # int8 (static). Defaults measured on this project's 2-core AVX2 x86 host (no VNNI),
    # onnxruntime 1.32, 2 threads; see onnx_quant.py for the figures.
    calibration_samples: int = Field(default=64, ge=1, description="int8: cap on calibration inputs")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        default="minmax", description="int8: how activation ranges are chosen from the calibration outputs")
    activation_type: Literal["uint8", "int8"] = Field(default="uint8", description="int8: activation integer type")
    # int8 and int8-dynamic.
    weight_type: Literal["int8", "uint8"] = Field(default="int8", description="int8/int8-dynamic: weight integer type")
    per_channel: bool = Field(default=True, description="int8/int8-dynamic: one weight scale per output channel")
    reduce_range: bool = Field(default=True, description="int8/int8-dynamic: 7-bit weights (avoids int16 "
                                                          "saturation in u8s8 kernels on CPUs without VNNI)")
    # int4-weight.
    group_size: int = Field(default=32, ge=16, le=4096, description="int4-weight: weights per scale (block size)")

    @model_validator(mode="after")
    def _check_combinations(self) -> "OnnxArtifact":
        # Compare with the defaults (not model_fields_set) so a dumped config loads back.
        static_only = ("calibration_samples", "calibration_method", "activation_type")
        int8_only = ("weight_type", "per_channel", "reduce_range")
        defaults = {name: field.default for name, field in type(self).model_fields.items()}
        for name in static_only:
            if self.precision != "int8" and getattr(self, name) != defaults[name]:
                raise ValueError(f"onnx {name} only applies to precision int8 (got precision {self.precision})")
        for name in int8_only:
            if self.precision not in ("int8", "int8-dynamic") and getattr(self, name) != defaults[name]:
                raise ValueError(f"onnx {name} only applies to precisions int8 and int8-dynamic "
                                 f"(got precision {self.precision})")
        if self.precision != "int4-weight" and self.group_size != defaults["group_size"]:
            raise ValueError(f"onnx group_size only applies to precision int4-weight (got precision {self.precision})")
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"onnx group_size must be a power of two >= 16 (MatMulNBits), got {self.group_size}")
        if self.activation_type == "int8" and self.weight_type == "uint8":
            raise ValueError("onnx int8 activations with uint8 weights (S8U8) have no onnxruntime kernels; "
                             "use weight_type int8")
        return self

    @property
    def extension(self) -> str:
        return "onnx"


CONFIG = OnnxArtifact


def _unsupported_op(text: str) -> str | None:
    match = re.search(r"(aten::[A-Za-z0-9_.]+|aten\.[A-Za-z0-9_.]+|torch\.ops\.[A-Za-z0-9_.]+)", text)
    return match.group(1) if match else None


def export_float_onnx(model: torch.nn.Module, example_inputs: tuple, path: Path, input_names: list[str],
                      output_names: list[str], opset: int = DEFAULT_OPSET, external_data_mb: float = 1024.0) -> list[Path]:
    """Export ``model`` to ``path``; return the files written (model first, external data after)."""
    try:
        import onnx
    except ImportError as exc:
        raise RuntimeUnavailable("onnx is not installed", "run `make setup`") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    captured = io.StringIO()
    try:
        # The exporter prints progress to stdout; keep it out of --json output.
        with contextlib.redirect_stdout(captured), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            program = torch.onnx.export(
                model, example_inputs, dynamo=True, input_names=input_names, output_names=output_names,
                opset_version=opset, optimize=True, verbose=False,
            )
    except Exception as exc:
        text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", str(exc))  # the exporter colours its messages
        op = _unsupported_op(text)
        raise ExportError(
            f"onnx: torch.onnx.export failed{' on op ' + op if op else ''}: {type(exc).__name__}: {text.splitlines()[0][:400] if text else ''}",
            "replace the op with one ONNX supports, or drop the onnx artifact from the profile"
            + (" (run with --debug for the full error)"),
        ) from exc
    weight_bytes = sum(
        int(init.const_value.nbytes) for init in program.model.graph.initializers.values()
        if init.const_value is not None
    )
    external = weight_bytes > external_data_mb * 1024 * 1024
    data_path = path.with_name(path.name + ".data")
    if data_path.exists():
        data_path.unlink()
    program.save(str(path), external_data=external)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx: {path.name} fails onnx.checker: {exc}", "report the model; the export is invalid") from exc
    files = [path]
    if data_path.exists():
        files.append(data_path)
    return files


def export(config: OnnxArtifact, ctx: ExportContext) -> ExportResult:
    path = ctx.workdir / config.file_name
    if config.precision == "fp32":
        files = export_float_onnx(ctx.model, ctx.example_inputs, path, ctx.input_names, ctx.output_names,
                                  opset=config.opset, external_data_mb=config.external_data_mb)
        return ExportResult(files=files, runtime="onnxruntime",
                            details={"opset": config.opset, "external_data": len(files) > 1})
    from . import onnx_quant

    return onnx_quant.export_converted(config, ctx, path)
