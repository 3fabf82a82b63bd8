"""An MLP with ~6 MB of weights: large enough to test ONNX external data with a low threshold."""

import torch
from torch import nn

from edgepack import ModelSpec


def spec() -> ModelSpec:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 2048), nn.ReLU(), nn.Linear(2048, 512), nn.ReLU(), nn.Linear(512, 10)).eval()
    generator = torch.Generator().manual_seed(2)
    samples = [(torch.randn(1, 256, generator=generator),) for _ in range(8)]
    return ModelSpec(name="wide-mlp", model=model, example_inputs=samples[0], calibration=samples)
