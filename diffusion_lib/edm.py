"""The design space of Karras et al. (2022), "EDM": noise levels, preconditioning, loss and sampler.

EDM writes every diffusion model in one variable, the noise level sigma: a noisy point is ::

    x = y + sigma n,        y ~ data,  n ~ N(0, I),

and a network is used through its *denoiser* ``D(x; sigma)``, an estimate of ``E[y | x]``.
The DDPM chain of the earlier chapters is this process scaled by ``alpha_t = sqrt(alpha_bar_t)``:
``x_t / alpha_t = x_0 + (sigma_t / alpha_t) eps``, so its noise level is
``sigma = sqrt((1 - alpha_bar_t) / alpha_bar_t)``, the ``rho`` of :mod:`diffusion_lib.solvers`.
With the score ``grad log p(x; sigma) = (D(x; sigma) - x) / sigma^2`` (eq. 3), the
probability-flow ODE with ``sigma(t) = t`` reads (eq. 1) ::

    dx / dsigma = (x - D(x; sigma)) / sigma.

The paper then treats each choice as a separate knob, and this module implements its Table 1:

* sampling: the noise levels :func:`karras_sigmas` (eq. 5) and :func:`edm_sample`, Heun's
  method with optional stochastic "churn" (Algorithm 2);
* the network: :class:`PreconditionedDenoiser`, ``D = c_skip x + c_out F(c_in x, c_noise)``
  around any of the book's networks F, with the coefficients of :func:`preconditioning` (eq. 7);
* training: :class:`EDMNoiseLevels` (log-normal sigma and the loss weight) and :func:`edm_loss`,
  the denoising loss (eq. 2) weighted so that F's effective target has weight 1 (eq. 8).

``train(PreconditionedDenoiser(net), EDMNoiseLevels(), images, loss=edm_loss)`` trains with the
library's engine, and ``edm_sample(result.ema_model, shape)`` samples.
"""

from __future__ import annotations

import math
import numbers
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

