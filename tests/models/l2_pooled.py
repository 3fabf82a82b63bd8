"""A masked mean-pooled, L2-normalised embedding (a sentence encoder's head, F.normalize):
onnxruntime's symbolic shape inference fails on the ReduceL2 it exports to at opset 18."""

import torch
import torch.nn.functional as F
from torch import nn

from edgepack import ModelSpec


class L2Pooled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x, mask):
        hidden = self.fc(x) * mask.unsqueeze(-1)
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)


def spec() -> ModelSpec:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.randn(1, 6, 8, generator=generator), torch.ones(1, 6)) for _ in range(24)]
    return ModelSpec(name="l2-pooled", model=L2Pooled().eval(), example_inputs=samples[0], calibration=samples[:16],
                     holdout=samples[16:], input_names=["x", "mask"], output_names=["embedding"], score_outputs=[])
