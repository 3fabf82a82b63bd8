"""PT2E int8 quantization for the XNNPACK backend: quantizer config, capture, calibrate, convert.

Shared by the ExecuTorch exporter (post-training quantization) and a later QAT stage, so
both use exactly the same XNNPACKQuantizer recipe. Not a stage itself (no CONFIG/run), so
the compress registry never imports it; executorch/torchao are imported inside the
functions so importing this module stays cheap.

Recipe (executorch 1.5.1, torchao 0.18):
  torch.export.export(model, example).module()
  -> torchao.quantization.pt2e.quantize_pt2e.prepare_pt2e(gm, XNNPACKQuantizer().set_global(
         get_symmetric_quantization_config(is_per_channel=..., is_dynamic=...)))
  -> run calibration batches (static) or the example once (dynamic: observers are placeholders)
  -> convert_pt2e(gm)   # q/dq pairs around each op, weights frozen as int8
The result is a float-in/float-out GraphModule; re-export it and lower with XnnpackPartitioner.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ..errors import RuntimeUnavailable

InputTuple = tuple[torch.Tensor, ...]

_INSTALL_HINT = "pip install executorch==1.5.1 (brings torchao 0.18)"


def xnnpack_quantizer(*, per_channel: bool, dynamic: bool, qat: bool = False) -> Any:
    """The XNNPACKQuantizer with one symmetric int8 config applied to the whole model.

    Weights: int8 symmetric in [-127, 127], per output channel or per tensor.
    Activations: int8 affine per tensor; static (HistogramObserver on calibration data) or
    dynamic (scale chosen at run time from each input, no calibration).
    """
    try:
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
    except ImportError as exc:
        raise RuntimeUnavailable(f"executorch is not installed ({exc})", _INSTALL_HINT) from exc
    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_dynamic=dynamic, is_qat=qat)
    return XNNPACKQuantizer().set_global(config)


def describe(*, per_channel: bool, dynamic: bool, calibration_samples: int, qat: bool = False) -> dict:
    """The recipe as a plain dict, for the manifest."""
    return {
        "method": "pt2e-qat" if qat else "pt2e-ptq",
        "quantizer": "XNNPACKQuantizer.get_symmetric_quantization_config",
        "granularity": "per-channel" if per_channel else "per-tensor",
        "dynamic": dynamic,
        "weights": "int8 symmetric [-127, 127]",
        "activations": "int8 affine per-tensor, " + ("dynamic (runtime)" if dynamic else "static (calibrated)"),
        "calibration_samples": calibration_samples,
    }


def calibration_batches(calibration: Sequence[InputTuple], example_inputs: InputTuple,
                        limit: int) -> Iterator[InputTuple]:
    """Yield at most ``limit`` input tuples shaped exactly like ``example_inputs``.

    The captured graph has static shapes, so each calibration tuple must match the example.
    A calibration batch of B samples is split into single samples when the example batch
    size is 1 and the other dimensions agree. Raises ValueError on any other mismatch.
    """
    produced = 0
    for index, sample in enumerate(calibration):
        if produced >= limit:
            return
        sample = (sample,) if isinstance(sample, torch.Tensor) else tuple(sample)
        if len(sample) != len(example_inputs):
            raise ValueError(f"calibration sample {index} has {len(sample)} inputs, "
                             f"the model takes {len(example_inputs)}")
        for part in _split_to_example(sample, example_inputs, index):
            if produced >= limit:
                return
            produced += 1
            yield part


def _split_to_example(sample: InputTuple, example: InputTuple, index: int) -> list[InputTuple]:
    if all(s.shape == e.shape for s, e in zip(sample, example)):
        return [sample]
    batch_sizes = {s.shape[0] for s in sample if s.dim() > 0}
    splittable = (
        len(batch_sizes) == 1
        and all(e.dim() > 0 and e.shape[0] == 1 for e in example)
        and all(s.shape[1:] == e.shape[1:] for s, e in zip(sample, example))
    )
    if not splittable:
        got = [tuple(s.shape) for s in sample]
        want = [tuple(e.shape) for e in example]
        raise ValueError(f"calibration sample {index} has input shapes {got}; "
                         f"the exported graph is static and needs {want}")
    (batch,) = batch_sizes
    return [tuple(s[i:i + 1] for s in sample) for i in range(batch)]


def capture(model: nn.Module, example_inputs: InputTuple) -> torch.fx.GraphModule:
    """torch.export the model (eval mode) and return the ATen-level GraphModule PT2E works on."""
    return torch.export.export(model, tuple(example_inputs)).module()


@torch.no_grad()
def quantize_pt2e_xnnpack(model: nn.Module, example_inputs: InputTuple,
                          calibration: Sequence[InputTuple], *, per_channel: bool = True,
                          dynamic: bool = False, calibration_samples: int = 64,
                          ) -> tuple[torch.fx.GraphModule, dict]:
    """Post-training int8 quantization; returns (converted GraphModule, recipe dict).

    Static quantization calibrates on up to ``calibration_samples`` tuples from
    ``calibration`` and raises ValueError if there are none (calibrating on nothing would
    give meaningless activation ranges). Dynamic quantization ignores calibration.
    """
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", _INSTALL_HINT) from exc

    quantizer = xnnpack_quantizer(per_channel=per_channel, dynamic=dynamic)
    prepared = prepare_pt2e(capture(model, example_inputs), quantizer)
    used = 0
    if dynamic:
        prepared(*example_inputs)  # placeholder observers; one pass keeps convert_pt2e happy
    else:
        for batch in calibration_batches(calibration, example_inputs, calibration_samples):
            prepared(*batch)
            used += 1
        if used == 0:
            raise ValueError("static int8 quantization needs calibration data and got none")
    converted = convert_pt2e(prepared)
    return converted, describe(per_channel=per_channel, dynamic=dynamic, calibration_samples=used)
