"""Respacing and DDIM's timesteps, checked against their definitions written out independently."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_lib import DDIM_SPACINGS, NoiseSchedule, ddim_timesteps, respace


def test_ddim_timesteps_are_the_uniform_skip() -> None:
    assert ddim_timesteps(1000, 50).tolist() == list(range(0, 1000, 20))
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1000))
    assert ddim_timesteps(10, 3).tolist() == [0, 3, 6]


def test_respacing_keeps_alpha_bar_at_the_kept_steps(linear: NoiseSchedule) -> None:
    shorter, kept = respace(linear, 25)
    assert kept[0] == 0 and kept[-1] == 999 and len(kept) == 25
    torch.testing.assert_close(shorter.alphas_cumprod, linear.alphas_cumprod[kept])
    same, all_steps = respace(linear, 1000)
    assert same is linear and all_steps.tolist() == list(range(1000))


def test_trailing_and_linspace_spacings_match_their_definitions() -> None:
    """Against the formulas of Lin et al. (2024, Table 2), written with numpy."""
    assert ddim_timesteps(1000, 10, "trailing").tolist() == list(range(99, 1000, 100))
    assert ddim_timesteps(1000, 10, "linspace").tolist() == [
        0, 111, 222, 333, 444, 555, 666, 777, 888, 999
    ]  # fmt: skip
    for timesteps, steps in [(1000, 7), (1000, 50), (1000, 333), (37, 5), (10, 3), (10, 10)]:
        trailing = np.round(np.arange(timesteps, 0, -timesteps / steps)).astype(int) - 1
        linspace = np.linspace(0, timesteps - 1, steps).round().astype(int)
        assert ddim_timesteps(timesteps, steps, "trailing").tolist() == sorted(trailing.tolist())
        assert ddim_timesteps(timesteps, steps, "linspace").tolist() == linspace.tolist()
        for spacing in DDIM_SPACINGS:
            grid = ddim_timesteps(timesteps, steps, spacing)
            assert len(grid) == steps and bool((grid[1:] > grid[:-1]).all())
            assert grid[0] >= 0 and grid[-1] <= timesteps - 1
    for spacing in DDIM_SPACINGS:
        assert ddim_timesteps(20, 20, spacing).tolist() == list(range(20))
    with pytest.raises(ValueError, match="spacing.*leading, trailing, linspace"):
        ddim_timesteps(1000, 10, "uniform")


def test_respaced_betas_are_those_of_the_kept_alpha_bars(linear: NoiseSchedule) -> None:
    """beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}] (Nichol & Dhariwal 2021, sec. 4), in numpy."""
    alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    for steps in (1, 2, 7, 250):
        shorter, kept = respace(linear, steps)
        kept_alpha_bar = alphas_cumprod[kept.numpy()]
        expected = 1 - kept_alpha_bar / np.concatenate([[1.0], kept_alpha_bar[:-1]])
        np.testing.assert_allclose(shorter.betas.numpy(), expected, rtol=1e-10)
        assert shorter.timesteps == steps
    with pytest.raises(ValueError, match="steps"):
        respace(linear, 1001)
