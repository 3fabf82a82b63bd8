"""What every exporter takes and returns.

An exporter module (one per format) defines:
  - a pydantic config class (subclass of ArtifactConfig) with ``format: Literal[...]``
    and the precisions and options it supports, validated when the profile loads;
  - ``export(config, ctx: ExportContext) -> ExportResult``.
It imports its heavy toolchain (executorch, litert_torch, onnxruntime) inside export(),
so that loading profiles stays fast, and raises RuntimeUnavailable naming the package
when the toolchain is missing.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ..errors import UntraceableModel

InputTuple = tuple[torch.Tensor, ...]


class MixedInt8(BaseModel):
    """int4-weight with weight_algorithm gptq: the target the model (weights as shipped, int8 per-token
    activations emulated) must reach on calibration samples GPTQ did not use; the Linears whose
    4-bit error hurts most move to int8, most harmful first, until it does (quant/mixed.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_cosine: float = Field(ge=0.0, le=1.0, description="per-sample cosine, the lowest")
    min_sqnr_db: float = Field(description="SQNR over all samples, dB")


class ArtifactConfig(BaseModel):
    """Common fields of one artifact to produce. Subclasses add ``format`` and options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="model", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      description="file stem inside the bundle, e.g. model -> model.onnx")
    precision: str

    @property
    def extension(self) -> str:  # overridden by each format
        raise NotImplementedError

    @property
    def file_name(self) -> str:
        return f"{self.name}.{self.extension}"

    @property
    def device_only(self) -> str | None:
        """Why this artifact cannot be run in its runtime on the build host, for the manifest
        (None, the default: it is run and judged there like every artifact)."""
        return None

    # Settings that only static int8 has (calibration, activation ranges); int8_dynamic_form()
    # sets them back to their defaults.
    STATIC_INT8_ONLY: ClassVar[tuple[str, ...]] = ()

    def int8_dynamic_form(self) -> "ArtifactConfig | None":
        """This static int8 artifact as int8-dynamic (int8 weights, activations quantized per call),
        same name and every setting both precisions take; None when it is not static int8 or the
        format has no int8-dynamic (the profile's on_static_int8_failure: dynamic)."""
        precisions = typing.get_args(type(self).model_fields["precision"].annotation)
        if self.precision != "int8" or "int8-dynamic" not in precisions:
            return None
        fields = type(self).model_fields
        return type(self).model_validate({**self.model_dump(), "precision": "int8-dynamic",
                                          **{name: fields[name].default for name in self.STATIC_INT8_ONLY}})


_COMPLEX = re.compile(r"\bcomplex(32|64|128)\b|ComplexFloat|ComplexDouble|complex tensors?", re.IGNORECASE)


def complex_tensors_in(text: str) -> bool:
    """Whether a toolchain's error is about complex tensors (torch.fft and friends), which no
    format edgepack exports can run: the message should say so in one line."""
    return bool(_COMPLEX.search(text))


_DATA_DEPENDENT = ("GuardOnDataDependentSymNode", "data-dependent", "Data-dependent", "DataDependent",
                   "Dynamic control flow is not supported", "dynamic control flow")
_CALL_SITE = re.compile(r'File "([^"]+)", line (\d+), in (\w+)')


def data_dependent_control_flow(exc: BaseException) -> UntraceableModel | None:
    """The one-line root cause when torch.export failed on data-dependent control flow (an ``if``
    on a tensor's value) anywhere in ``exc``'s chain, naming the user's file:line; else None."""
    texts, seen, current = [], set(), exc
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        texts.append(f"{type(current).__name__}: {current}")
        current = current.__cause__ or current.__context__
    text = "\n".join(texts)
    if not any(marker in text for marker in _DATA_DEPENDENT):
        return None
    sites = [f"{path}:{line}" for path, line, _ in _CALL_SITE.findall(text)
             if "site-packages" not in path and "/torch/" not in path and not path.startswith("<")]
    where = f" at {sites[0]}" if sites else ""
    return UntraceableModel(f"data-dependent control flow{where}: the model branches on a tensor's value, and "
                            f"export needs one graph for every input",
                            "use torch.cond for a branch on tensor values, or make the condition static (a shape "
                            "or a Python constant); --debug shows torch's full message")


@dataclass
class ExportContext:
    """Everything an exporter may use. The model is the float model after the torch stages."""

    model: nn.Module
    example_inputs: InputTuple
    calibration: list[InputTuple]
    input_names: list[str]
    output_names: list[str]
    workdir: Path
    threads: int = 1
    seed: int = 0
    train_data: Iterable[tuple[InputTuple, torch.Tensor]] | None = None
    loss: Callable[..., torch.Tensor] | None = None
    # Reference float ONNX file (exported once per build), for exporters that start from ONNX.
    reference_onnx: Path | None = None
    # Per-stage hints for exporters, e.g. {"qat": GraphModule} left by a QAT stage.
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportResult:
    """Files written (the main file first, then any side files such as ONNX external data)."""

    files: list[Path]
    runtime: str
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
