"""qat: int8 quantization-aware training with PT2E and the XNNPACK quantizer (ExecuTorch path).

    torch.export(copy of the model, batch dim dynamic).module()
    -> prepare_qat_pt2e(gm, XNNPACKQuantizer(symmetric, per-channel|per-tensor, is_qat=True))
    -> fine-tune on train_data through the fake-quant ops (observers frozen after
       ``freeze_observers_after`` epochs, if set)
    -> convert_pt2e(prepared): a float-in/float-out GraphModule with int8 q/dq inside

The quantizer is quant/quantizers.py's XNNPACKQuantizer with the stock QAT config (moving-
average fake-quant observers). The recipe's post-training-only refinements (clamp fusion for
ReLU6, the activation observer choice, bias correction) do not apply to QAT: the ranges and
weights are learned instead. With compare_with_ptq the details also give the exporter's PTQ
int8 of the incoming model, measured the same way, so the gain (or not) is on record.

Hand-off to the exporters: quant/qat_graph.py (PT2EQAT in ctx.extras). For a pte int8
artifact of the same granularity the ExecuTorch exporter lowers that graph instead of running
post-training quantization on ctx.model; the manifest's quantization is its recipe. Every other
artifact (the float ONNX reference, tflite, fp32 pte) uses the float model this stage returns:
the QAT fine-tuned weights.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from ..quant.calibrate import quantize
from ..quant.qat_graph import EXTRAS_KEY, PT2EQAT, float_fingerprint
from ..quant.quantizers import xnnpack_quantizer
from ..quant.recipe import Recipe, describe
from ..stage import StageConfig, StageContext, torch_outputs_fn
from . import finetune


class QATConfig(StageConfig):
    type: Literal["qat"] = "qat"
    backend: Literal["xnnpack"] = "xnnpack"
    granularity: Literal["per-channel", "per-tensor"] = Field(
        default="per-channel", description="int8 weight scales; must match the pte artifact's granularity")
    epochs: int = Field(ge=1, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, le=1.0, description="learning rate (Adam); QAT wants a small one")
    freeze_observers_after: int | None = Field(
        default=None, ge=1, description="epochs after which activation/weight ranges stop updating")
    compare_with_ptq: bool = Field(default=True, description="also measure the exporter's post-training int8 "
                                                             "of the incoming model (torch emulation), for the details")

    @model_validator(mode="after")
    def _freeze_within_training(self) -> "QATConfig":
        if self.freeze_observers_after is not None and self.freeze_observers_after >= self.epochs:
            raise ValueError(f"freeze_observers_after ({self.freeze_observers_after}) must be below "
                             f"epochs ({self.epochs}), or the observers never freeze")
        return self


CONFIG = QATConfig


def _capture_dynamic_batch(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    """torch.export with dim 0 of every input dynamic, so one graph trains on batches and exports at batch 1."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    dynamic_shapes = tuple({0: batch} for _ in inputs)
    try:
        return torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes).module()
    except Exception as exc:  # torch.export raises many types; re-raised with what to change
        raise ValueError(f"qat trains on mini-batches, so it exports the model with a dynamic batch "
                         f"dimension, and that failed ({type(exc).__name__}: {str(exc).strip()[:300]}); "
                         "make forward() independent of the batch size (no view(1, ...))") from exc


def _float_weights(prepared: torch.fx.GraphModule, model: nn.Module) -> nn.Module:
    """A copy of ``model`` carrying the float tensors QAT trained inside the prepared graph
    (weights, biases, batch-norm statistics; integer buffers such as num_batches_tracked
    are not in the graph and keep their values)."""
    trained = dict(prepared.named_parameters())
    trained.update(dict(prepared.named_buffers()))
    wanted = {name: t for name, t in model.state_dict().items() if t.is_floating_point()}
    missing = sorted(name for name, t in wanted.items() if name not in trained or trained[name].shape != t.shape)
    if missing:
        raise ValueError(f"the QAT graph does not carry the model's tensors {missing[:5]}; cannot return "
                         "the fine-tuned float weights")
    result = copy.deepcopy(model)
    result.load_state_dict({name: trained[name].detach().clone() for name in wanted}, strict=False)
    return result.eval()


