"""Weight-only recipes (torchao quantize_), for the ExecuTorch exporter: int8 or int4 nn.Embedding
tables and int4 grouped nn.Linear weights.

Embedding tables int8 (one scale per row) or int4 (one scale per group_size values of a row) by
IntxWeightOnlyConfig; lowering fuses dequantize + embedding into
quantized_decomposed::embedding_byte / embedding_4bit, which run outside XNNPACK on ExecuTorch's
quantized kernels (an app links quantized_ops_lib). int4 linears: Int8DynamicActivationIntxWeightConfig
(int4 groupwise weights, int8 per-token dynamic activations) on every nn.Linear whose in_features
divide group_size; other layers stay fp32. torchao chooses the int4 codes by round-to-nearest;
given codes and scales (quant/gptq.py) are written over them. Measurements: export/executorch.py.

A table's ``padding_idx`` is dropped in the quantized copy: it only masks that row's gradient
(forward returns the row either way), but it makes the lookup ``aten.embedding(dq, ids, padding_idx)``,
which ExecuTorch 1.5.1's torchao embedding fusion does not match, so the dequantize was left
outside XNNPACK with no kernel to run it (every Hugging Face BERT: pad_token_id 0;
tests/models/padded_encoder.py).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn

from ..errors import ExportError, RuntimeUnavailable
from .gptq import IntWeight
from .recipe import INSTALL_HINT


def embedding_tables(model: nn.Module, kind: Literal["fp32", "int8", "int4"],
                     group_size: int) -> tuple[nn.Module, dict | None]:
    """The model with its nn.Embedding tables quantized as ``kind`` (a copy), and the recipe
    (None when nothing changed: fp32, or no table)."""
    if kind == "fp32":
        return model, None
    tables = sorted(name for name, module in model.named_modules() if isinstance(module, nn.Embedding))
    if not tables:
        return model, None
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_api import IntxWeightOnlyConfig
        from torchao.quantization.quant_primitives import MappingType
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    int4 = kind == "int4"
    dims = {name: module.embedding_dim for name, module in model.named_modules() if name in tables}
    if int4 and any(dim % group_size for dim in dims.values()):
        raise ExportError(f"pte embeddings int4: embedding_dim {sorted(set(dims.values()))} is not divisible by "
                          f"group_size {group_size}", "use embeddings int8, or a group_size that divides it")
    quantized = copy.deepcopy(model)  # quantize_ swaps weights in place
    padded = sorted(name for name, module in quantized.named_modules()
                    if name in dims and module.padding_idx is not None)
    for name in padded:  # inference only: padding_idx changes no output (see the module docstring)
        quantized.get_submodule(name).padding_idx = None
    quantize_(quantized,
              IntxWeightOnlyConfig(weight_dtype=torch.int4 if int4 else torch.int8,
                                   granularity=PerGroup(group_size) if int4 else PerAxis(0),
                                   mapping_type=MappingType.SYMMETRIC),
              filter_fn=lambda module, fqn: isinstance(module, nn.Embedding))
    return quantized, {
        "method": "torchao-quantize_", "quantizer": "IntxWeightOnlyConfig", "tables": tables,
        "weights": f"{kind} symmetric, " + (f"per-group({group_size})" if int4 else "per-row"),
        "kernel": "quantized_decomposed::" + ("embedding_4bit" if int4 else "embedding_byte")
                  + " (ExecuTorch quantized kernels, outside the delegate)",
        **({"padding_idx_dropped": padded} if padded else {}),
    }


def int4_eligible(model: nn.Module, group_size: int) -> list[str]:
    """The nn.Linear layers whose in_features divide ``group_size`` (the ones made int4), by name."""
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, nn.Linear) and m.in_features % group_size == 0)


def int4_linears(model: nn.Module, group_size: int,
                 weights: dict[str, IntWeight] | None = None) -> tuple[nn.Module, dict]:
    """A copy of the model with eligible Linear weights int4 groupwise (torchao quantize_).

    torchao picks codes and scales by round-to-nearest; ``weights`` (quant/gptq.py), when given,
    replaces them layer by layer with the codes and scales chosen there, so the .pte carries them
    exactly (torchao's tensor keeps int8 codes, a scale per group and a zero point of 0)."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.granularity import PerAxis, PerGroup
        from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    eligible = int4_eligible(model, group_size)
    if not eligible:
        raise ExportError(
            f"pte int4-weight: no nn.Linear layer has in_features divisible by group_size {group_size}",
            "use fp32/int8 for this model, or a group_size that divides the Linear in_features")
    quantized = copy.deepcopy(model)  # quantize_ swaps weights in place
    wanted = set(eligible)
    int8 = {name for name in eligible if weights is not None and name in weights and weights[name].bits == 8}
    int4 = wanted - int8
    if int8:  # mixed_int8 (quant/mixed.py): XNNPACK's dynamic int8 linear, a scale per output channel
        quantize_(quantized, Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8,
                                                                   weight_granularity=PerAxis(0)),
                  filter_fn=lambda module, fqn: fqn in int8)
    quantize_(quantized,
              Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int4, weight_granularity=PerGroup(group_size)),
              filter_fn=lambda module, fqn: fqn in int4)
    if weights is not None:
        _carry_codes(quantized, eligible, weights, group_size)
    return quantized, {
        "method": "torchao-quantize_",
        "quantizer": "Int8DynamicActivationIntxWeightConfig",
        "granularity": f"per-group({group_size})",
        "dynamic": True,
        "weights": "int4 symmetric groupwise (nn.Linear only)" + (
            f"; {len(int8)} Linear(s) int8 symmetric per-channel (mixed_int8)" if int8 else ""),
        "activations": "int8 affine per-token, dynamic (runtime)",
        "weight_algorithm": "rtn" if weights is None else "given codes",
        "calibration_samples": 0,
        "quantized_layers": eligible,
        **({"int8_layers": sorted(int8)} if int8 else {}),
        "skipped_layers": sorted(set(linears) - wanted),
    }



@torch.no_grad()
def _carry_codes(quantized: nn.Module, names: list[str], weights: dict[str, IntWeight], group_size: int) -> None:
    """Overwrite each quantized Linear's torchao codes and scales with ``weights[name]``."""
    for name in names:
        given = weights.get(name)
        if given is None:
            raise ExportError(f"pte int4-weight: no int4 codes were chosen for the Linear {name}",
                              "report this with the model: every int4 Linear gets codes")
        tensor = quantized.get_submodule(name).weight
        want = (tuple(tensor.qdata.shape), tuple(tensor.scale.shape))
        got = (tuple(given.codes.shape), tuple(given.scales.shape))
        group = group_size if given.bits == 4 else given.codes.shape[1]  # int8: one scale per row
        if got != want or given.group_size != group or tensor.zero_point.any():
            raise ExportError(f"pte int4-weight: the {given.bits}-bit codes chosen for {name} (codes, scales {got}) "
                              f"do not fit torchao's symmetric group-{group} weight {want}",
                              "report this with the model (torchao's int4 layout may have changed)")
        tensor.qdata.copy_(given.codes.to(tensor.qdata.dtype))
        tensor.scale.copy_(given.scales.to(tensor.scale.dtype))
