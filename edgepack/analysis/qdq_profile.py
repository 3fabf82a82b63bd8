"""The int8 ONNX recipe along the network, in onnxruntime: every activation QuantizeLinear
input of the QDQ model is compared, after its DequantizeLinear, with the same tensor in the
preprocessed float model (activations captured by onnxruntime.quantization.qdq_loss_debug): the
accumulated SQNR per tensor, no attribution (analysis/diagnose.py attributes the PT2E recipe's
error per layer)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..export.onnx_float import export_float_onnx
from ..export.onnx_quant import save_onnx, to_int8_static
from ..parity import sqnr_db


def onnx_qdq_profile(float_onnx: Path, qdq_onnx: Path, samples: Sequence[dict[str, np.ndarray]]) -> list[dict]:
    """Accumulated error along a QDQ ONNX model: for each activation QuantizeLinear, its
    dequantized value in the QDQ model vs the same tensor in the float model, in the QDQ graph's
    order. Activations are captured by onnxruntime's own qdq_loss_debug (every float tensor made
    a graph output, graph optimisations off, so the QDQ pairs run as written)."""
    import onnx
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    qdq = onnx.load(str(qdq_onnx), load_external_data=False)
    producers = {o: n.op_type for n in qdq.graph.node for o in n.output}
    # the float tensor each activation QuantizeLinear reads, in graph order
    quantized = list(dict.fromkeys(n.input[0] for n in qdq.graph.node if n.op_type == "QuantizeLinear"))
    with tempfile.TemporaryDirectory(prefix="edgepack-qdq-") as scratch:
        activations = {}
        for name, source in (("float", float_onnx), ("qdq", qdq_onnx)):
            augmented = Path(scratch) / f"{name}.onnx"
            modify_model_output_intermediate_tensors(str(source), str(augmented))
            activations[name] = collect_activations(str(augmented), list(samples))
    matching = create_activation_matching(activations["qdq"], activations["float"])
    rows = []
    for tensor in quantized:
        pair = matching.get(tensor)
        if pair is None or "float" not in pair:
            continue  # a weight, or a tensor the float model does not have
        signal = noise = largest = 0.0
        cosines = []
        for reference, dequantized in zip(pair["float"], pair["post_qdq"]):
            r = np.asarray(reference, dtype=np.float64).ravel()
            g = np.asarray(dequantized, dtype=np.float64).ravel()
            signal, noise = signal + float(r @ r), noise + float((g - r) @ (g - r))
            largest = max(largest, float(np.max(np.abs(g - r))) if r.size else 0.0)
            nr, ng = float(np.linalg.norm(r)), float(np.linalg.norm(g))
            cosines.append(float(r @ g / (nr * ng)) if nr and ng else float(nr == ng))
        rows.append({"index": len(rows), "tensor": tensor, "op": producers.get(tensor, "input"),
                     "sqnr_db": round(sqnr_db(signal, noise), 3), "cosine": round(float(np.mean(cosines)), 6),
                     "max_abs_error": round(largest, 6)})
    return rows


def profile_onnx_recipe(model: nn.Module, spec, config, calibration: list, samples: int, out_dir: Path) -> list[dict]:
    """onnx_qdq_profile of the profile's onnx int8 recipe (onnx_quant.to_int8_static)."""
    work = out_dir / "onnx"
    work.mkdir(parents=True, exist_ok=True)
    names = spec.resolved_input_names()
    with torch.no_grad():
        first = model(*spec.example_inputs)
    n_outputs = len(first) if isinstance(first, (tuple, list)) else 1
    source = export_float_onnx(model, spec.example_inputs, work / "float.onnx", names,
                               spec.resolved_output_names(n_outputs))[0]
    quantized, _ = to_int8_static(config, source, work, calibration)
    qdq = save_onnx(quantized, work / "int8.onnx", 1024.0)[0]
    feeds = [{name: t.detach().numpy() for name, t in zip(names, sample)} for sample in calibration[:samples]]
    return onnx_qdq_profile(work / "preprocessed.onnx", qdq, feeds)
