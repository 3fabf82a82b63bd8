"""A model calling a custom op registered with torch.library and no ONNX translation.

Plenty of real models do this (a fused kernel, a C++ extension). It runs in torch eager and
exports to a torch.export graph, but no format can express it: the export must fail naming the op.
"""

import torch
from torch import nn

from edgepack import ModelSpec


@torch.library.custom_op("edgepack_test::wobble", mutates_args=())
def wobble(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x) + 0.25 * torch.sin(3.0 * x)


@wobble.register_fake
def _wobble_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Wobbly(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(wobble(x))


def spec() -> ModelSpec:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.randn(1, 6, generator=generator),) for _ in range(8)]
    return ModelSpec(name="custom-op", model=Wobbly().eval(), example_inputs=samples[0], calibration=samples)
