"""Langevin dynamics: sampling from a density when only its score is known.

The unadjusted Langevin algorithm (Roberts & Tweedie 1996) repeats ::

    x <- x + h grad log p(x) + sqrt(2 h) z,    z ~ N(0, I),

whose chain approaches p as the step h goes to 0 and the number of steps grows. Annealed
Langevin dynamics (Song & Ermon 2019, Algorithm 1) runs a few steps at each of a decreasing
sequence of noise levels, each level starting where the last one ended; here the levels are
the noised marginals q(x_t) of the forward process and their scores come from a noise
predictor through ``grad log q(x_t) = -eps(x_t, t) / sqrt(1 - alpha_bar_t)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lib.reverse_process import predict_noise
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _randn, _start
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import check_number, check_positive_int, check_same_shape


def langevin_sample(
    score: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    step_size: float,
    steps: int,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Run ``steps`` steps of the unadjusted Langevin algorithm from ``x``.

    Args:
        score: ``score(x) -> grad log p(x)``, same shape as ``x``.
        x: (B, ...) starting points.
        step_size: h in ``x + h score(x) + sqrt(2 h) z``. Too large a step biases the chain
            (for a Gaussian of variance s^2 its stationary variance is s^2 / (1 - h / (2 s^2))).
        steps: number of updates.
        generator: source of the noise z.
        return_trajectory: also return every state, shape (steps + 1, B, ...), on the CPU.

    Returns the final points (B, ...), or ``(points, states)``.
    """
    step_size = check_number("step_size", step_size, 0.0, low_open=True)
    steps = cap_sampling_steps(check_positive_int("steps", steps))
    states = [x.cpu()]
    for _ in range(steps):
        noise = _randn(tuple(x.shape), generator, x.device).to(x.dtype)
        drift = score(x)
        check_same_shape("score(x)", drift, "x", x, hint="one gradient per coordinate of x")
        x = x + step_size * drift + (2.0 * step_size) ** 0.5 * noise
        if return_trajectory:
            states.append(x.cpu())
    return (x, torch.stack(states)) if return_trajectory else x


def langevin_timesteps(schedule: NoiseSchedule, levels: int) -> Tensor:
    """Up to ``levels`` timesteps, largest first, evenly spaced in log signal-to-noise ratio
    from step T-1 to step 0, shape (L,) with L <= levels.

    Song & Ermon (2019, sec. 4.2) space their noise levels geometrically, for noise that grows
    far beyond the scale of the data. In the variance-preserving process the noise saturates at
    1 while the signal fades, so the natural variable is ``log SNR(t)`` (Kingma et al. 2021),
    which changes evenly over both the noisy end, where the modes of the data merge, and the
    clean end, where the noise falls from 0.2 to 0.01 within the first 60 steps. Each target
    is rounded to the nearest timestep, and repeats are kept once.
    """
    check_positive_int("levels", levels, maximum=schedule.timesteps)
    log_snr = schedule.signal_to_noise_ratio.cpu().log()
    targets = torch.linspace(log_snr[-1].item(), log_snr[0].item(), levels, dtype=torch.float64)
    nearest = (log_snr[None, :] - targets[:, None]).abs().argmin(dim=1)
    return torch.unique_consecutive(nearest)


def annealed_langevin_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    levels: int = 20,
    steps_per_level: int = 100,
    relative_step: float = 0.2,
    denoise: bool = True,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) on the marginals q(x_t).

    At each level t of :func:`langevin_timesteps` it runs ``steps_per_level`` Langevin steps
    with score ``-model(x, t) / sqrt(1 - alpha_bar_t)`` and step
    ``h_t = relative_step * (1 - alpha_bar_t)``: Song & Ermon's rule ``h ∝ sigma^2``, which
    moves a point the same fraction of the way towards a mode at every level where the noise
    is much wider than the mode (at the cleanest levels the fraction is smaller). With
    ``denoise`` the last level is followed by one jump to the model's estimate of x_0
    (Tweedie's formula), which removes the noise of the smallest level.

    Args:
        model: noise predictor ``model(x_t, t)``.
        schedule: the schedule it was trained with.
        shape: (B, ...) of the batch to draw.
        levels, steps_per_level, relative_step: as above.
        x_T: starting points (default standard normal, the marginal at t = T - 1).
        return_trajectory: also return the starting points and the state after each level
            (the last one denoised when ``denoise``) as a :class:`~diffusion_lib.sampling.Trajectory`.

    Returns the samples, or ``(samples, trajectory)``.
    """
    relative_step = check_number("relative_step", relative_step, 0.0, low_open=True)
    steps_per_level = check_positive_int("steps_per_level", steps_per_level)
    timesteps = langevin_timesteps(schedule, levels)
    x = _start(model, shape, x_T, generator, device)
    schedule = schedule.to(x.device)
    states = [x.cpu()]
    with _evaluating(model):
        for step in timesteps.tolist():
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            variance = 1.0 - schedule.alphas_cumprod[step].item()
            x = langevin_sample(
                functools.partial(_model_score, model, schedule, t),
                x,
                step_size=relative_step * variance,
                steps=steps_per_level,
                generator=generator,
            )
            states.append(x.cpu())
        if denoise:
            t = torch.zeros(x.shape[0], device=x.device, dtype=torch.long)
            x = schedule.predict_x0(x, t, predict_noise(model, x, t).to(x.dtype))
            states[-1] = x.cpu()
    if not return_trajectory:
        return x
    # states[i] went into the model at level i (the last one is the finished sample).
    return x, Trajectory(torch.stack(states), torch.tensor([*timesteps.tolist(), -1]))


def _model_score(model: NoisePredictor, schedule: NoiseSchedule, t: Tensor, x: Tensor) -> Tensor:
    """``grad log q(x_t)`` estimated by a noise predictor at the timesteps ``t``."""
    return schedule.score_from_eps(t, predict_noise(model, x, t).to(x.dtype))
