"""A small model with two inputs and two outputs (scores and an embedding)."""

import torch
from torch import nn

from edgepack import ModelSpec


class TwoIO(nn.Module):
    def __init__(self):
        super().__init__()
        self.image = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.side = nn.Linear(6, 8)
        self.head = nn.Linear(16, 5)

    def forward(self, image, features):
        joint = torch.cat([self.image(image), torch.relu(self.side(features))], dim=1)
        return self.head(joint), joint


def spec() -> ModelSpec:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.rand(1, 3, 12, 12, generator=generator), torch.randn(1, 6, generator=generator)) for _ in range(24)]
    return ModelSpec(name="two-io", model=TwoIO().eval(), example_inputs=samples[0], calibration=samples[:16],
                     holdout=samples[16:], input_names=["image", "features"], output_names=["scores", "embedding"],
                     score_outputs=["scores"])
