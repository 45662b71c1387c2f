"""The samplers: ancestral sampling (DDPM), DDIM and its inversion, and spherical interpolation
between their starting noises.

Each sampler starts from noise and chains steps of the reverse process
(:mod:`diffusion_lib.reverse_process`), over all T timesteps or over a shorter respaced chain
(:mod:`diffusion_lib.respacing`). The models they take, the device they compute on and the
noise they draw are described in :mod:`diffusion_lib.sampler_inputs`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lib.respacing import _respaced_chain, ddim_timesteps
from diffusion_lib.reverse_process import (
    VARIANCES,
    _ancestral_step,
    _conditioning,
    _noise_and_x0,
    predict_noise,
)
from diffusion_lib.sampler_inputs import (
    NoisePredictor,
    _check_labels,
    _check_model_and_schedule,
    _check_network_dtype,
    _evaluating,
    _randn,
    _start,
)
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import check_choice, check_same_shape


@dataclass
class Trajectory:
    """The states a sampler visited, for plots and animations.

    Attributes:
        states: (S + 1, B, C, H, W) on the CPU; ``states[0]`` is the starting noise x_T and
            ``states[-1]`` the finished sample.
        timesteps: (S + 1,) int64; ``timesteps[i]`` is the 0-based timestep at which
            ``states[i]`` was handed to the model, and -1 for the finished sample. For
            :func:`~diffusion_lib.flow_matching.flow_sample` it is float32 instead: the time
            t in [0, 1] of each state, from 1.0 (noise) to 0.0 (the finished sample); for
            :func:`~diffusion_lib.edm.edm_sample`, the noise level sigma of each state, ending
            at 0.0. :func:`~diffusion_lib.sampling.ddim_encode` runs the other way:
            ``states[0]`` is x_0, marked -1, and ``timesteps[i]`` is the timestep that
            ``states[i]`` has reached.
    """

    states: Tensor
    timesteps: Tensor


def ddpm_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    variance: str = "small",
    return_trajectory: bool = False,
    steps: int | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2).

    Starting from x_T ~ N(0, I), repeat for t = T-1, ..., 0:
    ``x_{t-1} = mu_theta(x_t, t) + sigma_t z`` with z ~ N(0, I), and z = 0 at the last step.

    Args:
        model: noise predictor ``model(x_t, t)``.
        schedule: the schedule the model was trained with.
        shape: (B, C, H, W) of the batch to draw.
        x_T: starting noise of that shape (drawn from ``generator`` when omitted).
        variance: ``"small"`` (beta_tilde_t), ``"large"`` (beta_t) or ``"learned"`` (a model
            with 2C output channels, Nichol & Dhariwal 2021, eq. 15).
        steps: visit only this many evenly spaced timesteps, with the schedule respaced to
            keep alpha-bar (Nichol & Dhariwal 2021, sec. 4); ``None`` visits all T.
        clip_x0: range the x_0 estimate is clipped to at each step (``None``: no clipping).
        labels, guidance, null_label: class conditioning and classifier-free guidance
            (see :func:`~diffusion_lib.reverse_process.predict_noise`).
        return_trajectory: also return every visited state as a :class:`Trajectory`.

    Returns the samples (B, C, H, W), or ``(samples, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    check_choice("variance", variance, VARIANCES)
    steps = cap_sampling_steps(schedule.timesteps if steps is None else steps)
    x = _start(model, shape, x_T, generator, device)
    sampling_schedule, kept, wrapped = _respaced_chain(model, schedule, steps, x.device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states, visited = [x.cpu()], []
    with _evaluating(model):
        for index in reversed(range(steps)):
            x = _ancestral_step(
                wrapped, sampling_schedule, x, index, generator, variance, clip_x0, extra
            )
            visited.append(int(kept[index]))
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.tensor([*visited, -1]))


def _ddim_update(
    x0: Tensor,
    eps: Tensor,
    alpha_bar: Tensor,
    alpha_bar_prev: Tensor,
    eta: float,
    last: bool,
    generator: torch.Generator | None,
) -> Tensor:
    """One DDIM step from the estimates x0 and eps (Song et al. 2021, eq. 12, sigma of eq. 16):
    ``sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z``, with no noise at the last."""
    sigma = eta * ((1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)).sqrt()
    x = alpha_bar_prev.sqrt() * x0 + (1 - alpha_bar_prev - sigma**2).clamp(min=0).sqrt() * eps
    if eta > 0 and not last:
        x = x + sigma * _randn(tuple(x.shape), generator, x.device)
    return x


def _check_eta(eta: object) -> float:
    """``eta`` as a float if it is a number in [0, 1], else ``ValueError``."""
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not 0.0 <= eta <= 1.0:
        raise ValueError(
            "eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM's variance); "
            f"got {eta!r}"
        )
    return float(eta)


def ddim_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    spacing: str = "leading",
    eta: float = 0.0,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """DDIM sampling (Song et al. 2021, eq. 12) over ``steps`` evenly spaced timesteps.

    For consecutive visited timesteps t > s (and alpha-bar_s = 1 after the last one):
    ``x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z``, with
    ``sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)`` (eq. 16).
    ``eta = 0`` is deterministic DDIM; ``eta = 1`` matches DDPM's posterior variance; eta lies
    in [0, 1], beyond which sigma^2 would exceed the ``1 - abar_s`` that eq. 12 shares out.
    When x0_hat is clipped, eps_hat is recomputed from it so that both stay consistent.
    ``spacing`` picks the visited timesteps (:func:`~diffusion_lib.respacing.ddim_timesteps`);
    ``"trailing"`` starts at t = T - 1, as a schedule with zero terminal SNR needs.

    Returns the samples (B, C, H, W), or ``(samples, trajectory)`` when asked.
    """
    _check_model_and_schedule(model, schedule)
    eta = _check_eta(eta)
    steps = cap_sampling_steps(steps)
    visited = ddim_timesteps(schedule.timesteps, steps, spacing)
    x = _start(model, shape, x_T, generator, device)
    schedule = schedule.to(x.device)
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states = [x.cpu()]
    with _evaluating(model):
        for i in reversed(range(steps)):
            t = torch.full((x.shape[0],), int(visited[i]), device=x.device, dtype=torch.long)
            eps, x0 = _noise_and_x0(model, schedule, x, t, clip_x0, extra)
            alpha_bar = _gather(schedule.alphas_cumprod, t, x)
            alpha_bar_prev = (
                _gather(schedule.alphas_cumprod, torch.full_like(t, int(visited[i - 1])), x)
                if i > 0
                else torch.ones_like(alpha_bar)
            )
            x = _ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, i == 0, generator)
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.cat([visited.flip(0), torch.tensor([-1])]))


def ddim_encode(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    steps: int = 50,
    spacing: str = "leading",
    labels: Tensor | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Run deterministic DDIM backwards: map images x_0 to the noise x_T that DDIM would decode to them.

    The eta = 0 update (Song et al. 2021, eq. 12) is the Euler step of an ODE (eq. 14), so it
    can be integrated from x_0 towards x_T over the same timesteps as :func:`ddim_sample`; each
    step evaluates the model at the state it leaves and the timestep it moves to. With enough
    steps, ``ddim_sample(..., x_T=ddim_encode(...))`` gives back x_0 up to discretisation error.
    ``x0``: (B, C, H, W). Returns x_T of the same shape, or ``(x_T, trajectory)``.
    """
    _check_model_and_schedule(model, schedule)
    _check_network_dtype(model, "x0", x0)
    steps = cap_sampling_steps(steps)
    visited = ddim_timesteps(schedule.timesteps, steps, spacing)
    schedule = schedule.to(x0.device)
    labels = _check_labels(labels, x0.shape[0], x0.device)
    x, states = x0, [x0.cpu()]
    alpha_bar = torch.ones(x0.shape[0], *([1] * (x0.dim() - 1)), dtype=x0.dtype, device=x0.device)
    with _evaluating(model):
        for i in range(steps):
            t = torch.full((x.shape[0],), int(visited[i]), device=x.device, dtype=torch.long)
            eps = predict_noise(model, x, t, labels).to(x.dtype)
            x0_estimate = (x - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()
            alpha_bar = _gather(schedule.alphas_cumprod, t, x)
            x = alpha_bar.sqrt() * x0_estimate + (1 - alpha_bar).sqrt() * eps
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.cat([torch.tensor([-1]), visited]))


