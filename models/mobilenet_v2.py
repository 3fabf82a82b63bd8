"""MobileNetV2 (Sandler et al. 2018), written out here: inverted residuals, depthwise 3x3,
ReLU6, BatchNorm, linear bottlenecks; ``width_mult`` scales every layer's channels.

No pretrained weights are downloaded: the network is randomly initialised from a fixed seed
(torchvision's scheme: Kaiming conv weights, N(0, 0.01) classifier), then BatchNorm gets
non-trivial affine parameters and running statistics measured on real photos (one pass in
train mode over the calibration views). Activation ranges therefore vary per channel and per
layer as in a trained network, which is what makes int8 calibration realistic.

A plain random BatchNorm network is chaotic (Yang et al., "A mean field theory of batch
normalization", 2019): it amplifies a small input perturbation at every block (measured here
at 96 px: 40 dB input noise came out as 9 dB at the logits), so any quantization, even fp16,
would look broken. Trained networks are not like that. Three init choices borrowed from them
keep this one in the ordered regime (40 dB of input noise -> 45 dB at 96 px, 53 dB at 224,
35 dB at 64 px width 0.35): depthwise filters get a positive mean (trained depthwise kernels
are mostly smoothing, so photos do not cancel out and BN does not blow up noise); BN shifts
are positive on average, so most ReLU6 units work in their linear range rather than at the
threshold; and each residual branch's last BN starts with a small gamma (as in "zero-init
residual" training), so blocks refine rather than replace the residual stream.

Random 1000-way logits are near ties (median top-1 margin ~0.2 logit std), so top-1 agreement
would measure noise. A trained head is confident; to get that, the classifier is fitted in
closed form (ridge regression on pooled features) to name each calibration photo with its own
class, on top of its random weights. Held-out photos are new to it, as in deployment.

Options come from the environment so tests can build a small one:
    EDGEPACK_MNV2_RES    input resolution (default 224, multiple of 32, >= 32)
    EDGEPACK_MNV2_WIDTH  width multiplier (default 1.0)
Inputs: scikit-image's bundled photos (models/_photos.py), ImageNet-normalised.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from _photos import CALIBRATION_PHOTOS, calibration_views, holdout_views
from edgepack import ModelSpec
from edgepack.errors import SpecError

SEED = 0
CALIBRATION_VIEWS = 64
HOLDOUT_VIEWS = 16
BN_STATS_VIEWS = 32
HEAD_LOGIT = 10.0       # target logit of a calibration photo's own class in the fitted head
HEAD_RIDGE = 0.1        # ridge strength, relative to the mean feature energy
# BN affine init (see the docstring): gamma ~ U(low, high), beta ~ N(mean, std).
BN_GAMMA_LOW, BN_GAMMA_HIGH, BN_BETA_MEAN, BN_BETA_STD = 0.5, 1.5, 1.0, 0.25
DEPTHWISE_NOISE = 0.3   # scale of the Kaiming part of depthwise kernels (the rest is a 1/9 mean)
RESIDUAL_GAMMA = 0.3    # scale of the last BN gamma in residual branches

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn(inp: int, out: int, kernel: int, stride: int, groups: int = 1, relu6: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out)]
    if relu6:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, out: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == out
        layers = [conv_bn(inp, hidden, 1, 1)] if expand_ratio != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden),   # depthwise
                   conv_bn(hidden, out, 1, 1, relu6=False)]              # linear bottleneck
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_residual else self.block(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        channels = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn(3, channels, 3, 2)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(conv_bn(channels, last, 1, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
                if module.groups > 1:  # depthwise: mostly smoothing, mean 1/9 per tap (see the docstring)
                    with torch.no_grad():
                        module.weight.mul_(DEPTHWISE_NOISE).add_(1.0 / module.weight[0].numel())
            elif isinstance(module, nn.BatchNorm2d):
                # Trained BN layers are far from (1, 0): spread them so channel ranges differ,
                # positive shifts so most units are active (ordered regime, see the docstring).
                nn.init.uniform_(module.weight, BN_GAMMA_LOW, BN_GAMMA_HIGH)
                nn.init.normal_(module.bias, BN_BETA_MEAN, BN_BETA_STD)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)
        for block in self.modules():
            if isinstance(block, InvertedResidual) and block.use_residual:
                with torch.no_grad():
                    block.block[-1][1].weight.mul_(RESIDUAL_GAMMA)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(x)


@torch.no_grad()
def set_bn_statistics(model: nn.Module, images: torch.Tensor) -> nn.Module:
    """Replace BN running stats with those of ``images`` (one train-mode pass, exact averages)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: one pass gives this batch's statistics
    model.train()
    model(images)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


