"""The exact log-likelihood of a diffusion model, through its probability-flow ODE.

Deterministic sampling follows an ordinary differential equation, and an ODE moves probability
density like a normalising flow. In the variables ``x_bar = x / alpha`` and ``rho = sigma / alpha``
of :mod:`diffusion_lib.solvers` the ODE reads ``d x_bar / d rho = eps_theta(alpha x_bar, t)``, and
the instantaneous change of variables (Chen et al. 2018, theorem 1) says how the log-density
changes along a solution::

    d log p(x_bar(rho)) / d rho = -div_{x_bar} eps_theta = -alpha div_x eps_theta.

Integrating from the data (t = 0) to pure noise (t = T - 1) gives Song et al. (2021, eq. 39)::

    log p_0(x_0) = log p_T(x_T) + integral of alpha div_x eps_theta d rho + D log(alpha_T / alpha_0),

where ``p_T`` is the standard normal prior and the last term converts densities of ``x_bar`` to
densities of ``x``. The divergence is exact (D backward passes) or Hutchinson's unbiased estimate
``z^T (d eps / d x) z`` with random ``z`` (Grathwohl et al. 2019), one backward pass per call.

``log p_0`` is a density of continuous images at the least noisy level of the schedule.
:func:`ode_bits_per_dim` turns it into an upper bound on the negative log-likelihood of 8-bit
images, comparable with :func:`~diffusion_lib.losses.elbo_bits_per_dim`, by uniform
dequantisation (Theis et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating
from diffusion_lib.schedules import NoiseSchedule
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.solvers import ode_timesteps
from diffusion_lib.validation import check_choice, check_finite, check_positive_int

DIVERGENCES = ("exact", "hutchinson")
PIXEL_BIN = 2 / 255  # the width of one 8-bit level in [-1, 1]


def divergence_exact(function: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``function(x)`` and its divergence sum_i d f_i / d x_i per sample: (B, ...) and (B,).

    One backward pass per dimension: for the tests and toy data, not for images.
    """
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        value = function(x)
        flat = value.flatten(1)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for i in range(flat.shape[1]):
            (gradient,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)
            total = total + gradient.flatten(1)[:, i]
    return value.detach(), total


def divergence_hutchinson(
    function: Callable[[Tensor], Tensor], x: Tensor, probe: Tensor
) -> tuple[Tensor, Tensor]:
    """``function(x)`` and Hutchinson's estimate ``z^T J z`` of its divergence, with ``z = probe``.

    Unbiased whenever E[z z^T] = I (Hutchinson 1989), as for Rademacher or standard normal
    ``z``; one vector-Jacobian product. Shapes: x and probe (B, ...), results (B, ...) and (B,).
    """
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        value = function(x)
        (vector_jacobian,) = torch.autograd.grad((value * probe).sum(), x)
    return value.detach(), (vector_jacobian * probe).flatten(1).sum(dim=1)


def _check_likelihood_arguments(
    schedule: NoiseSchedule, x0: Tensor, steps: int, divergence: str
) -> None:
    check_choice("divergence", divergence, DIVERGENCES)
    check_positive_int("steps", steps)
    check_finite("x0", x0)
    if steps < 2:
        raise ValueError(f"steps must be at least 2 (from t = 0 to t = T - 1), got {steps}")
    if schedule.zero_terminal_snr:
        raise ValueError(
            "the likelihood needs a prior N(0, I) at a finite log-SNR; this schedule ends at "
            "alpha_bar = 0, where x_bar = x / alpha is infinite"
        )


def _rademacher_probe(x0: Tensor, generator: torch.Generator | None) -> Tensor:
    """Independent signs +-1 shaped like ``x0``, drawn on the generator's device then moved."""
    source = generator.device if generator is not None else x0.device
    signs = torch.randint(0, 2, x0.shape, generator=generator, device=source)
    return (2 * signs - 1).to(device=x0.device, dtype=x0.dtype)


