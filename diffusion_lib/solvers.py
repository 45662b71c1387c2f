"""Higher-order solvers for the sampling ODE: Heun's method and DPM-Solver++.

Deterministic DDIM integrates an ordinary differential equation. In the variables
``x_bar = x / alpha_t`` and ``rho_t = sigma_t / alpha_t`` (with ``alpha_t = sqrt(alpha_bar_t)``
and ``sigma_t = sqrt(1 - alpha_bar_t)``) it reads (Song et al. 2021, eq. 14) ::

    d x_bar / d rho = eps_theta(x, t),

and one DDIM step is one Euler step of it, with an error that shrinks like 1 / steps. The two
solvers here spend the same network calls more cleverly and their error shrinks like
1 / steps^2:

* :func:`heun_sample`: the trapezoidal correction of Euler's step in ``rho`` (Karras et al.
  2022, Algorithm 1), two network calls per step.
* :func:`dpm_solver_sample`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), which integrates
  the linear part of the ODE exactly in ``lambda_t = log(alpha_t / sigma_t)`` and extrapolates
  the model's x_0 estimate from the previous step: one network call per step.

All of them visit timesteps of the schedule the model was trained with and finish with a jump
to ``sigma = 0``, where the state is the model's last estimate of x_0 (as DDIM's last step).

A schedule with zero terminal SNR (Lin et al. 2024) has ``alpha = 0`` and ``lambda = -inf`` at
t = T. DPM-Solver++ takes that limit exactly: its first step from pure noise, of infinite length
in ``lambda``, is DDIM's step ``x = alpha x0 + sigma x_T`` (with ``e^{-h} = 0``), and the
extrapolation of the step after it vanishes (``r = inf``). Heun's trapezoid in ``rho = sigma /
alpha`` has no such limit, since ``rho = inf`` there; its first step from ``alpha = 0`` is
therefore DDIM's too, and the steps after it are trapezoids.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from diffusion_lib.reverse_process import _conditioning, _noise_and_x0
from diffusion_lib.sampler_inputs import (
    NoisePredictor,
    _check_model_and_schedule,
    _evaluating,
    _start,
)
from diffusion_lib.sampling import Trajectory
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_positive_int,
    check_timesteps,
    is_integer_tensor,
)

ORDERS = (1, 2)
SPACINGS = ("logsnr", "time")


def ode_timesteps(schedule: NoiseSchedule, steps: int, spacing: str | None = None) -> Tensor:
    """``steps`` distinct timesteps from 0 to T - 1 for an ODE solver, ascending, shape (steps,).

    ``spacing="logsnr"`` spreads them evenly in ``lambda_t = log(alpha_t / sigma_t)``, the
    variable DPM-Solver integrates in (Lu et al. 2022 recommend it for small images);
    ``"time"`` spreads them evenly in t. With two or more steps both include T - 1, where x_T is
    almost pure noise, and 0 (one step visits T - 1 alone), so that runs with different step
    counts solve the same problem. (DDIM's grid 0, T/steps, 2T/steps, ... starts lower when
    there are few steps; Lin et al. 2024, sec. 3.3.)
    ``None`` means ``"logsnr"``, or ``"time"`` for a schedule with zero terminal SNR, whose
    log-SNR ends at -inf and cannot be divided evenly.
    """
    if spacing is None:
        spacing = "time" if schedule.zero_terminal_snr else "logsnr"
    check_choice("spacing", spacing, SPACINGS)
    if spacing == "logsnr" and schedule.zero_terminal_snr:
        raise ValueError(
            "log-SNR spacing needs a finite log-SNR at t = T; this schedule ends at SNR 0, so "
            "use spacing='time' (or leave spacing unset)"
        )
    timesteps = schedule.timesteps
    check_positive_int("steps", steps, maximum=timesteps)
    if steps == 1:
        return torch.tensor([timesteps - 1])
    if spacing == "time":
        return torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long()
    alpha_bar = schedule.alphas_cumprod.cpu()
    lambdas = 0.5 * (alpha_bar.log() - (-alpha_bar).log1p())  # decreasing in t
    targets = torch.linspace(float(lambdas[0]), float(lambdas[-1]), steps, dtype=torch.float64)
    nearest = (lambdas[None, :] - targets[:, None]).abs().argmin(1).tolist()
    return torch.tensor(_distinct_ascending(nearest, timesteps))


def _distinct_ascending(values: list[int], timesteps: int) -> list[int]:
    """Nudge sorted timesteps apart where rounding merged neighbours, staying in 0..T-1."""
    values = sorted(values)
    for k in range(1, len(values)):
        values[k] = max(values[k], values[k - 1] + 1)
    for k in reversed(range(len(values))):
        values[k] = min(values[k], timesteps - len(values) + k)
    return values


class EvaluationCounter(nn.Module):
    """Wraps a noise predictor and counts how often it is called, and on how many images.

    A sampler's cost is its number of network evaluations (NFE). ``calls`` counts calls and
    ``images`` the batch rows passed, so classifier-free guidance's doubled batch shows up.
    The arguments after ``x_t`` (``t``, labels) are passed on as given, so it also wraps a
    model without a time input, such as :class:`~diffusion_lib.masked_diffusion.TokenDenoiser`.
    """

    def __init__(self, model: NoisePredictor) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.images = 0

    def forward(self, x_t: Tensor, *args: Tensor) -> Tensor:
        self.calls += 1
        self.images += x_t.shape[0]
        return self.model(x_t, *args)


def _grid(
    schedule: NoiseSchedule, steps: int, spacing: str | None, timesteps: Tensor | None
) -> Tensor:
    """The visited timesteps, noisiest first, checked: shape (S,) int64 on the CPU."""
    if timesteps is None:
        return ode_timesteps(schedule, cap_sampling_steps(steps), spacing).flip(0)
    grid = torch.as_tensor(timesteps).cpu()
    if grid.dim() != 1 or grid.numel() < 1 or not is_integer_tensor(grid):
        raise ValueError(f"timesteps must be a 1-D tensor of integers, got {grid!r}")
    grid = grid.long()
    check_timesteps(grid, schedule.timesteps, grid.numel())
    if grid.numel() > 1 and not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError(f"timesteps must be strictly increasing, got {grid.tolist()}")
    return grid.flip(0)


def _coefficients(schedule: NoiseSchedule, grid: Tensor) -> tuple[list[float], list[float]]:
    """alpha_t and sigma_t at each visited timestep, then (1, 0) for the finished sample."""
    alpha_bar = schedule.alphas_cumprod.cpu()[grid].tolist()
    alphas = [math.sqrt(a) for a in alpha_bar] + [1.0]
    sigmas = [math.sqrt(1.0 - a) for a in alpha_bar] + [0.0]
    return alphas, sigmas


def _estimates(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    t: int,
    clip_x0: tuple[float, float] | None,
    extra: dict[str, object],
) -> tuple[Tensor, Tensor]:
    """:func:`~diffusion_lib.reverse_process._noise_and_x0` at one timestep ``t`` for the whole batch."""
    times = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    return _noise_and_x0(model, schedule, x, times, clip_x0, extra)


def heun_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 10,
    spacing: str | None = None,
    timesteps: Tensor | None = None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Heun's second-order method for the sampling ODE (Karras et al. 2022, Algorithm 1).

    With ``d_i = eps_theta(x_i, t_i)`` and ``rho_i = sigma_i / alpha_i``, each step first takes
    DDIM's Euler step ``x_bar' = x_bar_i + (rho_{i+1} - rho_i) d_i``, evaluates the model there,
    and then redoes the step with the mean of the two slopes::

        x_bar_{i+1} = x_bar_i + (rho_{i+1} - rho_i) (d_i + d') / 2.

    The last step, to ``rho = 0``, is Euler's (the slope at ``rho = 0`` is undefined), so
    ``steps`` steps cost ``2 steps - 1`` network calls. On a schedule with zero terminal SNR
    the first state has ``alpha = 0`` and ``rho = inf``, where no trapezoid can start: the first
    step is DDIM's, ``x = alpha_1 x0_hat + sigma_1 eps_hat``, the limit DPM-Solver++ takes
    there as well, and costs one call fewer.

    Args:
        model, schedule, shape, x_T, generator, device: as for
            :func:`~diffusion_lib.sampling.ddim_sample`.
        steps, spacing: number of timesteps visited and how :func:`ode_timesteps` spreads them.
        timesteps: the visited 0-based timesteps instead, strictly increasing (for example
            ``ddim_timesteps(T, steps)``); ``steps`` is then ignored.
        clip_x0: range the x_0 estimate is clipped to at each call (``None``: no clipping).
        labels, guidance, null_label: class conditioning and classifier-free guidance.
        return_trajectory: also return the state after each step.

    Returns the samples (B, ...), or ``(samples, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    grid = _grid(schedule, steps, spacing, timesteps)
    alphas, sigmas = _coefficients(schedule, grid)
    x = _start(model, shape, x_T, generator, device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states = [x.cpu()]
    with _evaluating(model):
        for i, t in enumerate(grid.tolist()):
            eps, x0 = _estimates(model, schedule, x, t, clip_x0, extra)
            if i + 1 == len(grid):
                x = x0  # Euler to rho = 0 lands on the x_0 estimate
            elif alphas[i] == 0:
                x = alphas[i + 1] * x0 + sigmas[i + 1] * eps  # from rho = inf: DDIM's step
            else:
                rho, rho_next = sigmas[i] / alphas[i], sigmas[i + 1] / alphas[i + 1]
                x_bar = x / alphas[i]
                guess = alphas[i + 1] * (x_bar + (rho_next - rho) * eps)
                eps_next, _ = _estimates(model, schedule, guess, int(grid[i + 1]), clip_x0, extra)
                x = alphas[i + 1] * (x_bar + (rho_next - rho) * 0.5 * (eps + eps_next))
            if return_trajectory:
                states.append(x.cpu())
    return _finish(x, states, grid, return_trajectory)


def dpm_solver_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 20,
    order: int = 2,
    spacing: str | None = None,
    timesteps: Tensor | None = None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """DPM-Solver++ in its multistep form (Lu et al. 2022, "DPM-Solver++", Algorithm 2).

    In ``lambda = log(alpha / sigma)`` the ODE's solution from t_i to t_{i+1} is exactly
    ``x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} integral of e^lambda x0_theta d lambda``
    (the paper's exact solution for a data-predicting model). With ``h = lambda_{i+1} - lambda_i`` and the model's x_0 estimate ``D`` held fixed
    over the step, the integral gives the first-order update ::

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (e^{-h} - 1) D,

    which is deterministic DDIM written differently. ``order=2`` replaces ``D`` by
    ``(1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1}`` with ``r = h_{i-1} / h``, a linear extrapolation
    through the previous step's estimate, at no extra network call. The first step, with no
    previous estimate, and the last, to ``sigma = 0`` where the state is the estimate D itself,
    are first order. ``steps`` steps cost ``steps`` network calls.

    On a schedule with zero terminal SNR the first state is pure noise, and the model must give
    an x_0 estimate there: an x_0 or v model (wrapped by ``NoiseFromPrediction``) does, a noise
    predictor cannot.

    Args:
        model, schedule, shape, x_T, generator, device: as for
            :func:`~diffusion_lib.sampling.ddim_sample`.
        steps, spacing: number of timesteps visited and how :func:`ode_timesteps` spreads them.
        order: 1 (DDIM) or 2 (DPM-Solver++(2M)).
        timesteps: the visited 0-based timesteps instead, strictly increasing; ``steps`` is
            then ignored. With ``ddim_timesteps(T, steps)`` and ``order=1`` the result is
            :func:`~diffusion_lib.sampling.ddim_sample`'s.
        clip_x0: range the x_0 estimate is clipped to (``None``: no clipping); clipping ``D``
            is the thresholding the paper recommends for pixel-space models.
        labels, guidance, null_label: class conditioning and classifier-free guidance.
        return_trajectory: also return the state after each step.

    Returns the samples (B, ...), or ``(samples, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    if order not in ORDERS or isinstance(order, bool):
        raise ValueError(f"order must be 1 (DDIM) or 2 (DPM-Solver++(2M)), got {order!r}")
    grid = _grid(schedule, steps, spacing, timesteps)
    alphas, sigmas = _coefficients(schedule, grid)
    # lambda = log(alpha / sigma); -inf where alpha = 0 (zero terminal SNR), where the update
    # below takes its limit: expm1(-inf) = -1, and 0.5 / r = 0 at the step after.
    lambdas = [
        math.log(a / s) if a > 0 else -math.inf
        for a, s in zip(alphas[:-1], sigmas[:-1], strict=True)
    ]
    x = _start(model, shape, x_T, generator, device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states, previous = [x.cpu()], None
    with _evaluating(model):
        for i, t in enumerate(grid.tolist()):
            _, x0 = _estimates(model, schedule, x, t, clip_x0, extra)
            if i + 1 == len(grid):
                x = x0
            else:
                h = lambdas[i + 1] - lambdas[i]
                estimate = x0
                if order == 2 and previous is not None:
                    r = (lambdas[i] - lambdas[i - 1]) / h
                    estimate = (1 + 0.5 / r) * x0 - (0.5 / r) * previous
                x = sigmas[i + 1] / sigmas[i] * x - alphas[i + 1] * math.expm1(-h) * estimate
            previous = x0
            if return_trajectory:
                states.append(x.cpu())
    return _finish(x, states, grid, return_trajectory)


def _finish(
    x: Tensor, states: list[Tensor], grid: Tensor, return_trajectory: bool
) -> Tensor | tuple[Tensor, Trajectory]:
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.cat([grid, torch.tensor([-1])]))