@torch.no_grad()
def fit_classifier(model: MobileNetV2, images: torch.Tensor, labels: torch.Tensor) -> MobileNetV2:
    """Add to the classifier the ridge-regression solution mapping pooled features to
    ``HEAD_LOGIT`` on each image's label (zero-mean targets, centred features)."""
    features = model.pool(model.features(images)).flatten(1)
    linear = model.classifier[-1]
    mean = features.mean(0)
    centred = features - mean
    targets = torch.zeros(len(labels), linear.out_features)
    targets[torch.arange(len(labels)), labels] = HEAD_LOGIT
    targets -= targets.mean(0)
    gram = centred.T @ centred
    ridge = HEAD_RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0])
    weight = torch.linalg.solve(gram + ridge, centred.T @ targets)  # [features, classes]
    linear.weight += weight.T
    linear.bias -= mean @ weight
    return model


def build_model(resolution: int = 224, width_mult: float = 1.0, seed: int = SEED,
                views: list[torch.Tensor] | None = None) -> MobileNetV2:
    """The seeded network with BN statistics and head fitted on ``views`` (default: the calibration views)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MobileNetV2(width_mult=width_mult)
    views = views if views is not None else calibration_views(CALIBRATION_VIEWS, resolution)
    set_bn_statistics(model, torch.cat(views[:BN_STATS_VIEWS]))
    return fit_classifier(model, torch.cat(views), calibration_labels(len(views)))


def calibration_labels(count: int) -> torch.Tensor:
    """Class of each calibration view: one per photo, spread over the 1000 classes."""
    return torch.tensor([(index % len(CALIBRATION_PHOTOS)) * 89 % 1000 for index in range(count)])


def _env_options() -> tuple[int, float]:
    raw_res = os.environ.get("EDGEPACK_MNV2_RES", "224")
    raw_width = os.environ.get("EDGEPACK_MNV2_WIDTH", "1.0")
    try:
        resolution, width = int(raw_res), float(raw_width)
    except ValueError:
        raise SpecError(f"EDGEPACK_MNV2_RES={raw_res!r} / EDGEPACK_MNV2_WIDTH={raw_width!r}: not numbers",
                        "set EDGEPACK_MNV2_RES to an integer and EDGEPACK_MNV2_WIDTH to a float") from None
    if resolution < 32 or resolution % 32:
        raise SpecError(f"EDGEPACK_MNV2_RES={resolution}: must be a multiple of 32, at least 32",
                        "use e.g. 64, 96, 128, 160 or 224")
    if not 0.1 <= width <= 2.0:
        raise SpecError(f"EDGEPACK_MNV2_WIDTH={width}: must be within [0.1, 2.0]", "use e.g. 0.35, 0.5, 0.75 or 1.0")
    return resolution, width


def spec() -> ModelSpec:
    resolution, width = _env_options()
    views = calibration_views(CALIBRATION_VIEWS, resolution)
    model = build_model(resolution, width, views=views)
    calibration = [(view,) for view in views]
    holdout = [(view,) for view in holdout_views(HOLDOUT_VIEWS, resolution)]
    name = "mobilenet-v2" if (resolution, width) == (224, 1.0) else f"mobilenet-v2-w{width:g}-r{resolution}"
    with torch.no_grad():
        float_top1 = [int(model(*sample).argmax()) for sample in holdout]

    def evaluate(fn) -> dict[str, float]:
        """Random weights have no accuracy; report top-1 agreement with the float model on held-out photos."""
        agree = [int(torch.as_tensor(fn(sample)[0]).argmax()) == ref for sample, ref in zip(holdout, float_top1)]
        return {"top1_agreement_vs_float": sum(agree) / len(agree)}

    return ModelSpec(
        name=name,
        model=model,
        example_inputs=calibration[0],
        calibration=calibration,
        holdout=holdout,
        evaluate=evaluate,
        input_names=["image"],
        output_names=["logits"],
        notes=[f"MobileNetV2 width {width:g} at {resolution}x{resolution}, random init (seed {SEED}) "
               "with BatchNorm statistics from real photos; not trained"],
    )
