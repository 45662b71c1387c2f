"""Noise schedules and the closed forms of the forward process.

Timesteps are 0-based everywhere: ``t = 0`` is the first noising step (the paper's
``t = 1``) and ``t = T - 1`` the last (the paper's ``t = T``). ``betas[t]`` is therefore the
paper's ``beta_{t+1}``, and ``q_sample(x0, t)`` returns the paper's ``x_{t+1}``.

Every table is computed in float64 and cast to the dtype of the tensor it is applied to.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from diffusion_lib.validation import (
    check_finite,
    check_floating,
    check_generator,
    check_noise,
    check_number,
    check_same_shape,
    check_timesteps,
    is_integer,
)


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas spaced linearly from ``beta_start`` to ``beta_end`` (Ho et al. 2020, sec. 4).

    Returns a float64 tensor of shape (T,).
    """
    _check_beta_range(beta_start, beta_end)
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def quadratic_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Betas whose square roots are spaced linearly, then squared.

    Returns a float64 tensor of shape (T,).
    """
    _check_beta_range(beta_start, beta_end)
    roots = torch.linspace(
        math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=torch.float64
    )
    return roots**2


def _check_beta_range(beta_start: float, beta_end: float) -> None:
    """Refuse betas outside (0, 1] and a range that runs backwards: noise is added ever faster
    along the chain, so beta_start <= beta_end (the two are equal for a constant schedule)."""
    check_number("beta_start", beta_start, 0.0, 1.0, low_open=True, high_open=False)
    check_number("beta_end", beta_end, 0.0, 1.0, low_open=True, high_open=False)
    if beta_start > beta_end:
        raise ValueError(
            f"beta_start must not exceed beta_end (the betas grow along the chain, e.g. 1e-4 "
            f"to 0.02); got beta_start={beta_start!r}, beta_end={beta_end!r}"
        )


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Betas of the cosine schedule (Nichol & Dhariwal 2021, eq. 17).

    ``alpha_bar(u) = cos^2(((u + s) / (1 + s)) * pi / 2)`` for ``u = t / T``, and
    ``beta_t = 1 - alpha_bar(t / T) / alpha_bar((t - 1) / T)``, clipped at ``max_beta`` so
    that the last steps stay well defined. ``max_beta`` lies in (0, 1]. Returns a float64
    tensor of shape (T,).
    """
    check_number("max_beta", max_beta, 0.0, 1.0, low_open=True, high_open=False)
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def _betas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` with ``alpha_bar_0 = 1``, shape (T,)."""
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1.0 - alphas_cumprod / previous


def _checked_betas(betas: Tensor) -> Tensor:
    """``betas`` as float64 (T,), each in (0, 1) except the last, which may be 1 (zero
    terminal SNR); anything else is refused with a message saying what was wrong."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    if betas.dim() != 1 or betas.numel() < 1:
        raise ValueError(
            f"betas must be a 1-D tensor with at least one entry, got shape {tuple(betas.shape)}"
        )
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas[:-1] >= 1).any():
        raise ValueError(
            f"every beta must lie in the open interval (0, 1), the last one in (0, 1]; got "
            f"min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )
    if betas[-1] > 1:
        raise ValueError(
            f"the last beta may be 1 (zero terminal SNR) but not more, got {betas[-1].item():.3g}"
        )
    return betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Betas whose last step destroys the signal completely: ``alpha_bar_T = 0``, SNR(T) = 0.

    Lin et al. 2024, Algorithm 1: the square roots ``sqrt(alpha_bar_t)`` are shifted so that
    the last one is 0 and scaled so that the first one keeps its value,
    ``sqrt(alpha_bar'_t) = (sqrt(alpha_bar_t) - sqrt(alpha_bar_T)) * sqrt(alpha_bar_1) /
    (sqrt(alpha_bar_1) - sqrt(alpha_bar_T))``; the betas follow from the ratios of neighbours,
    and the last one is exactly 1. ``betas``: (T,) with T >= 2. Returns float64 (T,).

    With SNR(T) = 0 a noise prediction at t = T says nothing about x_0, so train the model to
    predict ``"v"`` or ``"x0"`` (:mod:`diffusion_lib.predictions`).
    """
    betas = _checked_betas(betas)
    if betas.numel() < 2:
        raise ValueError("rescaling to zero terminal SNR needs at least 2 timesteps")
    roots = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = roots[0], roots[-1]
    rescaled = (roots - last) * first / (first - last)
    rescaled[-1] = 0.0  # exactly, not up to rounding
    return _betas_from_alphas_cumprod(rescaled**2)


def shift_snr(betas: Tensor, scale: float) -> Tensor:
    """Betas with the signal-to-noise ratio of every step divided by ``scale**2``.

    ``SNR'(t) = SNR(t) / scale^2``, i.e. log-SNR shifted down by ``2 log(scale)``: the schedule
    Hoogeboom et al. (2023, sec. 3.1) recommend for images ``scale`` times wider than the one a
    schedule was tuned for, where averaging ``scale x scale`` blocks of pixels would otherwise
    leave the coarse image ``scale^2`` times less noisy. ``alpha_bar'_t = SNR' / (1 + SNR')``.
    ``betas``: (T,); ``scale > 0`` (above 1 adds noise). Returns float64 (T,).
    """
    betas = _checked_betas(betas)
    scale = check_number("scale", scale, 0.0, low_open=True)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    log_snr = torch.log(alphas_cumprod) - torch.log1p(-alphas_cumprod) - 2 * math.log(scale)
    return _betas_from_alphas_cumprod(torch.sigmoid(log_snr))


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "linear": linear_betas,
    "quadratic": quadratic_betas,
    "cosine": cosine_betas,
}


def _gather(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``table[t]`` reshaped to broadcast against ``like`` (B, ...), in ``like``'s dtype."""
    values = table.to(like.device)[t.to(like.device)]
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """A variance schedule ``beta_1..beta_T`` and the quantities derived from it.

    Attributes (float64 tensors of shape (T,)):
        betas: ``beta_t``, the variance added at step t.
        alphas: ``alpha_t = 1 - beta_t``.
        alphas_cumprod: ``alpha_bar_t = prod_{s<=t} alpha_s`` (Ho et al. 2020, eq. 4).
        alphas_cumprod_prev: ``alpha_bar_{t-1}``, with ``alpha_bar_0 = 1``.
        posterior_variance: ``beta_tilde_t`` of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7).

    The model is never stored here: functions that need one take it as an argument.
    """

    def __init__(self, betas: Tensor) -> None:
        betas = _checked_betas(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        # A Python bool, so that samplers can check it without waiting on a device.
        self.zero_terminal_snr = bool(betas[-1] == 1)
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.posterior_variance = (
            betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        )
        # beta_tilde at t = 0 is exactly 0; its log is clipped to the next value, as in
        # Ho et al.'s code, so that log-variances stay finite.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
            if len(betas) > 1
            else betas.clone()
        )
        self.posterior_mean_coef1 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        )
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_name(
        cls,
        name: str,
        timesteps: int = 1000,
        *,
        snr_scale: float = 1.0,
        zero_terminal_snr: bool = False,
        **kwargs: float,
    ) -> NoiseSchedule:
        """Build a named schedule: ``"linear"``, ``"quadratic"`` or ``"cosine"``.

        ``kwargs`` go to the schedule's function (``beta_start``/``beta_end`` for linear and
        quadratic, ``s``/``max_beta`` for cosine; Stable Diffusion's "scaled linear" schedule
        is ``"quadratic"`` with ``beta_start=0.00085, beta_end=0.012``). Then, in this order,
        ``snr_scale`` divides every SNR by its square (:func:`shift_snr`) and
        ``zero_terminal_snr`` rescales the last step to pure noise
        (:func:`rescale_zero_terminal_snr`).
        """
        if name not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {name!r}; choose one of {', '.join(sorted(SCHEDULES))}"
            )
        if not is_integer(timesteps) or timesteps < 1:
            raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
        timesteps = int(timesteps)
        if not isinstance(zero_terminal_snr, bool):
            raise ValueError(f"zero_terminal_snr must be True or False, got {zero_terminal_snr!r}")
        try:
            betas = SCHEDULES[name](timesteps, **kwargs)
        except TypeError as error:
            raise ValueError(f"bad keyword arguments for the {name!r} schedule: {error}") from None
        snr_scale = check_number("snr_scale", snr_scale, 0.0, low_open=True)
        if snr_scale != 1.0:
            betas = shift_snr(betas, snr_scale)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)

    @property
    def timesteps(self) -> int:
        """T, the number of diffusion steps."""
        return self.betas.shape[0]

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def signal_to_noise_ratio(self) -> Tensor:
        """``SNR(t) = alpha_bar_t / (1 - alpha_bar_t)`` (Kingma et al. 2021, eq. 2), shape (T,)."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    def to(self, device: torch.device | str) -> NoiseSchedule:
        """The schedule with its tables on ``device``: ``self`` if they are there already, else a
        copy (float32 on MPS, which lacks float64)."""
        device = torch.device(device)
        if device == self.device:
            return self
        dtype = torch.float32 if device.type == "mps" else torch.float64
        moved = object.__new__(NoiseSchedule)
        for key, value in vars(self).items():
            if isinstance(value, Tensor):
                value = value.to(device=device, dtype=dtype)
            setattr(moved, key, value)
        return moved

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(T={self.timesteps}, beta_1={self.betas[0].item():.3g}, "
            f"beta_T={self.betas[-1].item():.3g}, alpha_bar_T={self.alphas_cumprod[-1].item():.3g})"
        )

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I).

        Ho et al. 2020, eq. 4. ``x0``: (B, ...), ``t``: (B,) int64. Returns two tensors,
        the mean of ``x0``'s shape and the variance broadcastable to it.
        """
        check_floating("x0", x0)
        check_finite("x0", x0)
        check_timesteps(t, self.timesteps, x0.shape[0])
        mean = _gather(self.sqrt_alphas_cumprod, t, x0) * x0
        variance = _gather(1.0 - self.alphas_cumprod, t, x0)
        return mean, variance

    def q_sample(
        self,
        x0: Tensor,
        t: Tensor,
        noise: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) in one step: ``sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``.

        Ho et al. 2020, eq. 4 (reparameterised as in eq. 9). ``x0``: (B, ...), ``t``: (B,) int64
        in 0..T-1, ``noise``: like ``x0`` (drawn from N(0, I) when omitted). Returns x_t, like ``x0``.
        """
        check_floating("x0", x0)
        check_finite("x0", x0)
        check_timesteps(t, self.timesteps, x0.shape[0])
        if noise is None:
            check_generator(generator)
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        else:
            check_noise(noise, x0)
            check_finite("noise", noise)
        return self._q_sample(x0, t, noise)

    def _q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """:meth:`q_sample` without input checks, for the training loop's hot path."""
        return (
            _gather(self.sqrt_alphas_cumprod, t, x0) * x0
            + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        )

    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_{t-1} | x_t, x_0).

        Ho et al. 2020, eqs. 6-7: mean ``= coef1 * x0 + coef2 * x_t`` with
        ``coef1 = sqrt(alpha_bar_{t-1}) beta_t / (1 - alpha_bar_t)`` and
        ``coef2 = sqrt(alpha_t) (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t)``; variance
        ``beta_tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) beta_t``.
        ``x0``, ``x_t``: (B, ...), ``t``: (B,). The mean has ``x0``'s shape; variance and
        log-variance (clipped at t = 0, where the variance is 0) broadcast against it.
        """
        check_same_shape("x_t", x_t, "x0", x0)
        check_finite("x0", x0)
        check_finite("x_t", x_t)
        check_timesteps(t, self.timesteps, x0.shape[0])
        return self._q_posterior(x0, x_t, t)

    def _q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t) * x0
            + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = _gather(self.posterior_variance, t, x_t)
        log_variance = _gather(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """Invert eq. 4 for x_0 given the noise: ``(x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)``.

        Ho et al. 2020, eq. 4 solved for x_0 (used in eq. 11). ``x_t``, ``eps``: (B, ...),
        ``t``: (B,). Returns the estimate of x_0, like ``x_t``.
        """
        check_same_shape("eps", eps, "x_t", x_t)
        check_finite("x_t", x_t)
        check_finite("eps", eps)
        check_timesteps(t, self.timesteps, x_t.shape[0])
        return self._predict_x0(x_t, t, eps)

    def _predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        return (x_t - _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _gather(
            self.sqrt_alphas_cumprod, t, x_t
        )

    def predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        """The noise that takes ``x0`` to ``x_t`` at step t (eq. 4 solved for eps).

        ``x_t``, ``x0``: (B, ...), ``t``: (B,). Returns eps, like ``x_t``.
        """
        check_same_shape("x0", x0, "x_t", x_t)
        check_timesteps(t, self.timesteps, x_t.shape[0])
        return self._predict_eps(x_t, t, x0)

    def _predict_eps(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (x_t - _gather(self.sqrt_alphas_cumprod, t, x_t) * x0) / _gather(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        )

    # ------------------------------------------------------------------ other parameterisations
    def score_from_eps(self, t: Tensor, eps: Tensor) -> Tensor:
        """The score of the noised data, ``grad log q(x_t) = -eps / sqrt(1 - alpha_bar_t)``.

        Exact for the optimal noise predictor ``eps = E[eps | x_t]``: Tweedie's formula (Efron
        2011) applied to Ho et al.'s eq. 4 gives ``grad log q(x_t) = -E[eps | x_t] / sqrt(1 -
        alpha_bar_t)``. ``eps``: (B, ...), ``t``: (B,). Returns the score, like ``eps``.
        """
        check_timesteps(t, self.timesteps, eps.shape[0])
        return -eps / _gather(self.sqrt_one_minus_alphas_cumprod, t, eps)

    def eps_from_score(self, t: Tensor, score: Tensor) -> Tensor:
        """Inverse of :meth:`score_from_eps`: ``eps = -sqrt(1 - alpha_bar_t) score``."""
        check_timesteps(t, self.timesteps, score.shape[0])
        return -_gather(self.sqrt_one_minus_alphas_cumprod, t, score) * score

    def velocity(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """The v-prediction target ``v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0``.

        Salimans & Ho 2022, sec. 4: with ``alpha = sqrt(alpha_bar_t)`` and
        ``sigma = sqrt(1 - alpha_bar_t)`` (so alpha^2 + sigma^2 = 1), ``x_t = alpha x0 + sigma
        eps`` and ``v`` is the rate of change of x_t along the circle they trace. ``x0``,
        ``eps``: (B, ...), ``t``: (B,). Returns v, like ``x0``.
        """
        check_same_shape("eps", eps, "x0", x0)
        check_timesteps(t, self.timesteps, x0.shape[0])
        return self._velocity(x0, t, eps)

    def _velocity(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        alpha = _gather(self.sqrt_alphas_cumprod, t, x0)
        sigma = _gather(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return alpha * eps - sigma * x0

    def x0_and_eps_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Both estimates from a v-prediction: ``x0 = alpha x_t - sigma v``, ``eps = sigma x_t +
        alpha v`` (Salimans & Ho 2022, sec. 4; alpha and sigma as in :meth:`velocity`).

        ``x_t``, ``v``: (B, ...), ``t``: (B,). Returns ``(x0, eps)``, each like ``x_t``.
        """
        check_same_shape("v", v, "x_t", x_t)
        check_timesteps(t, self.timesteps, x_t.shape[0])
        return self._x0_and_eps_from_velocity(x_t, t, v)

    def _x0_and_eps_from_velocity(self, x_t: Tensor, t: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        alpha = _gather(self.sqrt_alphas_cumprod, t, x_t)
        sigma = _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return alpha * x_t - sigma * v, sigma * x_t + alpha * v