from diffusion_lib.flow_matching import SOLVERS, _per_sample
from diffusion_lib.reverse_process import _conditioning, predict_noise
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _randn, _start
from diffusion_lib.sampling import Trajectory
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_choice,
    check_number,
    check_positive_int,
    check_same_shape,
)


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> Tensor:
    """The noise levels of the sampler (Karras et al. 2022, eq. 5), shape (steps + 1,), float64.

    ``sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``
    for ``i = 0 .. N - 1``, then ``sigma_N = 0``. They are evenly spaced in ``sigma^(1/rho)``:
    ``rho = 1`` spreads them evenly in sigma, and a large ``rho`` approaches even spacing in
    ``log sigma``; ``rho = 7`` crowds the steps near ``sigma_min``. One step gives
    ``[sigma_max, 0]``.
    """
    steps = check_positive_int("steps", steps)
    sigma_min = check_number("sigma_min", sigma_min, 0.0, low_open=True)
    sigma_max = check_number("sigma_max", sigma_max, sigma_min, low_open=True)
    rho = check_number("rho", rho, 0.0, low_open=True)
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64)
    fraction = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    low, high = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (high + fraction * (low - high)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


class Preconditioning(NamedTuple):
    """The four coefficients of eq. 7, each shaped like the ``sigma`` they were computed from."""

    c_skip: Tensor
    c_out: Tensor
    c_in: Tensor
    c_noise: Tensor


def preconditioning(sigma: Tensor, sigma_data: float = 0.5) -> Preconditioning:
    """EDM's preconditioning (Karras et al. 2022, Table 1 and appendix B.6) at noise levels sigma.

    For data of standard deviation ``sigma_data`` and ``x = y + sigma n``:

    * ``c_in = 1 / sqrt(sigma^2 + sigma_data^2)`` gives the network inputs of unit variance;
    * ``c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)`` and
      ``c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)`` make F's target
      ``(y - c_skip x) / c_out`` unit-variance, with ``c_out`` as small as possible;
    * ``c_noise``: the paper's ``ln(sigma) / 4``, mapped affinely from [-2, 2] onto [0, 1000],
      ``c_noise = 250 (ln(sigma) / 4 + 2)``, the range of the book's time embeddings (clamped
      there: noise levels outside [3.4e-4, 3000] share the end values).

    ``sigma``: a tensor of any shape, typically (B,). Returns :class:`Preconditioning`.
    """
    sigma_data = check_number("sigma_data", sigma_data, 0.0, low_open=True)
    variance = sigma.pow(2) + sigma_data**2
    # ln(sigma) / 4 in [-2, 2] onto [0, 1000]; sigma = 0 gives -inf, which the clamp sends to 0
    c_noise = (250.0 * (sigma.log() / 4 + 2.0)).clamp(0.0, 1000.0)
    return Preconditioning(
        c_skip=sigma_data**2 / variance,
        c_out=sigma * sigma_data / variance.sqrt(),
        c_in=variance.rsqrt(),
        c_noise=c_noise,
    )


class PreconditionedDenoiser(nn.Module):
    """``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise)`` (Karras et al. 2022, eq. 7).

    Args:
        network: F, any of the book's networks, ``network(x, time)`` or
            ``network(x, time, labels)`` with ``time`` in [0, 1000]; its output is F's
            estimate of the unit-variance target, not a noise estimate.
        sigma_data: the data's standard deviation (0.5 for images in [-1, 1], as in the paper).

    Called as ``denoiser(x, sigma)`` or ``denoiser(x, sigma, labels)``: ``x`` (B, ...), ``sigma``
    (B,) positive -> (B, ...) in ``x``'s dtype, the estimate of the clean data. A network whose
    output layer starts at zero starts as ``D = c_skip x``, the best linear guess for data of
    standard deviation ``sigma_data``.
    """

    def __init__(self, network: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise ValueError(f"network must be an nn.Module, got {type(network).__name__}")
        self.network = network
        self.sigma_data = check_number("sigma_data", sigma_data, 0.0, low_open=True)
        if hasattr(network, "null_label"):
            self.null_label = network.null_label

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        _check_sigma_shape(sigma, x.shape[0])
        c_skip, c_out, c_in, c_noise = preconditioning(sigma.to(x.dtype), self.sigma_data)
        inputs = (_per_sample(c_in, x) * x, c_noise)
        output = self.network(*inputs) if labels is None else self.network(*inputs, labels)
        check_same_shape("the network's output", output, "x", x)
        return _per_sample(c_skip, x) * x + _per_sample(c_out, x) * output.to(x.dtype)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data:g}"


def _check_sigma_shape(sigma: Tensor, batch_size: int) -> None:
    if (
        not isinstance(sigma, Tensor)
        or not sigma.is_floating_point()
        or sigma.shape != (batch_size,)
    ):
        shape = tuple(sigma.shape) if isinstance(sigma, Tensor) else type(sigma).__name__
        raise ValueError(f"sigma must be a float tensor of shape ({batch_size},), got {shape}")


class EDMNoiseLevels:
    """How EDM training draws noise levels and weighs them (Karras et al. 2022, Table 1).

    ``ln(sigma) ~ N(p_mean, p_std^2)`` and the weight
    ``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 = 1 / c_out(sigma)^2``.
    It plays the schedule's part in :func:`~diffusion_lib.training.train`: a plain object that
    the loss reads, with a ``.to(device)`` that returns itself (it holds no tensors).
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5) -> None:
        self.p_mean = check_number("p_mean", p_mean, -math.inf, low_open=True)
        self.p_std = check_number("p_std", p_std, 0.0, low_open=True)
        self.sigma_data = check_number("sigma_data", sigma_data, 0.0, low_open=True)

    def __repr__(self) -> str:
        return (
            f"EDMNoiseLevels(p_mean={self.p_mean:g}, p_std={self.p_std:g}, "
            f"sigma_data={self.sigma_data:g})"
        )

    def to(self, device: torch.device | str) -> EDMNoiseLevels:
        return self

    def sample(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``batch_size`` log-normal noise levels, shape (B,), drawn from ``generator``."""
        normal = _randn((check_positive_int("batch_size", batch_size),), generator, device, dtype)
        return (self.p_mean + self.p_std * normal).exp()

    def loss_weight(self, sigma: Tensor) -> Tensor:
        """``lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2``, shaped like sigma."""
        return (sigma.pow(2) + self.sigma_data**2) / (sigma * self.sigma_data).pow(2)


def edm_loss(
    model: NoisePredictor,
    noise_levels: EDMNoiseLevels,
    x0: Tensor,
    *,
    sigma: Tensor | None = None,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``mean lambda(sigma) ||D(y + sigma n; sigma) - y||^2`` (Karras et al. 2022, eqs. 2 and 8).

    ``model`` is a denoiser ``D(x, sigma)`` (or ``D(x, sigma, labels)``), usually a
    :class:`PreconditionedDenoiser`; ``x0``: (B, ...) data y. Per sample, ``sigma`` (B,) is drawn
    from ``noise_levels`` and then ``n`` ~ N(0, I) like ``x0``, both from ``generator``, unless
    given. The squared error is averaged over each sample's elements, weighed by
    ``noise_levels.loss_weight(sigma)`` and averaged over the batch. With the preconditioning
    of the same ``sigma_data`` this is the plain mean squared error of F against its target
    ``(y - c_skip x) / c_out`` (eq. 8 with ``lambda c_out^2 = 1``). Returns a scalar float32.
    Passed to :func:`~diffusion_lib.training.train` as ``loss=`` with ``noise_levels`` as schedule.
    """
    if not isinstance(noise_levels, EDMNoiseLevels):
        raise ValueError(
            "edm_loss draws its noise levels from an EDMNoiseLevels passed as the schedule, "
            f"got {type(noise_levels).__name__}"
        )
    model_sigma_data = getattr(model, "sigma_data", None)
    if model_sigma_data is not None and model_sigma_data != noise_levels.sigma_data:
        raise ValueError(
            f"the denoiser's sigma_data ({model_sigma_data:g}) differs from the loss's "
            f"({noise_levels.sigma_data:g}); use the same value in both"
        )
    if sigma is None:
        sigma = noise_levels.sample(x0.shape[0], generator, x0.device, x0.dtype)
    else:
        _check_sigma_shape(sigma, x0.shape[0])
        if bool((sigma <= 0).any()):
            raise ValueError("sigma must be positive: the loss weight is infinite at sigma = 0")
    if noise is None:
        noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    check_same_shape("noise", noise, "x0", x0)
    x = x0 + _per_sample(sigma, x0) * noise
    denoised = model(x, sigma) if labels is None else model(x, sigma, labels)
    check_same_shape("the model's output", denoised, "x0", x0)
    errors = (denoised.float() - x0.float()).pow(2).flatten(1).mean(dim=1)
    return (noise_levels.loss_weight(sigma).float() * errors).mean()


def _sampling_sigmas(
    steps: int, sigma_min: float, sigma_max: float, rho: float, sigmas: Tensor | None
) -> list[float]:
    """The visited noise levels, noisiest first and ending at 0, checked."""
    if sigmas is None:
        return karras_sigmas(cap_sampling_steps(check_positive_int("steps", steps)),
                             sigma_min, sigma_max, rho).tolist()  # fmt: skip
    grid = torch.as_tensor(sigmas, dtype=torch.float64).cpu()
    finite = grid.dim() == 1 and grid.numel() >= 2 and bool(torch.isfinite(grid).all())
    if not finite or float(grid[-1]) != 0.0 or not bool((grid[1:] < grid[:-1]).all()):
        raise ValueError(
            "sigmas must be a 1-D tensor of at least two finite noise levels, strictly "
            f"decreasing and ending at 0, got {grid.tolist()}"
        )
    return grid.tolist()


def _churn(sigmas: list[float], s_churn: float, s_tmin: float, s_tmax: float) -> list[float]:
    """``gamma_i`` of Algorithm 2: ``min(S_churn / N, sqrt(2) - 1)`` within [S_tmin, S_tmax]."""
    s_churn = check_number("s_churn", s_churn, 0.0, low_open=False)
    s_tmin = check_number("s_tmin", s_tmin, 0.0, low_open=False)
    if isinstance(s_tmax, bool) or not isinstance(s_tmax, numbers.Real) or not s_tmax >= s_tmin:
        raise ValueError(f"s_tmax must be a number >= s_tmin ({s_tmin}), got {s_tmax!r}")
    gamma = min(s_churn / (len(sigmas) - 1), math.sqrt(2) - 1)
    return [gamma if s_tmin <= sigma <= s_tmax else 0.0 for sigma in sigmas[:-1]]


def _denoise(denoiser: NoisePredictor, x: Tensor, sigma: float, extra: dict[str, object]) -> Tensor:
    """``D(x; sigma)`` for the whole batch at one noise level, guided when ``extra`` says so."""
    sigmas = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
    denoised = predict_noise(denoiser, x, sigmas, **extra)  # guidance combines any outputs
    check_same_shape("the denoiser's output", denoised, "x", x)
    return denoised.to(x.dtype)


def _ode_step(
    denoiser: NoisePredictor,
    x: Tensor,
    sigma: float,
    sigma_next: float,
    solver: str,
    extra: dict[str, object],
) -> Tensor:
    """One step of ``dx/dsigma = (x - D(x; sigma)) / sigma`` from sigma to sigma_next
    (Algorithm 2, lines 7-11): Euler, then Heun's correction unless ``sigma_next = 0``."""
    slope = (x - _denoise(denoiser, x, sigma, extra)) / sigma
    x_next = x + (sigma_next - sigma) * slope
    if solver == "euler" or sigma_next == 0.0:
        return x_next
    slope_next = (x_next - _denoise(denoiser, x_next, sigma_next, extra)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (slope + slope_next)


def edm_sample(
    denoiser: NoisePredictor,
    shape: tuple[int, ...],
    *,
    steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    sigmas: Tensor | None = None,
    solver: str = "heun",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    guidance: float = 0.0,
    null_label: int | None = None,
    return_trajectory: bool = False,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Trajectory]:
    """EDM's sampler (Karras et al. 2022, Algorithm 2), deterministic (Algorithm 1) when s_churn = 0.

    Starting from ``x = sigma_0 n`` with ``n`` ~ N(0, I), each step from ``sigma_i`` to
    ``sigma_{i+1}`` first raises the noise to ``sigma_hat = (1 + gamma_i) sigma_i`` by adding
    fresh noise of standard deviation ``s_noise sqrt(sigma_hat^2 - sigma_i^2)`` (the churn,
    ``gamma_i`` from ``s_churn``, ``s_tmin``, ``s_tmax``), then takes one Heun step of the ODE
    ``dx/dsigma = (x - D(x; sigma)) / sigma`` to ``sigma_{i+1}``. The last step, to sigma = 0, is
    Euler's, so N steps cost ``2N - 1`` calls of the denoiser (``solver="euler"``: N).

    Args:
        denoiser: ``D(x, sigma)`` or ``D(x, sigma, labels)`` with ``sigma`` (B,), such as a
            :class:`PreconditionedDenoiser`.
        shape: (B, ...) of the batch to draw.
        steps, sigma_min, sigma_max, rho: the noise levels of :func:`karras_sigmas`.
        sigmas: the visited noise levels instead, strictly decreasing and ending at 0.
        solver: ``"heun"`` (second order) or ``"euler"`` (first order).
        s_churn, s_tmin, s_tmax, s_noise: the stochasticity of Algorithm 2; 0 churn is the ODE.
        noise: the standard normal ``n`` of shape ``shape`` (drawn from ``generator`` if omitted).
        labels, guidance, null_label: class conditioning and classifier-free guidance, applied
            to the denoiser's outputs: ``(1 + w) D(x; c) - w D(x; no label)``.
        return_trajectory: also return the state after each step; ``trajectory.timesteps`` then
            holds the noise levels (float32), ``sigma_0`` first and 0 last.

    Returns the samples (shape), or ``(samples, trajectory)``.
    """
    check_choice("solver", solver, SOLVERS)
    grid = _sampling_sigmas(steps, sigma_min, sigma_max, rho, sigmas)
    gammas = _churn(grid, s_churn, s_tmin, s_tmax)
    s_noise = check_number("s_noise", s_noise, 0.0, low_open=False)
    x = grid[0] * _start(denoiser, shape, noise, generator, device, name="noise")
    extra = _conditioning(labels, guidance, null_label, x.shape[0], x.device)
    states = [x.cpu()]
    with _evaluating(denoiser):
        for (sigma, sigma_next), gamma in zip(pairwise(grid), gammas, strict=True):
            sigma_hat = sigma * (1 + gamma)
            if sigma_hat > sigma:
                fresh = _randn(tuple(x.shape), generator, x.device, x.dtype)
                x = x + s_noise * math.sqrt(sigma_hat**2 - sigma**2) * fresh
            x = _ode_step(denoiser, x, sigma_hat, sigma_next, solver, extra)
            if return_trajectory:
                states.append(x.cpu())
    if not return_trajectory:
        return x
    return x, Trajectory(torch.stack(states), torch.tensor(grid, dtype=torch.float32))