def ode_log_likelihood(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    steps: int = 100,
    spacing: str | None = None,
    divergence: str = "hutchinson",
    generator: torch.Generator | None = None,
) -> Tensor:
    """log p_0(x0) in nats per sample, (B,), by Heun's method on the probability-flow ODE.

    The ODE runs from t = 0 up to t = T - 1 on ``steps`` timesteps from
    :func:`~diffusion_lib.solvers.ode_timesteps`, carrying the state and the integral of the
    divergence together (Song et al. 2021, appendix D.2); each step costs two network calls,
    each with one backward pass for Hutchinson's estimate (``divergence="hutchinson"``, one
    Rademacher probe per sample kept for the whole solve, drawn with ``generator``) or D of them
    (``"exact"``).

    Args:
        model: a noise predictor ``eps_theta(x_t, t)`` with C output channels.
        schedule: its noise schedule; it must end at alpha_bar_T > 0 (the prior is N(0, I)).
        x0: (B, ...) points at which to evaluate the density at t = 0, on the model's device.
        steps: timesteps visited, at least 2 (at most 10 in smoke mode).
        spacing: as for :func:`~diffusion_lib.solvers.ode_timesteps`.
        divergence: ``"hutchinson"`` (unbiased, one backward pass) or ``"exact"``.
        generator: random generator of the probes (on the CPU or x0's device).
    """
    _check_likelihood_arguments(schedule, x0, steps, divergence)
    grid = ode_timesteps(schedule, cap_sampling_steps(steps), spacing).tolist()  # ascending
    alpha_bar = schedule.alphas_cumprod.cpu()[grid].tolist()
    alphas = [math.sqrt(a) for a in alpha_bar]
    rhos = [math.sqrt(1 - a) / math.sqrt(a) for a in alpha_bar]
    probe = _rademacher_probe(x0, generator) if divergence == "hutchinson" else None

    def slope(x_bar: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """d x_bar / d rho and alpha div_x eps at grid point k."""
        t = torch.full((x_bar.shape[0],), grid[k], device=x_bar.device, dtype=torch.long)

        def eps(x: Tensor) -> Tensor:
            out = model(x, t)
            if out.shape != x.shape:
                raise ValueError(
                    f"the model returned shape {tuple(out.shape)} for inputs {tuple(x.shape)}; "
                    "the likelihood needs a noise predictor with as many channels as the data"
                )
            return out

        x = alphas[k] * x_bar
        if probe is None:
            value, div = divergence_exact(eps, x)
        else:
            value, div = divergence_hutchinson(eps, x, probe)
        return value, alphas[k] * div

    # eval mode, restored afterwards; the divergences turn gradients back on where they need them
    with _evaluating(model):
        x_bar = x0.detach() / alphas[0]
        integral = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
        d_now, div_now = slope(x_bar, 0)
        for k in range(len(grid) - 1):
            step = rhos[k + 1] - rhos[k]
            d_next, div_next = slope(x_bar + step * d_now, k + 1)
            x_bar = x_bar + 0.5 * step * (d_now + d_next)
            integral = integral + 0.5 * step * (div_now + div_next)
            if k + 2 < len(grid):
                d_now, div_now = slope(x_bar, k + 1)
    x_T = alphas[-1] * x_bar
    dims = x0[0].numel()
    prior = -0.5 * (x_T.flatten(1).square().sum(dim=1) + dims * math.log(2 * math.pi))
    return prior + integral + dims * math.log(alphas[-1] / alphas[0])


def ode_bits_per_dim(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    images: Tensor,
    *,
    bin_width: float = PIXEL_BIN,
    generator: torch.Generator | None = None,
    **options: object,
) -> Tensor:
    """An upper bound on the negative log-likelihood of discrete images in bits/dim, (B,).

    Each pixel of ``images`` (8-bit values scaled to [-1, 1]) stands for a bin of width
    ``bin_width``; its probability is the integral of the model's density over the bin, and by
    Jensen's inequality, with u uniform over the bin, ::

        -log P(x) <= -E_u log p_0(x + u) - D log(bin_width).

    One draw of u per image (from ``generator``) gives an unbiased estimate of the right side, in
    bits per dimension. ``options`` go to :func:`ode_log_likelihood` (``generator`` too).
    """
    if not bin_width > 0:
        raise ValueError(f"bin_width must be > 0, got {bin_width}")
    check_finite("images", images)
    source = generator.device if generator is not None else images.device
    offsets = torch.rand(images.shape, generator=generator, device=source, dtype=images.dtype)
    dequantised = images + (offsets.to(images.device) - 0.5) * bin_width
    log_p = ode_log_likelihood(model, schedule, dequantised, generator=generator, **options)
    dims = images[0].numel()
    return (-log_p / dims - math.log(bin_width)) / math.log(2)
