"""A convolution-only model: int4-weight (MatMul/Gemm weights) has nothing to quantize in it."""

import torch
from torch import nn

from edgepack import ModelSpec


def spec() -> ModelSpec:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 3, 8, 8, generator=generator),) for _ in range(8)]
    return ModelSpec(name="conv-only", model=model, example_inputs=samples[0], calibration=samples)
