"""Learned reverse-process variances (Nichol & Dhariwal 2021, "Improved DDPM", sec. 3.1).

Ho et al. fix the variance of p_theta(x_{t-1} | x_t) at beta_t or at the posterior variance
beta_tilde_t. Nichol & Dhariwal let the network choose, per pixel, a point between the two on a
log scale (eq. 15)::

    Sigma_theta(x_t, t) = exp(v log beta_t + (1 - v) log beta_tilde_t).

The network outputs 2C channels: the first C are the noise estimate eps_theta, the last C
hold ``v`` in a raw form, ``v_raw``, with ``v = (v_raw + 1) / 2``; a zero-initialised output
layer starts every pixel halfway between the bounds on the log scale. As in the paper, ``v``
is not constrained to [0, 1].

The ancestral sampler and the bound read such a network with ``variance="learned"``; the other
samplers, which use only the noise, read it through :class:`NoiseOnly`. Train it with
:func:`~diffusion_lib.losses.hybrid_loss`.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffusion_lib.schedules import NoiseSchedule, _gather


def split_eps_and_v(output: Tensor, channels: int) -> tuple[Tensor, Tensor]:
    """Split a learned-variance network's output (B, 2C, ...) into eps and v_raw, each (B, C, ...).

    Raises ``ValueError`` naming the expected channel count when ``output`` has another one.
    """
    if output.dim() < 2 or output.shape[1] != 2 * channels:
        raise ValueError(
            f"a learned variance needs a model with 2C = {2 * channels} output channels (the "
            f"noise, then the variance), e.g. FCUNet(out_channels={2 * channels}); the model "
            f"returned shape {tuple(output.shape)}"
        )
    eps, v_raw = output.split(channels, dim=1)
    return eps, v_raw


def variance_fraction(v_raw: Tensor) -> Tensor:
    """``v = (v_raw + 1) / 2``: 0 is beta_tilde_t, 1 is beta_t (Nichol & Dhariwal's code)."""
    return (v_raw + 1.0) / 2.0


def learned_log_variance(schedule: NoiseSchedule, t: Tensor, v_raw: Tensor) -> Tensor:
    """log Sigma_theta = v log beta_t + (1 - v) log beta_tilde_t (Nichol & Dhariwal 2021, eq. 15).

    ``t``: (B,) 0-based timesteps; ``v_raw``: (B, C, ...) the network's variance channels.
    Returns the log-variance, shaped like ``v_raw``, in its dtype. At t = 0, where beta_tilde
    is 0, the lower bound is clipped to beta_tilde at t = 1, as everywhere in the library.
    """
    fraction = variance_fraction(v_raw)
    log_small = _gather(schedule.posterior_log_variance_clipped, t, v_raw)
    log_large = _gather(schedule.betas.log(), t, v_raw)
    return fraction * log_large + (1.0 - fraction) * log_small


class NoiseOnly(nn.Module):
    """The noise channels of a learned-variance network, for samplers that need only eps.

    ``NoiseOnly(model)(x_t, t, *args)`` returns the first C channels of ``model(x_t, t, *args)``
    (B, 2C, ...), where C is ``x_t``'s channel count: what DDIM and the ODE solvers read. A
    conditional model's ``null_label`` is kept, for classifier-free guidance.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        if hasattr(model, "null_label"):
            self.null_label = model.null_label

    def forward(self, x_t: Tensor, t: Tensor, *args: Tensor) -> Tensor:
        eps, _ = split_eps_and_v(self.model(x_t, t, *args), x_t.shape[1])
        return eps
