"""Training objectives: the simplified noise-prediction loss and the terms of the variational bound.

Ho et al. 2020 write the negative ELBO as (eq. 5) ::

    L = L_T + sum_{t>1} L_{t-1} + L_0,
    L_T     = KL(q(x_T | x_0) || p(x_T))                 (prior term, no parameters)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (denoising terms)
    L_0     = -log p(x_0 | x_1)                           (discretised decoder)

and train with the much simpler L_simple = E ||eps - eps_theta(x_t, t)||^2 (eq. 14).
Nichol & Dhariwal (2021) add a small multiple of the bound to learn the variances as well
(L_hybrid, :func:`hybrid_loss`). The bound terms here are reported in bits per dimension, as
image models are compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lib.learned_variance import split_eps_and_v
from diffusion_lib.predictions import PREDICTIONS, _min_snr_weight, prediction_target
from diffusion_lib.reverse_process import p_mean_variance
from diffusion_lib.sampler_inputs import (
    NoisePredictor,
    _check_model_and_schedule,
    _check_network_dtype,
    _evaluating,
    _randn,
)
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import (
    check_choice,
    check_finite,
    check_floating,
    check_generator,
    check_noise,
    check_number,
    check_same_shape,
    check_timesteps,
)


def _noisy_batch(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor | None,
    noise: Tensor | None,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(t, noise, x_t)`` for a training batch ``x0`` (B, ...): a uniform random timestep and
    fresh noise per sample where not given, and x_t ~ q(x_t | x_0) (Ho et al. 2020, eq. 4).

    NaN or inf in ``x0`` is refused on the CPU only: on an accelerator, looking would make
    every training step wait for the device.
    """
    check_floating("x0", x0)
    check_generator(generator)
    if x0.device.type == "cpu":
        check_finite("x0", x0)
    if t is None:
        source = generator.device if generator is not None else x0.device
        t = torch.randint(0, schedule.timesteps, (x0.shape[0],), generator=generator, device=source)
        t = t.to(x0.device)
    else:
        check_timesteps(t, schedule.timesteps, x0.shape[0])
    if noise is None:
        noise = _randn(tuple(x0.shape), generator, x0.device, x0.dtype)
    else:
        check_noise(noise, x0)
    return t, noise, schedule._q_sample(x0, t, noise)


def _check_loss_inputs(
    model: NoisePredictor, schedule: NoiseSchedule, x0: Tensor, noise: Tensor | None
) -> None:
    """The checks of a loss before the batch is noised: the schedule's type, the model's T,
    and, for the library's networks, data and noise in the dtype of their weights (unless
    autocast casts them)."""
    _check_model_and_schedule(model, schedule)
    _check_network_dtype(model, "x0", x0)
    _check_network_dtype(model, "noise", noise)


def diffusion_loss(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    prediction: str = "epsilon",
    snr_gamma: float | None = None,
) -> Tensor:
    """Ho et al.'s simplified loss (2020, eq. 14, Algorithm 1): ``mean ||eps - eps_theta(x_t, t)||^2``.

    A uniform random timestep and fresh Gaussian noise are drawn per sample unless ``t`` (B,)
    or ``noise`` (like ``x0``) are given. ``x0``: (B, C, H, W) data. ``labels`` (B,) are passed
    to a conditional model as ``model(x_t, t, labels)``. Returns a scalar (float32) tensor.

    ``prediction`` (``"epsilon"``, ``"x0"`` or ``"v"``) names the network's target, see
    :func:`~diffusion_lib.predictions.prediction_target`; sample from such a network through
    :class:`~diffusion_lib.predictions.NoiseFromPrediction`. With ``snr_gamma`` each sample's
    error is weighed by :func:`~diffusion_lib.predictions.min_snr_weight` (Hang et al. 2023).
    To train with these, pass ``functools.partial(diffusion_loss, prediction="v")`` as ``loss``.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    if snr_gamma is not None:
        snr_gamma = check_number("snr_gamma", snr_gamma, 0.0, low_open=True)
    _check_loss_inputs(model, schedule, x0, noise)
    t, noise, x_t = _noisy_batch(schedule, x0, t, noise, generator)
    output = model(x_t, t) if labels is None else model(x_t, t, labels)
    check_same_shape("the model's output", output, "x0", x0)
    target = prediction_target(schedule, x0, t, noise, prediction)
    if snr_gamma is None:
        return F.mse_loss(output.float(), target.float())
    errors = (output.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    return (_min_snr_weight(schedule, t, prediction, snr_gamma).float() * errors).mean()


def normal_kl(mean1: Tensor, log_var1: Tensor, mean2: Tensor, log_var2: Tensor) -> Tensor:
    """KL(N(mean1, exp(log_var1)) || N(mean2, exp(log_var2))) elementwise, in nats.

    The closed form for two Gaussians: ``0.5 (log_var2 - log_var1 + (var1 + (mean1 - mean2)^2) / var2 - 1)``.
    All arguments broadcast together.
    """
    return 0.5 * (
        log_var2
        - log_var1
        + torch.exp(log_var1 - log_var2)
        + (mean1 - mean2) ** 2 * torch.exp(-log_var2)
        - 1.0
    )


def discretized_gaussian_log_likelihood(x: Tensor, *, mean: Tensor, log_scale: Tensor) -> Tensor:
    """Log-probability of 8-bit data under a Gaussian discretised to 256 bins (Ho et al. 2020, eq. 13).

    ``x``: data scaled to [-1, 1] (bin centres ``-1 + 2k/255``). Each value owns the interval
    of width 2/255 around it; the two edge bins extend to -inf and +inf. ``mean`` and
    ``log_scale`` (log standard deviation) broadcast against ``x``. Returns log-probabilities
    in nats, of ``x``'s shape.
    """
    centred = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centred + 1.0 / 255.0)
    lower = inv_std * (centred - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12)
    return torch.where(
        x < -0.999,
        log_cdf_upper,
        torch.where(x > 0.999, log_one_minus_cdf_lower, torch.log(bin_mass)),
    )


def _mean_bits(nats: Tensor) -> Tensor:
    """Average over every dimension but the batch and convert nats to bits: (B, ...) -> (B,)."""
    return nats.flatten(1).mean(dim=1) / math.log(2.0)


def prior_bits_per_dim(schedule: NoiseSchedule, x0: Tensor) -> Tensor:
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, shape (B,). Ho et al. 2020, eq. 5."""
    check_finite("x0", x0)
    last = torch.full((x0.shape[0],), schedule.timesteps - 1, device=x0.device, dtype=torch.long)
    mean = _gather(schedule.sqrt_alphas_cumprod, last, x0) * x0
    log_var = _gather(torch.log(1.0 - schedule.alphas_cumprod), last, x0)
    return _mean_bits(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean)))


