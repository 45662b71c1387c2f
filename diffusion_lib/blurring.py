"""Blurring diffusion (Hoogeboom & Salimans 2023): the heat equation's blur and Gaussian noise at
once, which is a Gaussian diffusion in the basis of the discrete cosine transform (DCT) where
every frequency has its own schedule.

The heat equation ``dx/dtau = Laplacian(x)`` on an H x W image with reflecting borders keeps
each DCT basis image and shrinks it by ``exp(-lambda_ij tau)``, with
``lambda_ij = pi^2 (i^2 / H^2 + j^2 / W^2)`` (Rissanen et al. 2023, eq. 4); ``tau = s^2 / 2``
blurs like a Gaussian kernel of standard deviation s pixels. In the DCT coefficients
``u = DCT(x)`` the forward process is ::

    q(u_t | u_0) = N(alpha_t d_t * u_0, sigma_t^2 I),   d_t = (1 - d_min) exp(-lambda tau_t) + d_min

(Hoogeboom & Salimans 2023, eq. 8), with ``alpha_t, sigma_t`` a variance-preserving schedule and
``tau_t = s_t^2 / 2``, ``s_t = s_max sin^2(pi t / 2)`` the blur growing with t in [0, 1].
``s_max = 0`` leaves ``d_t = 1``, the plain Gaussian diffusion with the same noise levels.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_lib.flow_matching import _check_times, uniform_times_and_noise
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _randn, _start
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import (
    check_number,
    check_positive_int,
    check_range,
    check_same_shape,
)


def dct_matrix(size: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The orthonormal DCT-II matrix (size, size): ``C[k, i] = c_k cos(pi (2 i + 1) k / (2 n))``
    with ``c_0 = sqrt(1 / n)`` and ``c_k = sqrt(2 / n)``, so ``C @ C.T = I``."""
    size = check_positive_int("size", size)
    k = torch.arange(size, dtype=torch.float64)[:, None]
    i = torch.arange(size, dtype=torch.float64)[None, :]
    matrix = torch.cos(math.pi * (2 * i + 1) * k / (2 * size)) * math.sqrt(2 / size)
    matrix[0] /= math.sqrt(2)
    return matrix.to(dtype)


@functools.lru_cache(maxsize=16)
def _dct_on(size: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return dct_matrix(size, dtype).to(device)


def _check_floating(name: str, x: Tensor) -> None:
    """Refuse integer tensors, for which the DCT matrix would be rounded to zeros."""
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"{name} needs a floating-point tensor (..., H, W), got dtype {x.dtype}; "
            "convert it with .float()"
        )


def dct2(x: Tensor) -> Tensor:
    """The 2-d orthonormal DCT of the last two dimensions: (..., H, W) -> (..., H, W)."""
    _check_floating("dct2", x)
    rows, columns = (_dct_on(n, x.dtype, x.device) for n in x.shape[-2:])
    return rows @ x @ columns.T


def idct2(u: Tensor) -> Tensor:
    """The inverse of :func:`dct2`: (..., H, W) coefficients -> (..., H, W) image."""
    _check_floating("idct2", u)
    rows, columns = (_dct_on(n, u.dtype, u.device) for n in u.shape[-2:])
    return rows.T @ u @ columns


def heat_frequencies(height: int, width: int) -> Tensor:
    """``lambda_ij = pi^2 (i^2 / H^2 + j^2 / W^2)`` (H, W): the decay rate of each DCT basis image
    under the heat equation, 0 for the mean and largest for the finest checkerboard."""
    i = torch.arange(height, dtype=torch.float64)[:, None] / height
    j = torch.arange(width, dtype=torch.float64)[None, :] / width
    return (math.pi**2 * (i**2 + j**2)).float()


