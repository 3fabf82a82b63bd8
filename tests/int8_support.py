"""Shared by the int8 recipe tests: the hostile test model's export context and runtime parity,
a depthwise-separable net with uneven per-channel ranges, a net of chained residual adds, smooth
test images, and SQNR in dB computed independently of edgepack (the oracle the recipe is judged by)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from edgepack.export.base import ExportContext
from edgepack.parity import compare
from edgepack.runtimes import executorch as et_runtime
from edgepack.stage import StageContext

TEST_MODELS = Path(__file__).resolve().parent / "models"
REPO = TEST_MODELS.parent.parent
# android-arm64's int8 tolerance (the profile the hostile model is built for).
INT8_TOLERANCE = {"min_cosine": 0.98, "min_sqnr_db": 14.0}


def export_ctx(spec, workdir: Path, model: nn.Module | None = None) -> ExportContext:
    return ExportContext(model=model or spec.model, example_inputs=spec.example_inputs,
                         calibration=list(spec.calibration), input_names=["image"], output_names=["logits"],
                         workdir=workdir)


def parity_in_runtime(spec, path: Path):
    """Run the .pte in the ExecuTorch runtime on the held-out inputs; parity vs torch float."""
    runner = et_runtime.load(str(path), threads=1)
    reference, outputs = [], []
    with torch.no_grad():
        for (x,) in spec.holdout:
            reference.append([spec.model(x).numpy()])
            outputs.append(runner.run([x.numpy()]))
    return compare(reference, outputs, INT8_TOLERANCE, ["logits"])


def sqnr(reference: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    signal = sum(float((r ** 2).sum()) for r in reference)
    noise = sum(float(((a - r) ** 2).sum()) for a, r in zip(actual, reference))
    return 10 * math.log10(signal / noise)


class SeparableNet(nn.Module):
    """Depthwise-separable blocks with very uneven per-channel weight ranges."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        with torch.random.fork_rng():  # the same weights whichever tests ran before
            torch.manual_seed(0)
            self._layers(act)

    def _layers(self, act: type[nn.Module]) -> None:
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.dw2 = nn.Conv2d(24, 24, 3, padding=1, groups=24)
        self.pw2 = nn.Conv2d(24, 32, 1)
        self.fc = nn.Linear(32, 10)
        self.act = act()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for bn in (self.stem_bn, self.dw_bn):
                bn.running_mean.uniform_(-0.2, 0.2, generator=generator)
                bn.running_var.uniform_(0.5, 2.0, generator=generator)
            # per-channel ranges spread over ~3 decades: what hurts per-tensor weights
            self.dw.weight.mul_(torch.logspace(-1.5, 1.5, 16).view(-1, 1, 1, 1))
            self.dw2.weight.mul_(torch.logspace(1.5, -1.5, 24).view(-1, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        x = self.act(self.dw_bn(self.dw(x)))
        x = self.act(self.pw(x))
        x = self.act(self.dw2(x))
        x = self.act(self.pw2(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class ChainedResidual(nn.Module):
    """Two residual adds in a row, the second reading the first's output (as in EfficientNet's
    and MobileNetV2's blocks)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 3, padding=1)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        x = nn.functional.relu6(self.stem(x))
        x = x + self.b1(x)
        x = x + self.b2(x)
        return self.head(x)


def images(count: int, seed: int) -> list[tuple[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    batch = (nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False) - 0.45) / 0.25
    return [(batch[i:i + 1],) for i in range(count)]


def stage_ctx(calibration) -> StageContext:
    return StageContext(example_inputs=calibration[0], calibration=calibration, teacher=nn.Identity())
