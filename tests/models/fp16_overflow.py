"""A model whose float32 activations exceed float16's range (65504) in the middle and come back
down at the end: fine in the CPU interpreter (fp16 weights, fp32 arithmetic), infinite on a GPU
computing in fp16. Only the GPU path catches it."""

import torch
from torch import nn

from edgepack import ModelSpec


class Overflow(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.relu(self.fc1(x)) * 1.0e5 + 1.0e5  # > 65504: inf in fp16
        return self.fc2(torch.sqrt(wide))


def spec() -> ModelSpec:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 16, generator=generator),) for _ in range(8)]
    return ModelSpec(name="fp16-overflow", model=Overflow().eval(), example_inputs=samples[0], calibration=samples,
                     output_names=["scores"])