class BlurringDiffusion:
    """The forward process of blurring diffusion on (B, C, H, W) images, in continuous time.

    Args:
        image_size: H = W, the side of the images.
        blur_sigma_max: ``s_max``, the standard deviation in pixels of the Gaussian blur at
            t = 1 (20 in Hoogeboom & Salimans for 32 x 32 images); 0 gives plain Gaussian
            diffusion.
        min_scale: ``d_min``, the share of every frequency that no blur removes, so that the
            noise always has something to hide (0.001 in the paper).
        logsnr_range: ``(low, high)``: the noise schedule is the cosine one,
            ``log(alpha^2 / sigma^2) = -2 log tan(pi u / 2)``, with u stretched so that the
            log signal-to-noise ratio runs from ``high`` at t = 0 to ``low`` at t = 1.
        time_scale: the network is called with ``time_scale * t``, so the default 1000 gives
            it the input range of the discrete timesteps 0..999.

    Times ``t`` are (B,) floats in [0, 1].
    """

    def __init__(
        self,
        image_size: int = 28,
        blur_sigma_max: float = 20.0,
        min_scale: float = 0.001,
        logsnr_range: tuple[float, float] = (-10.0, 10.0),
        time_scale: float = 1000.0,
    ) -> None:
        self.image_size = check_positive_int("image_size", image_size)
        self.blur_sigma_max = check_number("blur_sigma_max", blur_sigma_max, 0.0, low_open=False)
        self.min_scale = check_number("min_scale", min_scale, 0.0, 1.0, low_open=False)
        low, high = logsnr_range
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(
                f"logsnr_range must be two finite numbers (low, high) with low < high, "
                f"got {logsnr_range!r}"
            )
        self.logsnr_range = (float(low), float(high))
        self.time_scale = check_number("time_scale", time_scale, 0.0, low_open=True)
        self.frequencies = heat_frequencies(image_size, image_size)

    def __repr__(self) -> str:
        return (
            f"BlurringDiffusion(image_size={self.image_size}, "
            f"blur_sigma_max={self.blur_sigma_max:g}, min_scale={self.min_scale:g})"
        )

    def to(self, device: torch.device | str) -> BlurringDiffusion:
        """Move the frequency table to ``device``; returns the process itself."""
        self.frequencies = self.frequencies.to(device)
        return self

    def model_time(self, t: Tensor) -> Tensor:
        """The network's time input, ``time_scale * t``: (B,) -> (B,) float32."""
        return t.to(torch.float32) * self.time_scale

    def logsnr(self, t: Tensor) -> Tensor:
        """``log(alpha_t^2 / sigma_t^2)`` (B,): the cosine schedule's, from ``high`` to ``low``."""
        low, high = self.logsnr_range
        u_first, u_last = (2 / math.pi * math.atan(math.exp(-value / 2)) for value in (high, low))
        u = u_first + t.double() * (u_last - u_first)
        return (-2 * torch.log(torch.tan(math.pi * u / 2))).to(torch.float32)

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_t`` and ``sigma_t`` (B,), with ``alpha^2 + sigma^2 = 1``."""
        logsnr = self.logsnr(t)
        return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()

    def blur_scale(self, t: Tensor) -> Tensor:
        """``d_t`` (B, H, W): how much of each DCT coefficient the blur keeps at time t, 1 at
        t = 0; all ones when ``blur_sigma_max`` is 0."""
        blur_sigma = self.blur_sigma_max * torch.sin(math.pi * t.float() / 2) ** 2
        tau = (blur_sigma**2 / 2)[:, None, None]
        decay = torch.exp(-self.frequencies.to(t.device) * tau)
        return (1 - self.min_scale) * decay + self.min_scale

    def signal_scale(self, t: Tensor) -> Tensor:
        """``alpha_t d_t`` (B, 1, H, W): the mean of ``u_t`` is this times ``u_0``."""
        alpha, _ = self.alpha_sigma(t)
        return (alpha[:, None, None] * self.blur_scale(t))[:, None]

    def blur(self, x0: Tensor, t: Tensor) -> Tensor:
        """The heat-dissipated image ``IDCT(d_t * DCT(x0))`` (B, C, H, W), without the noise."""
        return idct2(self.blur_scale(t)[:, None] * dct2(x0))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = IDCT(alpha_t d_t * DCT(x_0)) + sigma_t eps`` (B, C, H, W), eq. 8 in pixels.

        The DCT is orthonormal, so noise that is white in pixels is white in frequencies.
        ``t`` (B,) holds float times in [0, 1], not the integer timesteps of a NoiseSchedule."""
        check_same_shape("noise", noise, "x0", x0)
        if t.device.type == "cpu":  # reading the values of a GPU tensor would wait for it
            _check_times(t, x0.shape[0])
        _, sigma = self.alpha_sigma(t)
        return idct2(self.signal_scale(t) * dct2(x0)) + sigma[:, None, None, None] * noise

    def posterior_step(
        self,
        x_t: Tensor,
        t: Tensor,
        s: Tensor,
        eps: Tensor,
        clip_x0: tuple[float, float] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The mean (B, C, H, W) in pixels and the variance (B, 1, H, W) per DCT coefficient of
        ``q(u_s | u_t, u_0)`` with ``u_0`` given by the noise estimate ``eps``, for ``s < t``.

        Per coefficient, with ``alpha_ts = a_t / a_s`` (``a = alpha d``) and
        ``sigma_ts^2 = sigma_t^2 - alpha_ts^2 sigma_s^2``, the mean is
        ``alpha_ts sigma_s^2 / sigma_t^2 u_t + a_s sigma_ts^2 / sigma_t^2 u_0`` and the variance
        ``sigma_ts^2 sigma_s^2 / sigma_t^2`` (Hoogeboom & Salimans 2023, sec. 3.2).

        With ``clip_x0 = None`` (the default) the mean is written with the noise,
        ``(u_t - sigma_ts^2 / sigma_t eps_u) / alpha_ts``, which never divides by a vanishing
        ``a_t`` but does divide by ``alpha_ts``: where a step removes most of what the blur has
        left of a frequency, it magnifies the error of ``eps`` there (see :class:`FrequencySkip`).
        With ``(low, high)`` the estimate of ``x_0`` is clipped to that pixel range first, as
        DDPM's sampler does.
        """
        _, sigma_t = self.alpha_sigma(t)
        _, sigma_s = self.alpha_sigma(s)
        sigma_t, sigma_s = sigma_t[:, None, None, None], sigma_s[:, None, None, None]
        a_s = self.signal_scale(s)
        alpha_ts = self.signal_scale(t) / a_s
        variance_ts = (sigma_t**2 - alpha_ts**2 * sigma_s**2).clamp(min=0.0)
        variance = variance_ts * sigma_s**2 / sigma_t**2
        if clip_x0 is None:
            mean = (dct2(x_t) - variance_ts / sigma_t * dct2(eps)) / alpha_ts
            return idct2(mean), variance
        u0 = dct2(self.x0_estimate(x_t, t, eps).clamp(*check_range("clip_x0", clip_x0)))
        mean = alpha_ts * sigma_s**2 / sigma_t**2 * dct2(x_t) + a_s * variance_ts / sigma_t**2 * u0
        return idct2(mean), variance

    def x0_estimate(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``IDCT((DCT(x_t) - sigma_t DCT(eps)) / (alpha_t d_t))`` (B, C, H, W); exact only
        where ``alpha_t d_t`` is not tiny, so for the last step of a sampler and for plots."""
        _, sigma = self.alpha_sigma(t)
        residual = dct2(x_t - sigma[:, None, None, None] * eps)
        return idct2(residual / self.signal_scale(t))


class FrequencySkip(nn.Module):
    """A noise predictor that adds a network's output to the best linear estimate, frequency by
    frequency: ``eps_u = w * eps_lin + (1 - w) * DCT(F(x_t, t))`` in the DCT basis, with ::

        eps_lin = (u_t - a_t m) / sigma_t,   w = sigma_t^2 / (a_t^2 v + sigma_t^2),

    where ``m`` and ``v`` are the mean and variance of each DCT coefficient of the training
    images. ``w * eps_lin`` is ``E[eps_u | u_t]`` for Gaussian data with that mean and variance,
    exact where the signal-to-noise ratio ``a_t^2 v / sigma_t^2`` is small (``w`` near 1); where
    it is large the network decides. Blurring makes ``a_t`` of the fine frequencies tiny over
    much of the path, and the reverse step :meth:`BlurringDiffusion.posterior_step` then divides
    by a small ``alpha_ts``: the noise estimate of such a frequency must equal ``u_t / sigma_t``
    almost exactly, which this skip provides and a plain network only learns approximately
    (chapter 29). It plays the part of EDM's ``c_skip``, one per frequency.

    Args:
        network: F, called as ``network(x_t, time)`` with the process's time input.
        process: the :class:`BlurringDiffusion` it is trained and sampled on.
        images: (N, C, H, W) training images, for ``m`` and ``v`` (C, H, W).
    """

    def __init__(self, network: nn.Module, process: BlurringDiffusion, images: Tensor) -> None:
        super().__init__()
        if images.dim() != 4 or images.shape[-1] != process.image_size:
            raise ValueError(
                f"images must be (N, C, {process.image_size}, {process.image_size}) training "
                f"images for the process's image_size, got shape {tuple(images.shape)}"
            )
        coefficients = dct2(images.float())
        self.network, self.process = network, process
        self.register_buffer("mean", coefficients.mean(dim=0))
        self.register_buffer("variance", coefficients.var(dim=0))

    def forward(self, x_t: Tensor, time: Tensor) -> Tensor:
        t = time.float() / self.process.time_scale
        a = self.process.signal_scale(t)
        sigma = self.process.alpha_sigma(t)[1][:, None, None, None]
        total = a**2 * self.variance + sigma**2
        weight = sigma**2 / total
        linear = weight * (dct2(x_t) - a * self.mean) / sigma
        return idct2(linear + (1 - weight) * dct2(self.network(x_t, time).to(x_t.dtype)))


def blurring_loss(
    model: NoisePredictor,
    process: BlurringDiffusion,
    x0: Tensor,
    *,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    labels: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``mean || eps_theta(x_t, t) - eps ||^2`` with t ~ U(0, 1) and ``x_t`` from
    :meth:`BlurringDiffusion.q_sample`: the simplified loss in pixels, which is the same in
    frequencies since the DCT is orthonormal. A ``loss`` for :func:`~diffusion_lib.training.train`."""
    t, noise = uniform_times_and_noise(x0, t, noise, generator)
    x_t = process.q_sample(x0, t, noise)
    time = process.model_time(t)
    eps = model(x_t, time) if labels is None else model(x_t, time, labels)
    check_same_shape("the model's output", eps, "x0", x0)
    return F.mse_loss(eps.float(), noise.float())


def blurring_sample(
    model: NoisePredictor,
    process: BlurringDiffusion,
    shape: tuple[int, ...],
    *,
    steps: int = 250,
    x_1: Tensor | None = None,
    generator: torch.Generator | None = None,
    labels: Tensor | None = None,
    return_states: bool = False,
    clip_x0: tuple[float, float] | None = None,
    device: torch.device | str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Ancestral sampling from t = 1 to 0 in ``steps`` equal steps, each drawing ``u_s`` from
    :meth:`BlurringDiffusion.posterior_step` with the estimate of ``x_0`` clipped to
    ``clip_x0`` (``None``: not clipped); the last step returns that estimate.

    ``x_1`` (shape ``shape``) fixes the starting noise, which is white: at t = 1 the blur has
    left nearly nothing but the noise. In smoke mode the steps are capped. Returns the samples,
    or ``(samples, states)`` with ``states`` (steps + 1, B, C, H, W) on the CPU, ``x_1`` first
    and the samples last.
    """
    steps = cap_sampling_steps(check_positive_int("steps", steps))
    clip_x0 = None if clip_x0 is None else check_range("clip_x0", clip_x0)
    x = _start(model, shape, x_1, generator, device, name="x_1")
    process = process.to(x.device)
    times = torch.linspace(1.0, 0.0, steps + 1).tolist()
    states = [x.cpu()]
    with _evaluating(model):
        for t_value, s_value in zip(times[:-1], times[1:], strict=True):
            t = torch.full((x.shape[0],), t_value, device=x.device)
            s = torch.full((x.shape[0],), s_value, device=x.device)
            time = process.model_time(t)
            eps = model(x, time) if labels is None else model(x, time, labels)
            if s_value > 0:
                mean, variance = process.posterior_step(x, t, s, eps.to(x.dtype), clip_x0)
                fresh = dct2(_randn(tuple(x.shape), generator, x.device, x.dtype))
                x = mean + idct2(variance.sqrt() * fresh)
            else:
                x = process.x0_estimate(x, t, eps.to(x.dtype))
                x = x if clip_x0 is None else x.clamp(*clip_x0)
            if return_states:
                states.append(x.cpu())
    return (x, torch.stack(states)) if return_states else x
