"""The fine-tuning loop the training stages share (not a stage: no CONFIG, not registered).

Data comes from ``ctx.train_data``: a re-iterable of ``((inputs...), target)`` mini-batches,
one pass per epoch. The task loss is ``ctx.loss(outputs_tuple, target)`` when the spec gives
one, else cross-entropy on output 0. Stages that need more than the task loss (distillation)
pass their own ``batch_loss``; stages that keep a sparsity mask pass ``after_step``, which runs
after every optimizer step.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import check_interrupted
from ..stage import InputTuple, StageContext

Batch = tuple[InputTuple, torch.Tensor]
BatchLoss = Callable[[nn.Module, InputTuple, torch.Tensor], torch.Tensor]


def as_outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def task_loss(ctx: StageContext) -> Callable[[tuple[torch.Tensor, ...], torch.Tensor], torch.Tensor]:
    """The spec's loss(outputs_tuple, target), or cross-entropy on the first output."""
    if ctx.loss is not None:
        return ctx.loss
    return lambda outputs, target: F.cross_entropy(outputs[0], target)


def require_train_data(ctx: StageContext, stage: str) -> Iterable[Batch]:
    if ctx.train_data is None:
        raise ValueError(f"{stage} fine-tunes the model and the spec has no train_data; add "
                         "train_data=<re-iterable of ((inputs...), target) mini-batches> to the "
                         "ModelSpec, or set the stage's epochs to 0")
    return ctx.train_data


def batches_per_epoch(train_data: Iterable[Batch]) -> int:
    """len(train_data) when it has one; otherwise one pass counting the batches."""
    if hasattr(train_data, "__len__"):
        return len(train_data)  # type: ignore[arg-type]
    return sum(1 for _ in train_data)


def _as_batch(item: Any, index: int) -> Batch:
    if not (isinstance(item, (tuple, list)) and len(item) == 2):
        raise ValueError(f"train_data batch {index} is not a pair ((inputs...), target)")
    inputs, target = item
    inputs = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return inputs, target


def train(model: nn.Module, ctx: StageContext, *, stage: str, epochs: int, lr: float,
          batch_loss: BatchLoss | None = None,
          after_step: Callable[[int], None] | None = None,
          steps_per_epoch: int | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``epochs`` passes over ctx.train_data.

    Adam, with the learning rate decayed from ``lr`` to 0 on a cosine over all the steps:
    the end point is then a settled model, not one caught mid-oscillation, which keeps
    results repeatable and comparable between runs.

    Returns a summary for the stage's details: epochs, optimizer steps, the mean loss of the
    first and last epoch, seconds. ``after_step(step)`` runs after each optimizer step
    (steps count from 1). ``steps_per_epoch`` saves counting the batches when the caller
    already knows it. The model is left in eval mode.
    """
    if epochs == 0:
        return {"epochs": 0}
    data = require_train_data(ctx, stage)
    loss_of_outputs = task_loss(ctx)
    if batch_loss is None:
        def batch_loss(net: nn.Module, inputs: InputTuple, target: torch.Tensor) -> torch.Tensor:
            return loss_of_outputs(as_outputs(net(*inputs)), target)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    total_steps = max(epochs * (steps_per_epoch or batches_per_epoch(data)), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0))))
    epoch_losses: list[float] = []
    step = 0
    start = time.perf_counter()
    model.train()
    try:
        for _ in range(epochs):
            total, count = 0.0, 0
            for index, item in enumerate(data):
                check_interrupted()  # a recorded SIGINT/SIGTERM stops training between batches
                inputs, target = _as_batch(item, index)
                loss = batch_loss(model, inputs, target)
                if not torch.isfinite(loss):
                    raise ValueError(f"{stage}: the loss became {float(loss)} at step {step + 1}; "
                                     "lower lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                if after_step is not None:
                    after_step(step)
                total += float(loss.detach())
                count += 1
            if count == 0:
                raise ValueError(f"{stage}: train_data yielded no batches")
            epoch_losses.append(total / count)
    finally:
        model.eval()
    return {
        "epochs": epochs,
        "steps": step,
        "lr": lr,
        "lr_schedule": "cosine to 0",
        "first_epoch_loss": round(epoch_losses[0], 5),
        "final_epoch_loss": round(epoch_losses[-1], 5),
        "seconds": round(time.perf_counter() - start, 2),
    }
