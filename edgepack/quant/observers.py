"""Activation observers for the static int8 recipe: torchao's min/max, moving-average and
histogram observers, and two of ours (percentile, MSE); measured in quant/recipe.py."""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import torch

from ..errors import RuntimeUnavailable
from .recipe import INSTALL_HINT

PERCENTILE = 99.99  # percentile observer: per-sample percentile of the low/high tail, averaged
MOVING_AVERAGE_CONSTANT = 0.01  # torch's default averaging constant
_MSE_KEEP_PER_SAMPLE = 1 << 14  # values kept per calibration sample for the MSE search
_MSE_TAIL = 32  # plus the largest/smallest values of each sample, so outliers are seen
_MSE_GRID = 33  # candidate clipping ratios in [0.2, 1], then as many around the best one


def observer_classes() -> dict[str, tuple[type, dict]]:
    """name -> activation observer class and arguments (torchao observers + two of ours)."""
    try:
        from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver
    except ImportError as exc:
        raise RuntimeUnavailable(f"torchao is not installed ({exc})", INSTALL_HINT) from exc
    percentile, mse = _custom_observers()
    return {  # name -> (class, constructor arguments besides eps)
        "minmax": (MinMaxObserver, {}),
        "moving-average": (MovingAverageMinMaxObserver, {"averaging_constant": MOVING_AVERAGE_CONSTANT}),
        "histogram": (HistogramObserver, {}),
        "percentile": (percentile, {}),
        "mse": (mse, {}),
    }


@lru_cache(maxsize=1)
def _custom_observers() -> tuple[type, type]:
    from torchao.quantization.pt2e import MinMaxObserver

    class PercentileObserver(MinMaxObserver):
        """Range = mean over calibration samples of each sample's PERCENTILE tails.

        Clips the rare extreme values of each sample; the mean keeps one unusual sample from
        setting the range (min/max) while still following typical samples.
        """

        def __init__(self, *args: Any, percentile: float = PERCENTILE, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.percentile = percentile
            self._lows: list[float] = []
            self._highs: list[float] = []

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            super().forward(x_orig)
            x = x_orig.detach().float().flatten()
            tail = max(1, int(round(x.numel() * (100.0 - self.percentile) / 100.0)))
            tail = min(tail, x.numel())
            self._highs.append(float(torch.topk(x, tail).values[-1]))
            self._lows.append(float(-torch.topk(-x, tail).values[-1]))
            return x_orig

        @torch.jit.export
        def calculate_qparams(self):  # type: ignore[override]
            if not self._lows:
                return super().calculate_qparams()
            low = torch.tensor(sum(self._lows) / len(self._lows))
            high = torch.tensor(sum(self._highs) / len(self._highs))
            return self._calculate_qparams(torch.minimum(low, high), torch.maximum(low, high))

    class MSEObserver(MinMaxObserver):
        """Range = [min, max] x s, with s in [0.2, 1] minimising the int8 round-trip MSE over
        a subsample of the calibration values (every sample's tails always included)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._kept: list[torch.Tensor] = []
            # the search's result until the next observation: the recipe asks for it more than
            # once (bias correction's instrumentation, then convert) and each search costs
            # ~0.1-0.3 s per activation on a transformer's calibration set
            self._qparams: tuple[torch.Tensor, torch.Tensor] | None = None
            self._settled = False

        def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
            if x_orig.numel() == 0:
                return x_orig
            if self._settled:
                raise RuntimeError("MSE observer: its range was settled at the end of calibration (settle()) and "
                                   "its kept values dropped; calibrate a new prepared graph to observe more")
            self._qparams = None
            super().forward(x_orig)
            x = x_orig.detach().float().flatten()
            stride = max(1, math.ceil(x.numel() / _MSE_KEEP_PER_SAMPLE))
            tail = min(_MSE_TAIL, x.numel())
            # clone: a strided view would keep the whole activation tensor alive
            self._kept.extend([x[::stride].clone(), torch.topk(x, tail).values, -torch.topk(-x, tail).values])
            return x_orig

        def settle(self) -> None:
            """Calibration is over: search the range now and drop the kept values (up to 64 KB
            per calibration sample; MobileNetV2 at 224: 3.35 MiB per sample over its 64 observers,
            214 MiB for its 64 samples, which every deep copy of the prepared graph duplicated and
            searched again). calculate_qparams then returns the same answer; a later observation
            raises."""
            if self._kept and self._qparams is None:
                self._qparams = self._search()
            self._kept = []
            self._settled = True

        @torch.jit.export
        def calculate_qparams(self):  # type: ignore[override]
            if self._qparams is None:
                if not self._kept:
                    return super().calculate_qparams()
                self._qparams = self._search()
            scale, zero_point = self._qparams
            return scale.clone(), zero_point.clone()

        def _search(self) -> tuple[torch.Tensor, torch.Tensor]:
            values = torch.cat(self._kept)
            low, high = min(float(self.min_val), 0.0), max(float(self.max_val), 0.0)
            coarse = torch.linspace(0.2, 1.0, _MSE_GRID)
            best = self._best_ratio(values, low, high, coarse)
            step = float(coarse[1] - coarse[0])
            fine = torch.linspace(max(0.05, best - step), min(1.0, best + step), _MSE_GRID)
            best = self._best_ratio(values, low, high, fine)
            return self._calculate_qparams(torch.tensor(low * best), torch.tensor(high * best))

        def _best_ratio(self, values: torch.Tensor, low: float, high: float, ratios: torch.Tensor) -> float:
            """The clipping ratio (range = [low, high] x ratio) with the least int8 round-trip MSE."""
            qmin, qmax = self.quant_min, self.quant_max
            scale = ((high - low) * ratios / (qmax - qmin)).clamp_min(1e-12).view(-1, 1)
            zero = torch.clamp(torch.round(qmin - low * ratios.view(-1, 1) / scale), qmin, qmax)
            errors = torch.empty(len(ratios))
            for start in range(0, len(ratios), 8):  # 8 candidates at a time bounds the memory
                sl = slice(start, start + 8)
                # in place, in the order of ((clamp(round(v / s) + z) - z) * s - v) ** 2: one buffer
                q = torch.div(values, scale[sl]).round_().add_(zero[sl]).clamp_(qmin, qmax)
                errors[sl] = q.sub_(zero[sl]).mul_(scale[sl]).sub_(values).square_().mean(dim=1)
            return float(ratios[int(torch.argmin(errors))])

    return PercentileObserver, MSEObserver

