"""A Gaussian mixture in a few dimensions: data whose noised densities and scores are exact.

If the data are a mixture of isotropic Gaussians, ``q(x_0) = sum_k w_k N(mu_k, s^2 I)``, then
every noised marginal of the forward process is one as well (Ho et al. 2020, eq. 4 convolves
each component with ``N(0, (1 - alpha_bar_t) I)`` after scaling it by ``sqrt(alpha_bar_t)``):

    q(x_t) = sum_k w_k N(sqrt(alpha_bar_t) mu_k, (alpha_bar_t s^2 + 1 - alpha_bar_t) I).

So its score, its optimal denoiser and the optimal noise predictor are known in closed form,
and a learned model can be compared against the truth rather than against another model.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import check_positive_int, check_timesteps


class GaussianMixture:
    """``sum_k w_k N(mu_k, s_k^2 I)`` in D dimensions, float64 throughout.

    Args:
        means: (K, D) component means mu_k.
        stds: (K,) component standard deviations s_k, or one number for all.
        weights: (K,) mixture weights w_k (normalised here); equal weights when omitted.
    """

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, D) with K >= 1, got {tuple(means.shape)}")
        components = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(components).clone()
        if not bool(torch.isfinite(stds).all()) or bool((stds <= 0).any()):
            raise ValueError(f"stds must be positive and finite, got {stds.tolist()}")
        if weights is None:
            weights = torch.ones(components, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (components,) or bool((weights < 0).any()) or weights.sum() <= 0:
            raise ValueError(
                f"weights must be {components} non-negative numbers with a positive sum, "
                f"got {weights.tolist()}"
            )
        self.means, self.stds, self.weights = means, stds, weights / weights.sum()

    @classmethod
    def ring(
        cls,
        components: int = 8,
        radius: float = 1.0,
        std: float = 0.1,
        weights: Tensor | None = None,
    ) -> GaussianMixture:
        """``components`` equal Gaussians spaced evenly on a circle in 2-D."""
        check_positive_int("components", components)
        angles = torch.arange(components, dtype=torch.float64) * (2 * math.pi / components)
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(means, std, weights)

    @property
    def dim(self) -> int:
        """D, the dimension of a point."""
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.means.shape[0]}, D={self.dim})"

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent draws, shape (n, D), float32."""
        check_positive_int("n", n)
        component = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.means[component] + self.stds[component, None] * noise).float()

    def _log_joint(self, x: Tensor) -> Tensor:
        """``log w_k + log N(x; mu_k, s_k^2 I)``, shape (N, K)."""
        offsets = self._check_points(x)[:, None, :] - self.means[None]
        return self._weighted_log_normal(offsets, self.stds.pow(2))

    def _weighted_log_normal(self, offsets: Tensor, variances: Tensor) -> Tensor:
        """``log w_k + log N(0; offsets, variances I)`` for offsets (N, K, D) from each
        component's mean and variances broadcasting to (N, K); returns (N, K)."""
        squared = offsets.pow(2).sum(-1)
        log_normal = -0.5 * (squared / variances + self.dim * torch.log(2 * math.pi * variances))
        return self.weights.log() + log_normal

    def _check_points(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"points must have shape (N, {self.dim}), got {shape}")
        return x.to(torch.float64)

    def log_prob(self, x: Tensor) -> Tensor:
        """``log q(x)`` of each point: (N, D) -> (N,), float64."""
        return torch.logsumexp(self._log_joint(x), dim=1)

    def responsibilities(self, x: Tensor) -> Tensor:
        """``q(k | x)``, the posterior probability of each component: (N, D) -> (N, K)."""
        return torch.softmax(self._log_joint(x), dim=1)

    def score(self, x: Tensor) -> Tensor:
        """``grad_x log q(x) = sum_k q(k | x) (mu_k - x) / s_k^2``: (N, D) -> (N, D), float64."""
        x = self._check_points(x)
        pulls = (self.means[None] - x[:, None, :]) / self.stds.pow(2)[None, :, None]
        return (self.responsibilities(x)[..., None] * pulls).sum(1)

    def nearest_component(self, x: Tensor) -> Tensor:
        """The most probable component of each point, ``argmax_k q(k | x)``: (N, D) -> (N,)."""
        return self._log_joint(x).argmax(dim=1)

    def proportions(self, x: Tensor) -> Tensor:
        """Share of the points whose most probable component is k, shape (K,), float64."""
        counts = torch.bincount(self.nearest_component(x), minlength=self.means.shape[0])
        return counts.double() / x.shape[0]

    def noised(self, schedule: NoiseSchedule, t: int) -> GaussianMixture:
        """The marginal ``q(x_t)`` of the forward process at 0-based step ``t`` (module docstring)."""
        check_timesteps(torch.tensor([t]), schedule.timesteps)
        alpha_bar = schedule.alphas_cumprod[t].item()
        stds = (alpha_bar * self.stds.pow(2) + 1.0 - alpha_bar).sqrt()
        return GaussianMixture(math.sqrt(alpha_bar) * self.means, stds, self.weights)

    def optimal_noise_predictor(self, schedule: NoiseSchedule) -> OptimalNoisePredictor:
        """The model ``(x_t, t) -> E[eps | x_t]`` that no network can beat; see the class."""
        return OptimalNoisePredictor(self, schedule)


class OptimalNoisePredictor:
    """``eps*(x_t, t) = E[eps | x_t]`` for data drawn from a :class:`GaussianMixture`.

    It minimises the simplified loss (Ho et al. 2020, eq. 14) at every t, so it is what a
    perfect network would learn. Given component k, x_0 and x_t are jointly Gaussian and

        E[eps | x_t, k] = sigma_t (x_t - alpha_t mu_k) / (alpha_t^2 s_k^2 + sigma_t^2),

    with ``alpha_t = sqrt(alpha_bar_t)``, ``sigma_t = sqrt(1 - alpha_bar_t)``; averaging over
    ``q(k | x_t)`` gives the answer. This is a second route to ``-sigma_t grad log q(x_t)``
    (Tweedie's formula), which the tests check against the score of :meth:`GaussianMixture.noised`.
    Called like a network: ``x_t`` (B, D), ``t`` (B,) 0-based -> (B, D) in ``x_t``'s dtype.
    """

    def __init__(self, mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.mixture, self.schedule = mixture, schedule

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        mixture = self.mixture
        points = mixture._check_points(x_t.cpu())
        check_timesteps(t, self.schedule.timesteps, points.shape[0])
        t = t.cpu()
        alpha = _gather(self.schedule.sqrt_alphas_cumprod, t, points)  # (B, 1)
        sigma = _gather(self.schedule.sqrt_one_minus_alphas_cumprod, t, points)
        variances = alpha.pow(2) * mixture.stds.pow(2) + sigma.pow(2)  # (B, K)
        offsets = points[:, None, :] - alpha[:, :, None] * mixture.means[None]  # (B, K, D)
        log_joint = mixture._weighted_log_normal(offsets, variances)
        weights = torch.softmax(log_joint, dim=1)[..., None]
        eps = (weights * sigma[:, :, None] * offsets / variances[..., None]).sum(1)
        return eps.to(device=x_t.device, dtype=x_t.dtype)