def vb_term_bits_per_dim(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    x_t: Tensor,
    t: Tensor,
    *,
    variance: str = "small",
) -> Tensor:
    """One term of the bound per sample, in bits per dimension, shape (B,).

    For t >= 1 (0-based) this is L_{t} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t))
    (Ho et al. 2020, eq. 5); for t = 0 it is the decoder term L_0 = -log p_theta(x_0 | x_1)
    (eq. 13). ``x0``, ``x_t``: (B, C, H, W) with ``x0`` in [-1, 1]; ``t``: (B,).
    """
    check_same_shape("x_t", x_t, "x0", x0)
    check_timesteps(t, schedule.timesteps, x0.shape[0])
    true_mean, _, true_log_var = schedule._q_posterior(x0, x_t, t)
    mean, _, log_var, _ = p_mean_variance(model, schedule, x_t, t, variance=variance, clip_x0=None)
    kl = _mean_bits(normal_kl(true_mean, true_log_var, mean, log_var))
    decoder_nll = -_mean_bits(
        discretized_gaussian_log_likelihood(x0, mean=mean, log_scale=0.5 * log_var)
    )
    return torch.where(t == 0, decoder_nll, kl)


@dataclass
class BoundTerms:
    """The variational bound of a batch, every entry in bits per dimension.

    Attributes:
        prior: (B,) L_T.
        terms: (B, T) ``terms[:, t]`` is the term of 0-based step t: L_0 (decoder) at 0,
            the denoising KLs after it.
        total: (B,) prior + all terms: the negative ELBO, an upper bound on -log p(x_0).
    """

    prior: Tensor
    terms: Tensor

    @property
    def total(self) -> Tensor:
        return self.prior + self.terms.sum(dim=1)


@torch.no_grad()
def elbo_bits_per_dim(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    variance: str = "small",
    generator: torch.Generator | None = None,
) -> BoundTerms:
    """Every term of the negative ELBO for a batch, with one fresh x_t per step.

    Runs the model once per timestep (T calls on the batch). ``x0``: (B, C, H, W) 8-bit data
    scaled to [-1, 1]. Returns :class:`BoundTerms`; ``.total.mean()`` is the bound in bits/dim.
    """
    check_finite("x0", x0)
    schedule = schedule.to(x0.device)
    terms = []
    source = generator.device if generator is not None else x0.device
    with _evaluating(model):
        for step in range(schedule.timesteps):
            t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
            noise = torch.randn(x0.shape, generator=generator, device=source, dtype=x0.dtype)
            x_t = schedule._q_sample(x0, t, noise.to(x0.device))
            terms.append(vb_term_bits_per_dim(model, schedule, x0, x_t, t, variance=variance))
    return BoundTerms(prior=prior_bits_per_dim(schedule, x0), terms=torch.stack(terms, dim=1))


def hybrid_loss(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
    vlb_weight: float = 0.001,
) -> Tensor:
    """L_hybrid = L_simple + lambda L_vlb (Nichol & Dhariwal 2021, eq. 16) for a network with
    2C output channels: the noise and the variance of eq. 15 (:mod:`~diffusion_lib.learned_variance`).

    L_vlb is estimated from each sample's timestep as T times its bound term in bits per
    dimension, T L_t, and the mean is held fixed inside it (stop-gradient), so the bound
    trains only the variance and L_simple alone trains the mean (sec. 3.1). ``vlb_weight`` is
    lambda (0.001 in the paper). ``x0``: (B, C, H, W) in [-1, 1]; ``t`` (B,) and ``noise`` as
    in :func:`diffusion_loss`. Returns a scalar (float32) tensor. Pass it to
    :func:`~diffusion_lib.training.train` as ``loss=hybrid_loss``.
    """
    vlb_weight = check_number("vlb_weight", vlb_weight, 0.0, low_open=False)
    _check_loss_inputs(model, schedule, x0, noise)
    t, noise, x_t = _noisy_batch(schedule, x0, t, noise, generator)
    output = model(x_t, t) if labels is None else model(x_t, t, labels)
    eps, v_raw = split_eps_and_v(output, x0.shape[1])
    simple = F.mse_loss(eps.float(), noise.float())
    frozen_mean = torch.cat([eps.detach(), v_raw], dim=1)
    bound_term = vb_term_bits_per_dim(
        lambda *_: frozen_mean, schedule, x0.float(), x_t.float(), t, variance="learned"
    )
    return simple + vlb_weight * schedule.timesteps * bound_term.mean()
