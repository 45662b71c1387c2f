"""Flow matching on the straight path between data and noise (rectified flow).

Instead of a Markov chain, connect each data point x_0 to a noise vector eps by a straight line, ::

    x_t = (1 - t) x_0 + t eps,        t in [0, 1]   (t = 0 data, t = 1 noise),

and regress a network on the line's constant velocity ``dx_t / dt = eps - x_0``::

    L_FM = E_{x_0, eps, t ~ U(0, 1)} || v_theta(x_t, t) - (eps - x_0) ||^2.

The minimiser is the marginal velocity ``v(x, t) = E[eps - x_0 | x_t = x]``, and the ordinary
differential equation ``dx/dt = v(x, t)`` carries N(0, I) at t = 1 to the data at t = 0
(Lipman et al. 2023, Theorem 1 and eq. 9; Liu et al. 2023, eqs. 1 and 2; the straight path is
the optimal-transport path of Lipman et al., sec. 4.1, with sigma_min = 0). Liu et al. and
Lipman et al. run time the other way (t = 0 noise); the direction here follows the book's
forward process and Esser et al. (2024, eq. 2).

A velocity model is an ``nn.Module`` like the noise predictors, called as
``model(x_t, time_scale * t)``, so networks built for timesteps 0..T-1 see inputs in the same
range. This module holds the path (:class:`RectifiedFlow`), the loss, and the Euler and Heun
samplers that integrate the ODE from t = 1 to t = 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lib.reverse_process import _conditioning, predict_noise
from diffusion_lib.sampler_inputs import (
    NoisePredictor,
    _check_network_dtype,
    _evaluating,
    _randn,
    _start,
)
from diffusion_lib.sampling import Trajectory
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_generator,
    check_positive_int,
    check_same_shape,
    check_schedule,
)

SOLVERS = ("euler", "heun")
_FLOW_HINT = (
    "the second argument, after the model; for a NoiseSchedule use ddpm_sample, ddim_sample "
    "or the solvers, and diffusion_loss"
)


def _check_times(t: Tensor, batch_size: int) -> None:
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point or t.shape != (batch_size,):
        shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be a float tensor of shape ({batch_size},), got {shape}")
    if t.numel() and (float(t.min()) < 0.0 or float(t.max()) > 1.0):
        raise ValueError(
            f"times must lie in [0, 1] (0 data, 1 noise); got {float(t.min())} to {float(t.max())}"
        )


def _per_sample(t: Tensor, x: Tensor) -> Tensor:
    """(B,) times as (B, 1, ..., 1) in ``x``'s dtype, to broadcast against ``x``."""
    return t.to(device=x.device, dtype=x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


class RectifiedFlow:
    """The straight path ``x_t = (1 - t) x_0 + t eps`` and the conversions a sampler needs.

    Args:
        time_scale: the model is called with ``time_scale * t``; the default 1000 gives
            velocity networks the input range of the diffusion timesteps 0..999.

    Shapes: ``x_0``, ``eps``, ``x_t``, ``v``: (B, ...) alike; ``t``: (B,) float in [0, 1].
    """

    def __init__(self, time_scale: float = 1000.0) -> None:
        if not time_scale > 0:
            raise ValueError(f"time_scale must be positive, got {time_scale}")
        self.time_scale = float(time_scale)

    def __repr__(self) -> str:
        return f"RectifiedFlow(time_scale={self.time_scale:g})"

    def to(self, device: torch.device | str) -> RectifiedFlow:
        """The path holds no tensors; returns itself so it moves like a :class:`~diffusion_lib.schedules.NoiseSchedule`."""
        return self

    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input, ``time_scale * t``: (B,) -> (B,) float32."""
        return t.to(torch.float32) * self.time_scale

    def interpolate(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """``x_t = (1 - t) x_0 + t eps``, the point a fraction t of the way to the noise."""
        check_same_shape("noise", noise, "x0", x0)
        _check_times(t, x0.shape[0])
        t = _per_sample(t, x0)
        return (1 - t) * x0 + t * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """``dx_t / dt = eps - x_0``, the same at every t on one line."""
        check_same_shape("noise", noise, "x0", x0)
        return noise - x0

    def x0_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """Follow the line back to t = 0: ``x_0 = x_t - t v`` (exact when v is the line's)."""
        return x_t - _per_sample(t, x_t) * v

    def eps_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """Follow the line on to t = 1: ``eps = x_t + (1 - t) v``."""
        return x_t + (1 - _per_sample(t, x_t)) * v

    def velocity_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The velocity that a noise estimate implies: ``v = (eps - x_t) / (1 - t)``, for t < 1."""
        return (eps - x_t) / (1 - _per_sample(t, x_t))


def uniform_times_and_noise(
    x0: Tensor, t: Tensor | None, noise: Tensor | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """``t`` (B,) and ``noise`` (like ``x0``) as given, or drawn: t ~ U(0, 1) per sample and
    standard normal noise, both from ``generator`` on its own device."""
    check_generator(generator)
    if t is None:
        source = generator.device if generator is not None else x0.device
        t = torch.rand((x0.shape[0],), generator=generator, device=source).to(x0.device)
    if noise is None:
        noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    return t, noise


def flow_matching_loss(
    model: NoisePredictor,
    flow: RectifiedFlow,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``mean || v_theta(x_t, t) - (eps - x_0) ||^2`` with t ~ U(0, 1) (Lipman et al. 2023, eq. 23).

    ``x0``: (B, ...) data. A time per sample and fresh Gaussian noise are drawn unless ``t``
    (B,) or ``noise`` (like ``x0``) are given; a fixed ``noise`` per data point is the coupling
    that reflow trains on (Liu et al. 2023, sec. 2.3). ``labels`` (B,) go to a conditional
    model as ``model(x_t, t, labels)``. Returns a scalar float32 tensor.
    """
    check_schedule(flow, RectifiedFlow, name="flow", hint=_FLOW_HINT)
    _check_network_dtype(model, "x0", x0)
    _check_network_dtype(model, "noise", noise)
    t, noise = uniform_times_and_noise(x0, t, noise, generator)
    x_t = flow.interpolate(x0, noise, t)
    time = flow.model_time(t)
    v = model(x_t, time) if labels is None else model(x_t, time, labels)
    check_same_shape("the model's output", v, "x0", x0)
    return F.mse_loss(v.float(), flow.velocity_target(x0, noise).float())


def flow_times(steps: int) -> Tensor:
    """The ``steps + 1`` times an ODE solver visits, evenly spaced from 1 (noise) to 0 (data)."""
    return torch.linspace(1.0, 0.0, check_positive_int("steps", steps) + 1, dtype=torch.float64)


def flow_sample(
    model: NoisePredictor,
    flow: RectifiedFlow,
    shape: tuple[int, ...],
    *,
    steps: int = 50,
    solver: str = "euler",
    x_1: Tensor | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """Integrate ``dx/dt = v_theta(x, t)`` from noise at t = 1 to data at t = 0.

    ``solver="euler"`` takes ``x_{t-h} = x_t - h v(x_t, t)`` (one model call per step);
    ``"heun"`` averages that slope with the one at the Euler point (Karras et al. 2022,
    Algorithm 1; two calls per step, second-order accurate). The steps are ``h = 1 / steps``.
    ``x_1`` (shape ``shape``) fixes the starting noise. With ``labels`` and ``guidance = w``
    the velocities are combined as ``(1 + w) v(c) - w v(no label)``, like the noise estimates
    of classifier-free guidance.

    Returns the samples, or ``(samples, trajectory)`` where ``trajectory.timesteps`` (S + 1,)
    holds the float times t of the states, 1.0 first and 0.0 for the finished sample.
    """
    check_schedule(flow, RectifiedFlow, name="flow", hint=_FLOW_HINT)
    check_choice("solver", solver, SOLVERS)
    steps = cap_sampling_steps(check_positive_int("steps", steps))
    times = flow_times(steps)
    x = _start(model, shape, x_1, generator, device, name="x_1")
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)

    def velocity(x: Tensor, t: float) -> Tensor:
        time = flow.model_time(torch.full((x.shape[0],), t, device=x.device))
        v = predict_noise(model, x, time, **extra)
        check_same_shape("the model's output", v, "x", x)
        return v.to(x.dtype)

    states = [x.cpu()]
    with _evaluating(model):
        for t, t_next in zip(times[:-1].tolist(), times[1:].tolist(), strict=True):
            slope = velocity(x, t)
            if solver == "heun":
                slope = 0.5 * (slope + velocity(x + (t_next - t) * slope, t_next))
            x = x + (t_next - t) * slope
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), times.float())
