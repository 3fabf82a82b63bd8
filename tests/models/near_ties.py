"""A classifier whose float model cannot decide on half of its inputs: for those, classes 0 and 1
score within 1e-4 of each other, far below what int8 rounding moves a logit, so quantization flips
the top class on some of them. On the other half class 2 wins by a wide margin. A gate that judges
decisions passes it; one that counts every flip would fail it on noise."""

import torch
from torch import nn

from edgepack import ModelSpec


class NearTies(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.features = nn.Linear(8, 16)
            self.head = nn.Linear(16, 6)
        with torch.no_grad():
            self.head.weight[1] = self.head.weight[0]  # classes 0 and 1: the same score ...
            self.head.bias[1] = self.head.bias[0] + 1e-4  # ... but for a hair
            self.head.bias[2] = self.head.bias[0] - 4.0  # class 2 wins only when its input fires
            self.head.weight[2] = self.head.weight[0]
            self.head.weight[2, :8] += 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.features(x)))


def _samples(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for index in range(count):
        x = torch.rand(1, 8, generator=generator)
        if index % 2:
            x = x + 2.0  # drives the features class 2 reads: a decisive win
        samples.append((x,))
    return samples


def spec() -> ModelSpec:
    samples = _samples(48, 1)
    return ModelSpec(name="near-ties", model=NearTies().eval(), example_inputs=samples[0], calibration=samples[:32],
                     holdout=samples[32:], input_names=["x"], output_names=["scores"], score_outputs=["scores"])
