"""Shared by the int4-weight tests (gptq, mixed, int4): a small GELU MLP whose Linears divide a
group of 32, and random input batches for it."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 10)).eval()


def random_samples(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 64, generator=gen),) for _ in range(count)]