def _metrics(ctx: StageContext, fn_model: Any) -> dict[str, float] | None:
    if ctx.evaluate is None:
        return None
    return {k: round(float(v), 5) for k, v in ctx.evaluate(torch_outputs_fn(fn_model)).items()}


def run(config: QATConfig, model: nn.Module, ctx: StageContext) -> tuple[nn.Module, dict]:
    from torchao.quantization.pt2e import allow_exported_model_train_eval, disable_observer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    data = finetune.require_train_data(ctx, "qat")
    per_channel = config.granularity == "per-channel"
    example = tuple(ctx.example_inputs)
    # Capture at batch 2 (the example twice): export specializes a dynamic dim seen as 1.
    capture_inputs = tuple(torch.cat([t, t]) for t in example)

    model.eval()
    # The exported graph shares parameter storage with the module it came from: train a copy,
    # so the incoming model stays untouched for the PTQ comparison.
    prepared = prepare_qat_pt2e(_capture_dynamic_batch(copy.deepcopy(model), capture_inputs),
                                xnnpack_quantizer(per_channel=per_channel, dynamic=False, qat=True))
    allow_exported_model_train_eval(prepared)  # finetune.train() calls .train()/.eval()

    steps_per_epoch = finetune.batches_per_epoch(data)
    freeze_step = None
    if config.freeze_observers_after is not None:
        freeze_step = config.freeze_observers_after * steps_per_epoch

    def after_step(step: int) -> None:
        if step == freeze_step:
            prepared.apply(disable_observer)

    summary = finetune.train(prepared, ctx, stage="qat", epochs=config.epochs, lr=config.lr,
                             after_step=after_step, steps_per_epoch=steps_per_epoch)
    float_model = _float_weights(prepared, model)
    converted = convert_pt2e(prepared)

    recipe = describe(per_channel=per_channel, dynamic=False, calibration_samples=0, qat=True)
    recipe.update({"backend": config.backend, "qat_epochs": config.epochs})
    ctx.extras[EXTRAS_KEY] = PT2EQAT(model=converted, example_inputs=example, recipe=recipe,
                                     float_fingerprint=float_fingerprint(float_model))
    details: dict[str, Any] = {
        "recipe": recipe,
        "training": summary,
        "observers_frozen_at_step": freeze_step,
        "int8_metrics_torch": _metrics(ctx, converted),
        "exporter_contract": (
            f"ctx.extras[{EXTRAS_KEY!r}] holds the converted QAT graph: pte int8 "
            f"({config.granularity}) lowers torch.export.export(qat.model, qat.example_inputs) with "
            "XnnpackPartitioner instead of post-training quantization; all other artifacts use the "
            "returned float model (QAT fine-tuned weights)"),
    }
    if config.compare_with_ptq and ctx.evaluate is not None:
        # The ExecuTorch exporter's post-training recipe on the incoming model, for comparison.
        ptq, ptq_recipe = quantize(model, example, ctx.calibration, Recipe(per_channel=per_channel))
        details["ptq_int8_metrics_torch"] = _metrics(ctx, _per_sample(ptq, example))
        details["ptq_recipe"] = ptq_recipe
    return float_model, details


def _per_sample(graph: torch.fx.GraphModule, example: tuple[torch.Tensor, ...]):
    """Call a graph captured at the example's (static) batch size on any batch, one sample at a time."""
    def forward(*inputs: torch.Tensor) -> Any:
        if all(i.shape == e.shape for i, e in zip(inputs, example)):
            return graph(*inputs)
        outputs = [finetune.as_outputs(graph(*sample)) for sample in zip(*(i.split(1) for i in inputs))]
        merged = tuple(torch.cat(parts) for parts in zip(*outputs))
        return merged if len(merged) > 1 else merged[0]
    return forward
