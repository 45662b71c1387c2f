"""The ideal denoiser of a finite training set, and how to tell a copy from a new image.

Training minimises the simplified loss ``E ||eps - eps_theta(x_t, t)||^2`` over the training
images ``x^1 .. x^N``, that is, over the empirical distribution ``(1/N) sum_i delta(x_0 - x^i)``.
Its exact minimiser is ``E[eps | x_t]`` under that distribution. With ``a = sqrt(abar_t)``,
``s = sqrt(1 - abar_t)``, the noised distribution is a mixture of N Gaussians
``N(a x^i, s^2 I)``, and ::

    E[x_0 | x_t] = sum_i w_i(x_t) x^i,   w_i = softmax_i(-||x_t - a x^i||^2 / (2 s^2)),
    E[eps | x_t] = (x_t - a E[x_0 | x_t]) / s

(Tweedie's formula for a mixture of point masses; Kadkhodaie et al. 2024, sec. 2). As t falls
the weights harden onto the nearest training image, so sampling with this denoiser can only
return training images: a network that learned the objective perfectly would copy. A model
that makes new images has failed to fit its objective on the training set, in a useful way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import check_finite, check_timesteps


class EmpiricalDenoiser:
    """``E[eps | x_t]`` when the data are exactly the N given images: the minimiser of the
    simplified loss on that training set, called like a noise-predicting network.

    Args:
        images: (N, C, H, W) the training images, in the range the model sees (e.g. [-1, 1]).
        schedule: the :class:`~diffusion_lib.schedules.NoiseSchedule` whose ``alphas_cumprod`` noise them.

    ``denoiser(x_t, t)`` takes ``x_t`` (B, C, H, W) and 0-based timesteps ``t`` (B,) and returns
    the noise estimate (B, C, H, W) in ``x_t``'s dtype and device. The weights are computed in
    float64, because at small t their logits reach millions and float32 would round the
    differences between neighbouring training images away.
    """

    def __init__(self, images: Tensor, schedule: NoiseSchedule) -> None:
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[0] < 1:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"images must be a (N, C, H, W) tensor with N >= 1, got {shape}")
        check_finite("images", images)
        self.schedule = schedule
        self.images = images.detach().to(torch.float64)
        self.flat = self.images.flatten(1)  # (N, D)
        self.squared_norms = self.flat.pow(2).sum(dim=1)  # (N,)

    def __repr__(self) -> str:
        return f"EmpiricalDenoiser({self.flat.shape[0]} images of {tuple(self.images.shape[1:])})"

    def _check(self, x_t: Tensor, t: Tensor) -> None:
        if not isinstance(x_t, Tensor) or tuple(x_t.shape[1:]) != tuple(self.images.shape[1:]):
            shape = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(
                f"x_t must have shape (B, {', '.join(map(str, self.images.shape[1:]))}) like "
                f"the training images, got {shape}"
            )
        check_timesteps(t, self.schedule.timesteps, x_t.shape[0])

    def weights(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``w_i(x_t)`` (B, N) float64, each row summing to 1: the posterior probability that
        ``x_t`` was made from training image i. The term ``||x_t||^2`` of the distance is the
        same for every i and cancels in the softmax."""
        self._check(x_t, t)
        points = x_t.detach().to(self.flat.device, torch.float64).flatten(1)  # (B, D)
        alpha = _gather(self.schedule.sqrt_alphas_cumprod, t.cpu(), points)  # (B, 1)
        variance = _gather(1.0 - self.schedule.alphas_cumprod, t.cpu(), points)
        logits = (alpha * points @ self.flat.T - alpha**2 * self.squared_norms / 2) / variance
        return torch.softmax(logits, dim=1)

    def effective_count(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``exp(-sum_i w_i log w_i)`` (B,) float64: the exponential of the weights' entropy,
        how many training images are still in the running for ``x_t``. It is N when all
        weights are equal and 1 when one image has them all."""
        weights = self.weights(x_t, t)
        entropy = -torch.special.xlogy(weights, weights).sum(dim=1)
        return entropy.exp()

    def x0_estimate(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``E[x_0 | x_t] = sum_i w_i x^i`` (B, C, H, W) in ``x_t``'s dtype and device."""
        mean = self.weights(x_t, t) @ self.flat
        return mean.reshape(x_t.shape).to(device=x_t.device, dtype=x_t.dtype)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        x0 = self.x0_estimate(x_t, t)
        return self.schedule.predict_eps(x_t, t.to(x_t.device), x0)
