"""A spec whose evaluate() has a bug: it divides by the number of labelled samples, of which it has none."""

import torch
from torch import nn

from edgepack import ModelSpec

LABELLED: list = []  # forgot to load the labels


def evaluate(fn) -> dict:
    correct = sum(int(fn(x)[0].argmax()) == label for x, label in LABELLED)
    return {"top1": correct / len(LABELLED)}


def spec() -> ModelSpec:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    generator = torch.Generator().manual_seed(1)
    samples = [(torch.randn(1, 6, generator=generator),) for _ in range(8)]
    return ModelSpec(name="evaluate-raises", model=model, example_inputs=samples[0], calibration=samples,
                     evaluate=evaluate)
