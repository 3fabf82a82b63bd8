"""quant/qat_graph.py: the QAT stage's hand-off is found only for the float weights it was made for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgepack.quant.qat_graph import EXTRAS_KEY, PT2EQAT, float_fingerprint, pt2e_qat_for


def test_the_qat_graph_belongs_to_one_set_of_float_weights():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    assert pt2e_qat_for(model, {}) is None  # no qat stage ran
    handoff = PT2EQAT(model=torch.fx.symbolic_trace(model), example_inputs=(torch.zeros(1, 4),),
                      recipe={"method": "pt2e-qat"}, float_fingerprint=float_fingerprint(model))
    extras = {EXTRAS_KEY: handoff}
    assert pt2e_qat_for(model, extras) is handoff
    assert float_fingerprint(model) == float_fingerprint(model)  # deterministic
    with torch.no_grad():
        model[0].weight.mul_(0.5)  # as a later stage would
    with pytest.raises(ValueError, match="make qat the last stage"):
        pt2e_qat_for(model, extras)
