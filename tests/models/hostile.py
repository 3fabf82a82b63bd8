"""A small CNN with one deliberately quantization-hostile layer, for the int8 diagnosis and
fallback tests.

``hostile`` (1x1 conv + ReLU) emits one outlier channel about 1000x larger than its other
channels; ``mix`` (1x1 conv) scales that channel back down, so the float model is ordinary.
In int8 the per-tensor activation scale after ``hostile`` is set by the outlier channel and
the other 15 channels round to a handful of levels (and ``mix``'s weights for the outlier
channel, 1000x smaller than the rest of their row, round to zero): the int8 model fails
parity. Keeping ``hostile`` and ``mix`` in fp32 (a few hundred weights) fixes it; the bulk of
the weights (``body``, ``head``) stays int8.
"""

from __future__ import annotations

import torch
from torch import nn

from edgepack import ModelSpec

OUTLIER_GAIN = 1000.0


class HostileCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.hostile = nn.Conv2d(16, 16, 1)
        self.mix = nn.Conv2d(16, 32, 1)
        self.body = nn.Conv2d(32, 64, 3, stride=2, padding=1)
        self.body2 = nn.Conv2d(64, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)
        with torch.no_grad():
            self.hostile.weight[0].mul_(OUTLIER_GAIN)
            self.hostile.bias[0] = self.hostile.bias[0].abs() * OUTLIER_GAIN
            self.mix.weight[:, 0].div_(OUTLIER_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.hostile(x))
        x = torch.relu(self.mix(x))
        x = torch.relu(self.body(x))
        x = torch.relu(self.body2(x))
        return self.head(torch.flatten(x, 1))


def images(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    """Smooth 16x16 'images' (low-frequency noise upsampled), normalised."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    batch = nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    batch = (batch - 0.45) / 0.25
    return [(batch[i:i + 1],) for i in range(count)]


def model() -> HostileCNN:
    torch.manual_seed(0)
    return HostileCNN().eval()


def spec() -> ModelSpec:
    calibration = images(32, seed=1)
    return ModelSpec(name="hostile-cnn", model=model(), example_inputs=calibration[0], calibration=calibration,
                     holdout=images(16, seed=2), input_names=["image"], output_names=["logits"])
