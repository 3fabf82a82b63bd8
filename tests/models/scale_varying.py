"""An MLP whose inputs differ in scale from one sample to the next (x times a gain drawn
log-uniformly over three decades), as a transformer's activations differ between sentences.

Static int8 fixes each activation's range from the calibration samples, so a quiet sample is
quantized with a handful of the 256 levels the loud ones need (the quietest round to zero):
static int8 fails parity (cosine min 0.00, mean 0.80 over 32 samples, in all three runtimes). int8-dynamic quantizes each call's activations with that call's range
and passes: the model on_static_int8_failure: dynamic is for (steps/judge.py). No biases, so a
quiet sample's output is quiet too (a bias would dominate it and hide the error).
"""

from __future__ import annotations

import torch
from torch import nn

from edgepack import ModelSpec

WIDTH = 64


class ScaleVarying(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.body = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU(),
                                      nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU(),
                                      nn.Linear(WIDTH, 16, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def samples(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    gains = 10.0 ** (-3.0 * torch.rand(count, generator=generator))  # 0.001 .. 1
    return [(torch.randn(1, WIDTH, generator=generator) * gain,) for gain in gains]


def spec() -> ModelSpec:
    data = samples(40, seed=1)
    return ModelSpec(name="scale-varying", model=ScaleVarying().eval(), example_inputs=data[0],
                     calibration=data[:24], holdout=data[24:], input_names=["x"], output_names=["y"],
                     score_outputs=[])
