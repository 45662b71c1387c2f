"""Sampling in fewer steps than the model was trained with: which timesteps to visit, and the
schedule over them.

:func:`respace` keeps alpha-bar at evenly spaced timesteps, so that ancestral sampling can skip
steps (Nichol & Dhariwal 2021, sec. 4); the model is then called with the original timesteps.
:func:`ddim_timesteps` lists the timesteps DDIM visits under the three spacings compared by
Lin et al. (2024).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from diffusion_lib.sampler_inputs import NoisePredictor
from diffusion_lib.schedules import NoiseSchedule, _betas_from_alphas_cumprod
from diffusion_lib.validation import check_choice, check_positive_int

DDIM_SPACINGS = ("leading", "trailing", "linspace")


class _RespacedModel(nn.Module):
    """Calls the wrapped model with the original timestep of a respaced schedule's index."""

    def __init__(self, model: NoisePredictor, original_timesteps: Tensor) -> None:
        super().__init__()
        self.model = model
        self.original_timesteps = original_timesteps
        # Mirror the wrapped model's mode, so that _evaluating(wrapper) restores it faithfully.
        self.training = getattr(model, "training", False)
        self.prediction = getattr(model, "prediction", "epsilon")
        if hasattr(model, "noise_and_x0"):
            self.noise_and_x0 = self._noise_and_x0

    def forward(self, x_t: Tensor, index: Tensor, *args: Tensor) -> Tensor:
        return self.model(x_t, self.original_timesteps.to(index.device)[index], *args)

    def _noise_and_x0(self, x_t: Tensor, index: Tensor, **extra: object) -> tuple[Tensor, Tensor]:
        return self.model.noise_and_x0(
            x_t, self.original_timesteps.to(index.device)[index], **extra
        )


def respace(schedule: NoiseSchedule, steps: int) -> tuple[NoiseSchedule, Tensor]:
    """A shorter schedule that visits ``steps`` evenly spaced timesteps of ``schedule``.

    The new betas keep the original alpha-bar at the kept steps:
    ``beta'_k = 1 - alpha_bar[t_k] / alpha_bar[t_{k-1}]`` (Nichol & Dhariwal 2021, sec. 4).
    Returns the respaced schedule and the kept 0-based timesteps (steps,), ascending, from 0
    to T - 1 (just 0 when ``steps`` is 1).
    """
    check_positive_int("steps", steps, maximum=schedule.timesteps)
    if steps == schedule.timesteps:
        return schedule, torch.arange(schedule.timesteps)
    kept = torch.linspace(0, schedule.timesteps - 1, steps, dtype=torch.float64).round().long()
    return NoiseSchedule(_betas_from_alphas_cumprod(schedule.alphas_cumprod.cpu()[kept])), kept


def _respaced_chain(
    model: NoisePredictor, schedule: NoiseSchedule, steps: int, device: torch.device
) -> tuple[NoiseSchedule, Tensor, _RespacedModel]:
    """The respaced schedule on ``device``, its kept timesteps, and ``model`` wrapped to match."""
    sampling_schedule, kept = respace(schedule, steps)
    return sampling_schedule.to(device), kept, _RespacedModel(model, kept)


def ddim_timesteps(timesteps: int, steps: int, spacing: str = "leading") -> Tensor:
    """The 0-based timesteps DDIM visits, ascending, shape (steps,).

    ``"leading"``: the DDIM paper's uniform skip 0, T/steps, 2T/steps, ... (rounded down),
    which never reaches t = T - 1: with 10 of 1000 steps it starts at t = 900, from noise
    that is purer than x_900 ever is. ``"trailing"``: the same skip counted down from the last
    step, T - 1, T - 1 - T/steps, ... (rounded), which starts where the forward process ends;
    ``"linspace"``: evenly from 0 to T - 1 (Lin et al. 2024, sec. 3.3 and Table 2). All three
    give 0..T-1 when ``steps = T``.
    """
    check_positive_int("steps", steps, maximum=timesteps)
    check_choice("spacing", spacing, DDIM_SPACINGS)
    if spacing == "leading":
        return torch.arange(steps, dtype=torch.long) * timesteps // steps
    if spacing == "trailing":
        ends = torch.arange(1, steps + 1, dtype=torch.float64) * (timesteps / steps)
        return ends.round().long() - 1
    return torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()
