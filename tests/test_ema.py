"""The exponential moving average against closed forms of its warm-up and its decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffusion_lib.ema import ExponentialMovingAverage


def _average_of_a_drop(decay: float, updates: int) -> nn.Module:
    """Average a Linear layer whose weights are 1 (bias -2) when copied and 0 afterwards."""
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(-2.0)
    average = ExponentialMovingAverage(model, decay)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    for step in range(updates):
        average.update(step)
    return average.module


def test_warm_up_keeps_one_over_a_binomial_coefficient_of_the_start() -> None:
    """Tracking zeros, n updates multiply the average by prod_{k<n} d_k. While the warm-up
    d_k = (1 + k) / (10 + k) is below decay, that is n! 9! / (n + 9)! = 1 / C(n + 9, 9)."""
    module = _average_of_a_drop(decay=0.9999, updates=6)
    share = 1 / math.comb(15, 9)  # 1 / 5005
    torch.testing.assert_close(module.weight, torch.full((2, 3), share), rtol=1e-5, atol=0)
    torch.testing.assert_close(module.bias, torch.full((2,), -2 * share), rtol=1e-5, atol=0)


def test_decay_caps_the_warm_up() -> None:
    """decay = 0.5: d_k = (1 + k) / (10 + k) for k <= 7, then 0.5 (k = 8 gives 9/18 = 0.5 too);
    12 updates leave 1 / C(17, 9) * 0.5^4 of the start."""
    module = _average_of_a_drop(decay=0.5, updates=12)
    share = 1 / (math.comb(17, 9) * 16)
    torch.testing.assert_close(module.weight, torch.full((2, 3), share), rtol=1e-5, atol=0)


def test_float_buffers_are_averaged_and_integer_buffers_copied() -> None:
    norm = nn.BatchNorm1d(2)
    average = ExponentialMovingAverage(norm, decay=0.9)
    with torch.no_grad():
        norm.running_mean.fill_(1.0)
        norm.num_batches_tracked.fill_(7)
    average.update(0)  # d_0 = min(0.9, 1 / 10) = 0.1: 0.1 * 0 + 0.9 * 1
    torch.testing.assert_close(average.module.running_mean, torch.full((2,), 0.9))
    assert average.module.num_batches_tracked.item() == 7


def test_a_decay_outside_zero_to_one_is_refused() -> None:
    # decay = -1 used to extrapolate: one update from 0 towards 1 gave 2.
    with pytest.raises(ValueError, match=r"decay must lie in \[0.0, 1.0\], got -1"):
        ExponentialMovingAverage(nn.Linear(1, 1), -1)
