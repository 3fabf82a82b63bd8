"""Parameter, nonzero, byte and MAC counts of a torch model."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_macs(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> int:
    """Multiply-accumulates of one forward pass (torch's FLOP counter counts 2 per MAC)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*example_inputs)
    return int(counter.get_total_flops() // 2)


def model_stats(model: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> dict[str, int]:
    tensors = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
    params = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
    dense_bytes = sum(t.numel() * t.element_size() for t in tensors)
    return {
        "params": int(params),
        "nonzero_params": int(nonzero),
        "bytes": int(dense_bytes),
        "macs": count_macs(model, example_inputs),
    }
