"""Inverse problems with a diffusion prior: measurement operators, DPS and PiGDM.

An image x_0 is seen only through a linear measurement ``y = A x_0 + sigma_y n`` with
n ~ N(0, I): a few kept pixels, a low-resolution copy. An unconditional model of p(x_0) can
draw from the posterior p(x_0 | y) without retraining, because the score of the noised
posterior splits in two (Bayes' rule, differentiated in x_t)::

    grad log p(x_t | y) = grad log p(x_t) + grad log p(y | x_t).

The model gives the first term. The second needs ``p(y | x_t) = int p(y | x_0) p(x_0 | x_t) dx_0``,
which no one can compute; both methods here replace p(x_0 | x_t) by something centred on the
model's estimate x0_hat(x_t) and differentiate through the network:

* DPS (Chung et al. 2023) puts all of p(x_0 | x_t) on x0_hat, so p(y | x_t) ~ N(y; A x0_hat,
  sigma_y^2 I), and takes a step of fixed length down the gradient of ``||y - A x0_hat||``.
* PiGDM (Song et al. 2023) uses the Gaussian N(x0_hat, r_t^2 I), with r_t^2 the posterior
  variance of x_0 given x_t for data of variance ``data_std^2``, which gives
  ``p(y | x_t) ~ N(y; A x0_hat, sigma_y^2 I + r_t^2 A A^T)``. For Gaussian data with the exact
  denoiser this is the true likelihood, and the sampler draws from the true posterior.

Operators act on batches ``x`` of shape (B, ...) and are called like functions, ``A(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from diffusion_lib.respacing import _respaced_chain
from diffusion_lib.reverse_process import _clip, _draw_step, _estimates_of_noise_and_x0
from diffusion_lib.sampler_inputs import NoisePredictor, _evaluating, _randn, _start
from diffusion_lib.sampling import _ddim_update
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.smoke import cap_sampling_steps
from diffusion_lib.validation import check_finite, check_number, check_positive_int


class LinearMeasurement:
    """A linear operator ``A``, called on a batch of images: ``A(x)``.

    Subclasses define ``__call__`` (``x`` (B, ...) -> ``A x``), which is all that
    :func:`dps_sample` needs. :func:`pigdm_sample` also needs :meth:`gram_diagonal`, which
    exists when the Gram matrix ``A A^T`` is diagonal: that is what makes PiGDM's covariance
    ``sigma_y^2 I + r_t^2 A A^T`` cheap to invert. :meth:`pseudo_inverse` is a reference
    answer to compare restorations with.
    """

    def __call__(self, x: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must define __call__(x) -> A x")

    def gram_diagonal(self, y: Tensor) -> Tensor:
        """The diagonal of ``A A^T``, broadcastable against a measurement ``y``."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no gram_diagonal: pigdm_sample needs A A^T to be "
            "diagonal and known; dps_sample works with any differentiable A"
        )

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        """``A^+ y = A^T (A A^T)^-1 y``: the smallest image whose measurement is ``y``."""
        raise NotImplementedError(f"{type(self).__name__} defines no pseudo_inverse")

    def measure(
        self, x: Tensor, noise_std: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """A measurement ``y = A x + noise_std n`` of images ``x`` (B, ...), n ~ N(0, I)."""
        noise_std = check_number("noise_std", noise_std, 0.0, low_open=False)
        clean = self(x)
        if noise_std == 0.0:
            return clean
        return clean + noise_std * _randn(tuple(clean.shape), generator, clean.device, clean.dtype)


class Inpainting(LinearMeasurement):
    """``A x = m * x``: the pixels where the mask ``m`` is 1 are seen, the others are not.

    ``mask``: 0/1 or boolean, any shape that broadcasts against the images, such as
    (1, 1, H, W) for one mask for the whole batch. ``A A^T = diag(m)`` and ``A^+ = A``:
    the pseudo-inverse fills the unseen pixels with 0.
    """

    def __init__(self, mask: Tensor) -> None:
        if not isinstance(mask, Tensor) or mask.dim() < 1:
            raise ValueError(f"mask must be a tensor of 0s and 1s, got {type(mask).__name__}")
        mask = mask.to(torch.float32) if mask.dtype == torch.bool else mask
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only 0 (unseen) and 1 (seen), or booleans")
        self.mask = mask

    def _mask_like(self, x: Tensor) -> Tensor:
        try:
            torch.broadcast_shapes(self.mask.shape, x.shape)
        except RuntimeError:
            raise ValueError(
                f"the mask of shape {tuple(self.mask.shape)} does not broadcast against "
                f"images of shape {tuple(x.shape)}"
            ) from None
        return self.mask.to(device=x.device, dtype=x.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        return self._mask_like(x) * x

    def gram_diagonal(self, y: Tensor) -> Tensor:
        return self._mask_like(y)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        return self(y)


class Downsampling(LinearMeasurement):
    """``A x``: the mean of each ``factor x factor`` block, a low-resolution copy of ``x``.

    ``x``: (B, C, H, W) with H and W divisible by ``factor``; ``A x``: (B, C, H/f, W/f). Each
    row of A holds f^2 entries 1/f^2 in its own block, so ``A A^T = I / f^2`` and
    ``A^+ = f^2 A^T`` repeats each low-resolution pixel over its block (nearest upsampling).
    """

    def __init__(self, factor: int) -> None:
        self.factor = check_positive_int("factor", factor)

    def __call__(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(
                f"Downsampling by {self.factor} needs images (B, C, H, W) with H and W "
                f"divisible by {self.factor}, got shape {tuple(x.shape)}"
            )
        return F.avg_pool2d(x, self.factor)

    def gram_diagonal(self, y: Tensor) -> Tensor:
        return torch.full((), 1.0 / self.factor**2, dtype=y.dtype, device=y.device)

    def pseudo_inverse(self, y: Tensor) -> Tensor:
        return F.interpolate(y, scale_factor=self.factor, mode="nearest")


def _check_problem(operator: LinearMeasurement, y: Tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(operator, LinearMeasurement):
        raise ValueError(
            "operator must be a LinearMeasurement such as Inpainting(mask) or Downsampling(4), "
            f"got {type(operator).__name__}"
        )
    check_finite("y", y)
    expected = tuple(operator(torch.zeros(shape, dtype=y.dtype, device=y.device)).shape)
    if tuple(y.shape) != expected:
        raise ValueError(
            f"y must be the measurement of images of shape {tuple(shape)}, which has shape "
            f"{expected}; got {tuple(y.shape)}"
        )


def _x0_and_gradient(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    objective: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """x0_hat(x_t), ``grad_{x_t} objective(x0_hat(x_t))`` through the network, and the
    objective's values.

    ``objective`` returns one number per sample, shape (B,). The samples do not interact, so
    the gradient of their sum holds each sample's own gradient. Returns the detached x0_hat
    and gradient (both ``x``'s shape) and the values (B,).
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        x0 = _estimates_of_noise_and_x0(model, schedule, x, t, {})[1]
        values = objective(x0)
        (gradient,) = torch.autograd.grad(values.sum(), x)
    return x0.detach(), gradient, values.detach()


def _step_from(
    schedule: NoiseSchedule,
    x: Tensor,
    t: Tensor,
    x0: Tensor,
    index: int,
    generator: torch.Generator | None,
    clip_x0: tuple[float, float] | None,
    eta: float | None = None,
) -> Tensor:
    """One reverse step from a given estimate of x_0.

    ``eta = None``: a draw from q(x_{t-1} | x_t, x0) with variance beta_tilde_t, and its mean
    at t = 0, a step of Ho et al. (2020, Algorithm 2). Otherwise a DDIM step (Song et al.
    2021, eq. 12) with the noise that x0 implies, ``(x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t)``;
    ``eta = 1`` is then a draw from the same q(x_{t-1} | x_t, x0).
    """
    x0 = _clip(x0, clip_x0)
    if eta is None:
        mean, _, log_variance = schedule._q_posterior(x0, x, t)
        return _draw_step(mean, log_variance, index, generator)
    alpha_bar = _gather(schedule.alphas_cumprod, t, x)
    alpha_bar_prev = (
        _gather(schedule.alphas_cumprod, t - 1, x) if index > 0 else torch.ones_like(alpha_bar)
    )
    eps = (x - alpha_bar.sqrt() * x0) / (1 - alpha_bar).sqrt()
    return _ddim_update(x0, eps, alpha_bar, alpha_bar_prev, eta, index == 0, generator)


Step = Callable[[NoisePredictor, NoiseSchedule, Tensor, Tensor, int], Tensor]


def _posterior_chain(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    operator: LinearMeasurement,
    y: Tensor,
    shape: tuple[int, ...],
    steps: int | None,
    x_T: Tensor | None,
    generator: torch.Generator | None,
    step: Step,
) -> Tensor:
    """Run ``x <- step(model, schedule, x, t, index)`` down a (respaced) chain from x_T."""
    _check_problem(operator, y, tuple(shape))
    steps = check_positive_int(
        "steps", schedule.timesteps if steps is None else steps, maximum=schedule.timesteps
    )
    steps = cap_sampling_steps(steps)
    x = _start(model, tuple(shape), x_T, generator, y.device)
    sampling_schedule, _, wrapped = _respaced_chain(model, schedule, steps, x.device)
    with _evaluating(model):
        for index in reversed(range(steps)):
            t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
            x = step(wrapped, sampling_schedule, x, t, index)
    return x


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def dps_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    operator: LinearMeasurement,
    y: Tensor,
    shape: tuple[int, ...],
    *,
    step_size: float = 1.0,
    steps: int | None = None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
) -> Tensor:
    """Diffusion posterior sampling (Chung et al. 2023, Algorithm 1, Gaussian noise).

    Each ancestral step is followed by a step down the gradient of the measurement error of
    the model's estimate of x_0, taken per sample::

        x'_{t-1} ~ q(x_{t-1} | x_t, x0_hat(x_t))                    (Ho et al. 2020, Alg. 2)
        x_{t-1}  = x'_{t-1} - zeta_t grad_{x_t} ||y - A x0_hat(x_t)||^2,
        zeta_t   = step_size / ||y - A x0_hat(x_t)||.

    Dividing by the error's norm makes every correction ``2 step_size`` times the gradient of
    ``||y - A x0_hat||``, whatever the noise level: a fixed step, tuned by hand for each task
    and dataset, that needs tuning again when ``steps`` changes. The noise level sigma_y of
    ``y`` is not used.

    Args:
        model: noise predictor ``model(x_t, t)`` trained with ``schedule`` (or a
            :class:`~diffusion_lib.predictions.NoiseFromPrediction`).
        operator: the measurement A, such as :class:`Inpainting` or :class:`Downsampling`.
        y: the measurement, of the shape ``operator`` gives images of ``shape``.
        shape: (B, C, H, W) of the images to draw (or (B, D) for points).
        step_size: the numerator of zeta_t above (Chung et al.'s zeta'), >= 0; 0 is plain
            ancestral sampling.
        steps: respace the chain to this many steps (``None``: all T).
        x_T, generator, clip_x0: as for :func:`~diffusion_lib.sampling.ddpm_sample`; the
            clipped estimate enters the ancestral step, the unclipped one the gradient.

    Returns the samples, of ``shape``.
    """
    step_size = check_number("step_size", step_size, 0.0, low_open=False)

    def squared_error(x0: Tensor) -> Tensor:
        return (y - operator(x0)).flatten(1).pow(2).sum(1)

    def step(
        model: NoisePredictor, schedule: NoiseSchedule, x: Tensor, t: Tensor, index: int
    ) -> Tensor:
        x0, gradient, error = _x0_and_gradient(model, schedule, x, t, squared_error)
        x_prev = _step_from(schedule, x, t, x0, index, generator, clip_x0)
        zeta = step_size / error.sqrt().clamp(min=torch.finfo(error.dtype).tiny)
        return x_prev - _per_sample(zeta, x) * gradient

    return _posterior_chain(model, schedule, operator, y, shape, steps, x_T, generator, step)


def posterior_variance_of_x0(schedule: NoiseSchedule, t: Tensor, data_std: float = 1.0) -> Tensor:
    """``r_t^2 = Var[x_0 | x_t]`` per pixel for data x_0 ~ N(mu, data_std^2 I), shape (B,).

    From ``x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps``, Gaussian conditioning gives
    ``r_t^2 = s^2 (1 - abar) / (abar s^2 + 1 - abar)`` with s = ``data_std``; for s = 1 this is
    1 - abar, the variance Song et al. (2023) use for images of unit variance.
    """
    return _variance_of_x0(schedule.alphas_cumprod.to(t.device)[t], data_std)


def _variance_of_x0(alpha_bar: Tensor, data_std: float) -> Tensor:
    variance = data_std**2
    return variance * (1 - alpha_bar) / (alpha_bar * variance + 1 - alpha_bar)


def _gaussian_log_likelihood(
    operator: LinearMeasurement, y: Tensor, x0: Tensor, variance_of_x0: Tensor, noise_std: float
) -> Tensor:
    """``log N(y; A x0, noise_std^2 I + variance_of_x0 A A^T)`` up to a constant, shape (B,)."""
    residual = y - operator(x0)
    variance = noise_std**2 + variance_of_x0 * operator.gram_diagonal(residual)
    # A pixel with A A^T = 0 and no noise is unseen: its term is a constant, left out.
    seen = variance > 0
    terms = torch.where(seen, residual.pow(2) / torch.where(seen, variance, 1.0), 0.0)
    return -0.5 * terms.flatten(1).sum(1)


def pigdm_sample(
    model: NoisePredictor,
    schedule: NoiseSchedule,
    operator: LinearMeasurement,
    y: Tensor,
    shape: tuple[int, ...],
    *,
    noise_std: float,
    data_std: float = 1.0,
    steps: int | None = None,
    eta: float | None = None,
    x_T: Tensor | None = None,
    generator: torch.Generator | None = None,
    clip_x0: tuple[float, float] | None = (-1.0, 1.0),
) -> Tensor:
    """Ancestral or DDIM sampling with the likelihood score of pseudoinverse-guided diffusion
    (PiGDM, Song et al. 2023).

    With ``p(x_0 | x_t) ~ N(x0_hat(x_t), r_t^2 I)`` (:func:`posterior_variance_of_x0`), the
    measurement ``y = A x_0 + sigma_y n`` is Gaussian given x_t::

        log p(y | x_t) ~ -1/2 (y - A x0_hat)^T (sigma_y^2 I + r_t^2 A A^T)^-1 (y - A x0_hat) + c,

    whose gradient g (through the network, with the covariance held fixed) turns the model's
    noise into that of the posterior, ``eps_y = eps_hat - sqrt(1 - abar_t) g``; in terms of
    x_0 (eq. 4) this is ``x0_y = x0_hat + (1 - abar_t) / sqrt(abar_t) g``, which an ancestral
    step (Ho et al. 2020, Algorithm 2) then uses, or, with ``eta`` given, a DDIM step (Song et
    al. 2021, eq. 12) from ``x0_y`` and the noise it implies, as the paper writes its algorithm.
    ``eta = 1`` draws the same steps as the ancestral sampler; ``eta = 0`` is deterministic
    given x_T.

    For data x_0 ~ N(mu, data_std^2 I) and the exact denoiser, ``x0_y`` is exactly
    E[x_0 | x_t, y], so the chain draws from p(x_0 | y) up to the discretisation of the
    reverse process. For other data it is an approximation with no step size to tune.

    Args:
        model, operator, y, shape, steps, x_T, generator, clip_x0: as for :func:`dps_sample`;
            the clip acts on ``x0_y``.
        noise_std: sigma_y of the measurement, >= 0 (0 for exact measurements).
        data_std: the standard deviation assumed for each pixel of x_0 (1.0 in the paper).
        eta: ``None`` for ancestral steps, or DDIM's eta >= 0 for DDIM steps.

    Returns the samples, of ``shape``.
    """
    noise_std = check_number("noise_std", noise_std, 0.0, low_open=False)
    data_std = check_number("data_std", data_std, 0.0, low_open=True)
    if eta is not None:
        eta = check_number("eta", eta, 0.0, 1.0, low_open=False, high_open=False)

    def step(
        model: NoisePredictor, schedule: NoiseSchedule, x: Tensor, t: Tensor, index: int
    ) -> Tensor:
        alpha_bar = _gather(schedule.alphas_cumprod, t, x)
        r2 = _variance_of_x0(alpha_bar, data_std)

        def log_likelihood(x0: Tensor) -> Tensor:
            return _gaussian_log_likelihood(operator, y, x0, r2, noise_std)

        x0, gradient, _ = _x0_and_gradient(model, schedule, x, t, log_likelihood)
        # At alpha_bar = 0 (zero terminal SNR) x_t says nothing of x_0: p(y | x_t) = p(y).
        gain = torch.where(alpha_bar > 0, (1 - alpha_bar) / alpha_bar.clamp(min=1e-30).sqrt(), 0.0)
        x0_guided = x0 + gain * gradient
        return _step_from(schedule, x, t, x0_guided, index, generator, clip_x0, eta)

    return _posterior_chain(model, schedule, operator, y, shape, steps, x_T, generator, step)
