"""A model with nothing to quantize: the magnitude of a real FFT. No int8 recipe has an op to take."""

import torch
from torch import nn

from edgepack import ModelSpec


class Spectrum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft(x).abs()


def spec() -> ModelSpec:
    generator = torch.Generator().manual_seed(4)
    samples = [(torch.randn(1, 64, generator=generator),) for _ in range(12)]
    return ModelSpec(name="spectrum", model=Spectrum().eval(), example_inputs=samples[0], calibration=samples[:8],
                     holdout=samples[8:], input_names=["signal"], output_names=["magnitude"])
