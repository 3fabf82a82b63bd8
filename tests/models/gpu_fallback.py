"""A small classifier whose last op is a gather: LiteRT's GPU accelerator does not take the
GATHER_ND it converts to, so that op runs on the CPU (steps/gpu_check.py lists it)."""

import torch
from torch import nn

from edgepack import ModelSpec


class GatherHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)
        self.register_buffer("order", torch.tensor([[3, 1, 0, 2, 9, 8, 7, 6, 5, 4]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.fc(torch.relu(self.conv(x)).flatten(1))
        return torch.gather(scores, 1, self.order)


def spec() -> ModelSpec:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 1, 8, 8, generator=generator),) for _ in range(8)]
    return ModelSpec(name="gpu-fallback", model=GatherHead().eval(), example_inputs=samples[0], calibration=samples,
                     output_names=["logits"])
