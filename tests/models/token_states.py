"""A per-token encoder output over a padded sequence: [1, 12, 8] states, judged only at the real
tokens (output_masks maps token_states -> attention_mask)."""

import torch
from torch import nn

from edgepack import ModelSpec


class TokenStates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            self.embed = nn.Embedding(50, 8)
            self.mix = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = torch.tanh(self.mix(self.embed(input_ids)))
        return states * attention_mask.unsqueeze(-1).to(states.dtype) + (1 - attention_mask.unsqueeze(-1).to(
            states.dtype)) * states * 3.0  # padded positions carry something no one should judge


def _samples(count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(count):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        ids = torch.randint(1, 50, (1, 12), generator=generator)
        mask = (torch.arange(12) < length).to(torch.int64).unsqueeze(0)
        samples.append((ids * mask, mask))
    return samples


def spec() -> ModelSpec:
    samples = _samples(24, 3)
    return ModelSpec(name="token-states", model=TokenStates().eval(), example_inputs=samples[0],
                     calibration=samples[:16], holdout=samples[16:], input_names=["input_ids", "attention_mask"],
                     output_names=["token_states"], output_masks={"token_states": "attention_mask"})