def slerp(x0: Tensor, x1: Tensor, weight: float | Tensor) -> Tensor:
    """Spherical interpolation between two noise tensors (Shoemake 1985), as used on DDIM latents.

    Gaussian noise in many dimensions lives near a sphere of radius sqrt(d); a straight line
    between two such points passes inside it, where the model has never seen its inputs, while
    ``sin((1 - w) theta) / sin(theta) x0 + sin(w theta) / sin(theta) x1`` stays on it.
    ``x0``, ``x1``: same shape (..., D...) with the first dimension as batch; ``weight`` in [0, 1].
    """
    check_same_shape("x1", x1, "x0", x0)
    if x0.dim() < 2:
        raise ValueError(
            "slerp interpolates batches: x0 and x1 must have shape (B, ...) with the batch "
            f"first, e.g. (1, {x0.numel()}) for a single vector; got {tuple(x0.shape)}"
        )
    flat0, flat1 = x0.flatten(1), x1.flatten(1)
    cosine = (flat0 * flat1).sum(1) / (flat0.norm(dim=1) * flat1.norm(dim=1))
    theta = torch.arccos(cosine.clamp(-1.0, 1.0)).reshape(-1, *([1] * (x0.dim() - 1)))
    weight = torch.as_tensor(weight, dtype=x0.dtype, device=x0.device)
    sin_theta = torch.sin(theta).clamp(min=1e-8)
    mixed = (torch.sin((1 - weight) * theta) * x0 + torch.sin(weight * theta) * x1) / sin_theta
    # Nearly parallel inputs: the spherical formula degenerates, fall back to a straight line.
    return torch.where(theta < 1e-4, (1 - weight) * x0 + weight * x1, mixed)
