"""A GRU over a short sequence, then a linear head: a recurrent model PT2E quantizers do not take
(litert-torch's PT2E path fails on it), so a .tflite int8 falls back to ai-edge-quantizer."""

import torch
from torch import nn

from edgepack import ModelSpec


class GRUNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.gru = nn.GRU(8, 16, batch_first=True)
            self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states, _ = self.gru(x)
        return self.head(states[:, -1])


def spec() -> ModelSpec:
    generator = torch.Generator().manual_seed(2)
    samples = [(torch.randn(1, 10, 8, generator=generator),) for _ in range(24)]
    return ModelSpec(name="gru-net", model=GRUNet().eval(), example_inputs=samples[0], calibration=samples[:16],
                     holdout=samples[16:], input_names=["sequence"], output_names=["scores"])
