"""Two 3x3 convolutions at 32x32, 32 channels. onnxruntime's int8-dynamic form of a Conv is
ConvInteger, which has no fast x86 kernel: that artifact is reliably slower than fp32 (a test
of the slower_than_float policy that does not depend on host timing luck)."""

import torch
from torch import nn

from edgepack import ModelSpec


def spec() -> ModelSpec:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 3, 32, 32, generator=generator),) for _ in range(8)]
    return ModelSpec(name="conv-stack", model=model, example_inputs=samples[0], calibration=samples)
