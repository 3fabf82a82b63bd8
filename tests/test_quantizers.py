"""quant/quantizers.py: clamp fusion observes ReLU6 outputs after the clamp; float_layers leave
their modules unannotated; both quantizers take the same recipe changes."""

from __future__ import annotations

import torch
from torch import nn

from edgepack.quant.calibrate import prepare_calibrated, quantize
from edgepack.quant.emulate import is_observer
from edgepack.quant.recipe import Recipe
from int8_support import SeparableNet, images, sqnr


def _observed_ops(prepared: torch.fx.GraphModule) -> list[str]:
    """The op each activation observer reads (its input node's target)."""
    found = []
    for node in prepared.graph.nodes:
        if node.op == "call_module" and is_observer(prepared.get_submodule(node.target)):
            source = node.args[0]
            if source.op == "call_function":
                found.append(str(source.target))
    return found


def test_clamp_fusion_moves_the_observer_after_relu6():
    model = SeparableNet(nn.ReLU6).eval()
    calibration = images(4, 1)
    stock, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(fuse_clamp=False, calibration_samples=4))
    fused, _ = prepare_calibrated(model, calibration[0], calibration, Recipe(calibration_samples=4))
    # stock: every conv output is observed before the clamp and ReLU6 re-uses that range
    assert sum("conv2d" in op for op in _observed_ops(stock)) == 5
    # fused: the only observer of each conv + ReLU6 pair sits after the clamp
    assert sum("conv2d" in op for op in _observed_ops(fused)) == 0
    assert sum("hardtanh" in op for op in _observed_ops(fused)) == 5


def test_float_layers_stay_unannotated_in_both_quantizers():
    model = SeparableNet(nn.ReLU).eval()
    calibration = images(4, 1)
    for quantizer in ("xnnpack", "litert"):
        everything, _ = prepare_calibrated(model, calibration[0], calibration,
                                           Recipe(quantizer=quantizer, calibration_samples=4))
        kept, _ = prepare_calibrated(model, calibration[0], calibration,
                                     Recipe(quantizer=quantizer, calibration_samples=4, float_layers=("pw",)))
        count = lambda g: sum(is_observer(m) for m in g.modules())  # noqa: E731
        assert count(kept) < count(everything), quantizer


def test_clamp_fusion_and_bias_correction_help_relu6_nets():
    """The stock XNNPACK recipe observes ReLU6 outputs with the conv's pre-activation scale."""
    model = SeparableNet(nn.ReLU6).eval()
    calibration, held_out = images(32, 1), images(16, 2)
    with torch.no_grad():
        reference = [model(x) for (x,) in held_out]
    figures = {}
    for name, options in (("stock", {"fuse_clamp": False, "activation_observer": "histogram",
                                     "bias_correction": False}),
                          ("fused", {"bias_correction": False}), ("default", {})):
        converted, record = quantize(model, calibration[0], calibration, Recipe(**options))
        with torch.no_grad():
            figures[name] = sqnr(reference, [converted(x) for (x,) in held_out])
    assert figures["fused"] > figures["stock"], figures
    assert figures["default"] >= figures["fused"] - 0.5, figures
    assert record["bias_correction"]["corrected_layers"] >= 4


def test_integer_index_math_is_never_quantized():
    """A Hugging Face BERT builds its attention mask with integer index math (arange(n) + 1,
    indexing a bool mask). The stock XNNPACKQuantizer turned those scalars into float tensors and
    calibration crashed with "tensors used as indices must be long"; both quantizers now leave
    integer tensors alone, and the quantized encoder tracks the float one."""
    from transformers import BertConfig, BertModel

    with torch.random.fork_rng():
        torch.manual_seed(0)
        bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64), add_pooling_layer=False)

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert.eval()

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            states = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(states.dtype)
            return (states * weights).sum(1) / weights.sum(1)

    model = Pooled().eval()
    generator = torch.Generator().manual_seed(1)
    samples = []
    for length in range(4, 16):
        mask = (torch.arange(16) < length).to(torch.int64).unsqueeze(0)
        samples.append((torch.randint(1, 100, (1, 16), generator=generator) * mask, mask))
    for quantizer in ("xnnpack", "litert"):
        converted, _ = quantize(model, samples[0], samples, Recipe(quantizer=quantizer, calibration_samples=12))
        with torch.no_grad():
            assert sqnr([model(*s) for s in samples], [converted(*s) for s in samples]) > 15.0, quantizer
