"""A Gaussian mixture in a few dimensions: data whose noised densities and scores are exact.

If the data are a mixture of isotropic Gaussians, ``q(x_0) = sum_k w_k N(mu_k, s^2 I)``, then
every noised marginal of the forward process is one as well (Ho et al. 2020, eq. 4 convolves
each component with ``N(0, (1 - alpha_bar_t) I)`` after scaling it by ``sqrt(alpha_bar_t)``)::

    q(x_t) = sum_k w_k N(sqrt(alpha_bar_t) mu_k, (alpha_bar_t s^2 + 1 - alpha_bar_t) I).

So its score, its optimal denoiser and the optimal noise predictor are known in closed form,
and a learned model can be compared against the truth rather than against another model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_lib.flow_matching import RectifiedFlow, _check_times
from diffusion_lib.schedules import NoiseSchedule, _gather
from diffusion_lib.validation import check_positive_int, check_timesteps, is_integer_tensor


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
        stds = torch.as_tensor(stds, dtype=torch.float64)
        if stds.dim() > 1 or stds.numel() not in (1, components):
            raise ValueError(
                f"stds must be one number or one per component ({components}), "
                f"got shape {tuple(stds.shape)}"
            )
        stds = stds.expand(components).clone()
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

    def _conditioned_on_scaled_and_noised(
        self, points: Tensor, alpha: Tensor, sigma: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component Gaussian conditioning on ``x = alpha x_0 + sigma eps``.

        ``points`` (B, D) float64, ``alpha`` and ``sigma`` (B, 1). Returns ``q(k | x)`` (B, K),
        the offsets ``r = x - alpha mu_k`` (B, K, D) and the variances
        ``V_k = alpha^2 s_k^2 + sigma^2`` (B, K), from which ``E[eps | x, k] = sigma r / V_k``
        and ``E[x_0 | x, k] = mu_k + alpha s_k^2 r / V_k``.
        """
        variances = alpha.pow(2) * self.stds.pow(2) + sigma.pow(2)
        offsets = points[:, None, :] - alpha[:, :, None] * self.means[None]
        posterior = torch.softmax(self._weighted_log_normal(offsets, variances), dim=1)
        return posterior, offsets, variances

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

    def sample_quality(self, x: Tensor) -> SampleQuality:
        """How well points drawn by a sampler match the mixture: (N, D) -> :class:`SampleQuality`."""
        x = self._check_points(x)
        nearest = self.nearest_component(x)
        squared = (x - self.means[nearest]).pow(2).sum(1) / self.stds[nearest].pow(2)
        return SampleQuality(
            log_density=self.log_prob(x).mean().item(),
            spread=(squared.mean() / self.dim).sqrt().item(),
            weight_error=0.5 * (self.proportions(x) - self.weights).abs().sum().item(),
        )

    def scaled_and_noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """The law of ``alpha x_0 + sigma eps`` with x_0 from the mixture and eps ~ N(0, I)."""
        stds = (alpha**2 * self.stds.pow(2) + sigma**2).sqrt()
        return GaussianMixture(alpha * self.means, stds, self.weights)

    def noised(self, schedule: NoiseSchedule, t: int) -> GaussianMixture:
        """The marginal ``q(x_t)`` of the forward process at 0-based step ``t`` (module docstring)."""
        check_timesteps(torch.tensor([t]), schedule.timesteps)
        alpha_bar = schedule.alphas_cumprod[t].item()
        return self.scaled_and_noised(math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar))

    def on_straight_path(self, t: float) -> GaussianMixture:
        """The marginal of ``x_t = (1 - t) x_0 + t eps`` of a :class:`RectifiedFlow`, t in [0, 1]."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t}")
        return self.scaled_and_noised(1.0 - t, t)

    def optimal_noise_predictor(self, schedule: NoiseSchedule) -> OptimalNoisePredictor:
        """The model ``(x_t, t) -> E[eps | x_t]`` that no network can beat; see the class."""
        return OptimalNoisePredictor(self, schedule)

    def optimal_velocity(self, flow: RectifiedFlow) -> OptimalVelocity:
        """The velocity model ``(x_t, time_scale t) -> E[eps - x_0 | x_t]``; see the class."""
        return OptimalVelocity(self, flow)


def pooled_mixture(
    classes: list[GaussianMixture], class_weights: Tensor | None = None
) -> GaussianMixture:
    """``sum_c pi_c q(x | c)``: the classes' mixtures pooled into one, with class weights pi_c
    (equal when omitted), which is the data a model sees when the label is dropped."""
    if not classes or any(not isinstance(mixture, GaussianMixture) for mixture in classes):
        raise ValueError("classes must be a non-empty list of GaussianMixture, one per class")
    if class_weights is None:
        class_weights = torch.ones(len(classes), dtype=torch.float64)
    class_weights = torch.as_tensor(class_weights, dtype=torch.float64)
    if class_weights.shape != (len(classes),) or bool((class_weights <= 0).any()):
        raise ValueError(
            f"class_weights must be {len(classes)} positive numbers, got {class_weights}"
        )
    class_weights = class_weights / class_weights.sum()
    return GaussianMixture(
        torch.cat([mixture.means for mixture in classes]),
        torch.cat([mixture.stds for mixture in classes]),
        torch.cat(
            [pi * mixture.weights for pi, mixture in zip(class_weights, classes, strict=True)]
        ),
    )


class ClassConditionalNoisePredictor:
    """``eps*(x_t, t, c) = E[eps | x_t, c]`` when the data of class c are the mixture ``classes[c]``.

    The label ``null_label = len(classes)`` asks for ``E[eps | x_t]`` on all classes pooled
    (:func:`pooled_mixture`): what a network trained with label dropout learns for "no label".
    Called like a conditional network: ``x_t`` (B, D), ``t`` (B,), ``labels`` (B,) -> (B, D).
    """

    def __init__(
        self,
        classes: list[GaussianMixture],
        schedule: NoiseSchedule,
        class_weights: Tensor | None = None,
    ) -> None:
        self.pooled = pooled_mixture(classes, class_weights)
        self.classes = list(classes)
        self.null_label = len(classes)
        self.predictors = [
            mixture.optimal_noise_predictor(schedule) for mixture in [*classes, self.pooled]
        ]

    def __call__(self, x_t: Tensor, t: Tensor, labels: Tensor) -> Tensor:
        labels = torch.as_tensor(labels).reshape(-1)
        if not is_integer_tensor(labels):
            raise ValueError(
                f"labels must be integer classes in 0..{self.null_label}, got dtype {labels.dtype}"
            )
        if labels.shape[0] != x_t.shape[0] or bool(
            ((labels < 0) | (labels > self.null_label)).any()
        ):
            raise ValueError(
                f"labels must hold one class in 0..{self.null_label} per point "
                f"({self.null_label} = no label), got {labels.tolist()}"
            )
        eps = torch.empty_like(x_t)
        for label, predictor in enumerate(self.predictors):
            rows = labels == label
            if bool(rows.any()):
                eps[rows] = predictor(x_t[rows], t[rows])
        return eps


@dataclass(frozen=True)
class SampleQuality:
    """Three numbers that say how well N points match a :class:`GaussianMixture`.

    Attributes:
        log_density: mean ``log q(x)`` of the points (the data's own value is the baseline).
        spread: root-mean-square distance to the nearest component's mean, per dimension and
            in units of that component's standard deviation: 1 for the data, below 1 when the
            samples huddle on the means, above 1 when they smear out.
        weight_error: total variation distance between the share of points nearest to each
            component and the weights, ``0.5 sum_k |share_k - w_k|``.
    """

    log_density: float
    spread: float
    weight_error: float


class OptimalNoisePredictor:
    """``eps*(x_t, t) = E[eps | x_t]`` for data drawn from a :class:`GaussianMixture`.

    It minimises the simplified loss (Ho et al. 2020, eq. 14) at every t, so it is what a
    perfect network would learn. Given component k, x_0 and x_t are jointly Gaussian and ::

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
        weights, offsets, variances = mixture._conditioned_on_scaled_and_noised(
            points, alpha, sigma
        )
        eps = (weights[..., None] * sigma[:, :, None] * offsets / variances[..., None]).sum(1)
        return eps.to(device=x_t.device, dtype=x_t.dtype)


class OptimalVelocity:
    """``v*(x_t, t) = E[eps - x_0 | x_t]`` on the straight path, for :class:`GaussianMixture` data.

    It minimises the flow-matching loss at every t (Lipman et al. 2023, Theorem 2). Given
    component k, x_0 and ``x_t = a x_0 + b eps`` (a = 1 - t, b = t) are jointly Gaussian, and with
    ``V_k = a^2 s_k^2 + b^2`` and ``r = x_t - a mu_k``::

        E[x_0 | x_t, k] = mu_k + a s_k^2 r / V_k,     E[eps | x_t, k] = b r / V_k,

    so ``E[eps - x_0 | x_t, k] = (b - a s_k^2) r / V_k - mu_k``, averaged over ``q(k | x_t)``.
    The tests check it against a second route, ``v = -(x_t + t grad log q_t(x_t)) / (1 - t)``.
    Called like a network: ``x_t`` (B, D), ``time`` (B,) = ``flow.time_scale * t`` -> (B, D).
    """

    def __init__(self, mixture: GaussianMixture, flow: RectifiedFlow) -> None:
        self.mixture, self.flow = mixture, flow

    def __call__(self, x_t: Tensor, time: Tensor) -> Tensor:
        mixture = self.mixture
        points = mixture._check_points(x_t.cpu())
        t = time.detach().cpu().to(torch.float64) / self.flow.time_scale
        _check_times(t, points.shape[0])
        a, b = (1 - t)[:, None], t[:, None]  # (B, 1)
        weights, offsets, variances = mixture._conditioned_on_scaled_and_noised(points, a, b)
        gains = (b - a * mixture.stds.pow(2)) / variances  # (B, K)
        velocities = gains[..., None] * offsets - mixture.means[None]
        v = (weights[..., None] * velocities).sum(1)
        return v.to(device=x_t.device, dtype=x_t.dtype)
