"""An exponential moving average of a model's weights: what the samplers use after training."""

from __future__ import annotations

import copy

import torch
from torch import nn

from diffusion_lib.validation import check_number


class ExponentialMovingAverage:
    """``theta_ema <- d theta_ema + (1 - d) theta`` after every step, on all tensors at once.

    ``module`` is a frozen copy of ``model`` that holds the average. The decay warms up as
    ``d_k = min(decay, (1 + k) / (10 + k))`` at step k, so that a short run's average is not
    dominated by the random initial weights. Floating-point parameters and buffers are
    averaged by one fused ``torch._foreach_lerp_`` call; integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = check_number("decay", decay, 0.0, 1.0, low_open=False, high_open=False)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        pairs = list(
            zip(
                [*self.module.parameters(), *self.module.buffers()],
                [*model.parameters(), *model.buffers()],
                strict=True,
            )
        )
        self._averaged = [a for a, _ in pairs if a.dtype.is_floating_point]
        self._current = [c for a, c in pairs if a.dtype.is_floating_point]
        self._copied = [(a, c) for a, c in pairs if not a.dtype.is_floating_point]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold the tracked model's current weights in; ``step`` counts updates from 0."""
        decay = min(self.decay, (1 + step) / (10 + step))
        if self._averaged:
            torch._foreach_lerp_(self._averaged, self._current, 1.0 - decay)
        for averaged, current in self._copied:
            averaged.copy_(current)
