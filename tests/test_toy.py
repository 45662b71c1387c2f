"""GaussianMixture and its optimal noise predictor against autograd, quadrature and Monte Carlo."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_lib import (
    ClassConditionalNoisePredictor,
    GaussianMixture,
    NoiseSchedule,
    RectifiedFlow,
    pooled_mixture,
)


@pytest.fixture
def mixture() -> GaussianMixture:
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.4]])
    return GaussianMixture(means, torch.tensor([0.3, 0.5, 0.2]), torch.tensor([0.5, 0.3, 0.2]))


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear")


def test_log_prob_integrates_to_one(mixture: GaussianMixture) -> None:
    grid = torch.linspace(-4.0, 4.0, 801, dtype=torch.float64)
    x, y = torch.meshgrid(grid, grid, indexing="ij")
    density = mixture.log_prob(torch.stack([x.flatten(), y.flatten()], dim=1)).exp()
    cell = (grid[1] - grid[0]) ** 2
    assert abs(density.sum().item() * cell - 1.0) < 1e-4


def test_log_prob_of_one_component_is_the_normal_density() -> None:
    single = GaussianMixture(torch.tensor([[1.0, -2.0, 0.5]]), 0.7)
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = torch.distributions.MultivariateNormal(
        single.means[0], covariance_matrix=0.49 * torch.eye(3, dtype=torch.float64)
    ).log_prob(x)
    torch.testing.assert_close(single.log_prob(x), expected)


def test_score_is_the_gradient_of_log_prob(mixture: GaussianMixture) -> None:
    x = (2 * torch.randn(64, 2, dtype=torch.float64)).requires_grad_()
    (gradient,) = torch.autograd.grad(mixture.log_prob(x).sum(), x)
    torch.testing.assert_close(mixture.score(x.detach()), gradient)


def test_samples_follow_the_weights_and_moments(mixture: GaussianMixture) -> None:
    samples = mixture.sample(200_000, torch.Generator().manual_seed(0)).double()
    assert samples.shape == (200_000, 2)
    torch.testing.assert_close(mixture.proportions(samples), mixture.weights, atol=0.01, rtol=0)
    torch.testing.assert_close(samples.mean(0), mixture.weights @ mixture.means, atol=0.01, rtol=0)


def _moments(mixture: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a mixture from its parameters (law of total covariance)."""
    mean = mixture.weights @ mixture.means
    centred = mixture.means - mean
    between = (mixture.weights[:, None] * centred).T @ centred
    within = (mixture.weights * mixture.stds.pow(2)).sum() * torch.eye(mixture.dim).double()
    return mean, between + within


@pytest.mark.parametrize("step", [0, 100, 400, 999])
def test_noised_mixture_matches_the_forward_process(
    mixture: GaussianMixture, schedule: NoiseSchedule, step: int
) -> None:
    generator = torch.Generator().manual_seed(step)
    x0 = mixture.sample(200_000, generator).double()
    x_t = schedule.q_sample(x0, torch.full((x0.shape[0],), step), generator=generator)
    mean, covariance = _moments(mixture.noised(schedule, step))
    torch.testing.assert_close(x_t.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x_t.T), covariance, atol=0.01, rtol=0)


def test_optimal_predictor_is_tweedie(mixture: GaussianMixture, schedule: NoiseSchedule) -> None:
    """E[eps | x_t] from the per-component posteriors equals -sqrt(1 - alpha_bar_t) times the
    autograd score of the noised mixture: two derivations of the same quantity."""
    predictor = mixture.optimal_noise_predictor(schedule)
    steps = [0, 10, 200, 600, 999]
    x_t = 1.5 * torch.randn(len(steps), 2, dtype=torch.float64)
    expected = []
    for row, step in enumerate(steps):
        point = x_t[row : row + 1].clone().requires_grad_()
        (score,) = torch.autograd.grad(mixture.noised(schedule, step).log_prob(point).sum(), point)
        expected.append(-schedule.sqrt_one_minus_alphas_cumprod[step] * score)
    torch.testing.assert_close(predictor(x_t, torch.tensor(steps)), torch.cat(expected))


def test_optimal_predictor_residual_is_orthogonal_to_x_t(
    mixture: GaussianMixture, schedule: NoiseSchedule
) -> None:
    """A conditional expectation leaves a residual uncorrelated with any function of x_t;
    a predictor off by 10% does not."""
    generator = torch.Generator().manual_seed(1)
    n = 200_000
    x0 = mixture.sample(n, generator).double()
    t = torch.randint(0, 1000, (n,), generator=generator)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x_t = schedule.q_sample(x0, t, noise=eps)
    prediction = mixture.optimal_noise_predictor(schedule)(x_t, t)
    features = torch.cat([torch.ones(n, 1), x_t, x_t.pow(2), torch.tanh(x_t)], 1).double()
    residual = eps - prediction
    assert (features.T @ residual / n).abs().max() < 0.01
    assert (features.T @ (eps - 1.1 * prediction) / n).abs().max() > 0.05
    assert residual.pow(2).mean() < (eps - 1.1 * prediction).pow(2).mean()


def test_optimal_predictor_keeps_device_and_dtype(
    mixture: GaussianMixture, schedule: NoiseSchedule
) -> None:
    out = mixture.optimal_noise_predictor(schedule)(torch.zeros(3, 2), torch.tensor([0, 5, 9]))
    assert out.dtype == torch.float32 and out.shape == (3, 2)


def test_ring_places_means_on_a_circle() -> None:
    ring = GaussianMixture.ring(components=6, radius=2.0, std=0.1)
    torch.testing.assert_close(ring.means.norm(dim=1), torch.full((6,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(ring.means[1], 2.0 * torch.tensor([0.5, math.sqrt(3) / 2]).double())
    torch.testing.assert_close(ring.weights, torch.full((6,), 1 / 6, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"means": torch.zeros(3), "stds": 1.0}, "shape"),
        ({"means": torch.zeros(2, 2), "stds": -1.0}, "positive"),
        ({"means": torch.zeros(2, 2), "stds": [1.0, 1.0, 1.0]}, r"one per component \(2\)"),
        ({"means": torch.zeros(2, 2), "stds": torch.ones(2, 1)}, r"got shape \(2, 1\)"),
        ({"means": torch.zeros(2, 2), "stds": 1.0, "weights": torch.ones(3)}, "2 non-negative"),
        (
            {"means": torch.zeros(2, 2), "stds": 1.0, "weights": torch.tensor([1.0, -1.0])},
            "non-neg",
        ),
    ],
)
def test_bad_parameters_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**kwargs)


def test_points_of_the_wrong_dimension_raise(mixture: GaussianMixture) -> None:
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        mixture.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="0..999"):
        mixture.noised(NoiseSchedule.from_name("linear"), 1000)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.8, 1.0])
def test_straight_path_mixture_matches_interpolated_samples(
    mixture: GaussianMixture, t: float
) -> None:
    generator = torch.Generator().manual_seed(int(10 * t))
    x0 = mixture.sample(200_000, generator).double()
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x_t = RectifiedFlow().interpolate(x0, noise, torch.full((x0.shape[0],), t, dtype=torch.float64))
    mean, covariance = _moments(mixture.on_straight_path(t))
    torch.testing.assert_close(x_t.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(x_t.T), covariance, atol=0.01, rtol=0)


def test_optimal_velocity_is_the_score_route(mixture: GaussianMixture) -> None:
    """E[eps - x_0 | x_t] from the per-component posteriors equals -(x_t + t grad log q_t) / (1 - t),
    with the score by autograd: Tweedie's formula on the straight path, a second derivation."""
    flow = RectifiedFlow()
    times = [0.0, 0.05, 0.4, 0.9, 0.99]
    x_t = 1.5 * torch.randn(len(times), 2, dtype=torch.float64)
    expected = []
    for row, t in enumerate(times):
        point = x_t[row : row + 1].clone().requires_grad_()
        (score,) = torch.autograd.grad(mixture.on_straight_path(t).log_prob(point).sum(), point)
        expected.append(-(point.detach() + t * score) / (1 - t))
    velocity = mixture.optimal_velocity(flow)(x_t, 1000 * torch.tensor(times))
    torch.testing.assert_close(velocity, torch.cat(expected))


def test_optimal_velocity_residual_is_orthogonal_to_x_t(mixture: GaussianMixture) -> None:
    """The conditional expectation of eps - x_0 leaves a residual uncorrelated with functions
    of (x_t, t); a velocity off by 10% does not, and its loss is higher."""
    flow, generator, n = RectifiedFlow(), torch.Generator().manual_seed(2), 200_000
    x0 = mixture.sample(n, generator).double()
    t = torch.rand(n, generator=generator, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x_t = flow.interpolate(x0, eps, t)
    prediction = mixture.optimal_velocity(flow)(x_t, flow.model_time(t))
    features = torch.cat([torch.ones(n, 1), x_t, x_t.pow(2), torch.tanh(x_t), t[:, None]], 1)
    residual = flow.velocity_target(x0, eps) - prediction
    wrong = flow.velocity_target(x0, eps) - 1.1 * prediction
    assert (features.double().T @ residual / n).abs().max() < 0.01
    assert (features.double().T @ wrong / n).abs().max() > 0.03  # 10 standard errors
    assert residual.pow(2).mean() < wrong.pow(2).mean()


def test_sample_quality_of_the_data_and_of_distorted_samples(mixture: GaussianMixture) -> None:
    generator = torch.Generator().manual_seed(3)
    single = GaussianMixture(torch.tensor([[1.0, 2.0], [-9.0, 0.0]]), 0.5, torch.tensor([0.5, 0.5]))
    data = single.sample(100_000, generator)
    quality = single.sample_quality(data)
    assert abs(quality.log_density - single.log_prob(data).mean().item()) < 1e-9
    assert abs(quality.spread - 1.0) < 0.01 and quality.weight_error < 0.01
    stretched = single.means[single.nearest_component(data)] * 1.0
    stretched = (stretched + 2 * (data.double() - stretched)).float()
    assert abs(single.sample_quality(stretched).spread - 2.0) < 0.02
    one_mode = torch.tensor([[1.0, 2.0]]).expand(100, 2)  # all on one of two equal modes
    assert abs(single.sample_quality(one_mode).weight_error - 0.5) < 1e-12
    assert single.sample_quality(one_mode).spread == 0.0
    assert mixture.sample_quality(mixture.sample(50_000, generator)).spread == pytest.approx(
        1.0, abs=0.02
    )


def test_straight_path_time_outside_the_unit_interval_raises(mixture: GaussianMixture) -> None:
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        mixture.on_straight_path(1.2)
    with pytest.raises(ValueError, match=r"times must lie in \[0, 1\]"):
        mixture.optimal_velocity(RectifiedFlow())(torch.zeros(2, 2), torch.tensor([0.0, 2000.0]))


def _two_classes() -> list[GaussianMixture]:
    return [
        GaussianMixture(torch.tensor([[-1.0, 0.0], [0.0, 1.0]]), 0.3, torch.tensor([0.2, 0.8])),
        GaussianMixture(torch.tensor([[1.0, 0.5]]), 0.4),
    ]


def test_pooled_mixture_is_the_class_weighted_density() -> None:
    classes, pi = _two_classes(), torch.tensor([0.7, 0.3], dtype=torch.float64)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    expected = torch.logsumexp(
        torch.stack([pi[c].log() + classes[c].log_prob(x) for c in range(2)]), dim=0
    )
    torch.testing.assert_close(pooled_mixture(classes, pi).log_prob(x), expected)


def test_class_conditional_predictor_obeys_the_law_of_total_expectation(
    schedule: NoiseSchedule,
) -> None:
    """E[eps | x_t] = sum_c q(c | x_t) E[eps | x_t, c], with q(c | x_t) from Bayes' rule."""
    classes, pi = _two_classes(), torch.tensor([0.7, 0.3], dtype=torch.float64)
    exact = ClassConditionalNoisePredictor(classes, schedule, pi)
    x_t = torch.randn(5, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = torch.full((5,), 250)
    per_class = torch.stack([exact(x_t, t, torch.full((5,), c)) for c in range(2)])  # (2, 5, 2)
    joint = torch.stack(
        [pi[c].log() + classes[c].noised(schedule, 250).log_prob(x_t) for c in range(2)]
    )
    posterior = torch.softmax(joint, dim=0)  # (2, 5)
    expected = (posterior[..., None] * per_class).sum(0)
    torch.testing.assert_close(exact(x_t, t, torch.full((5,), exact.null_label)), expected)
    mixed = exact(x_t, t, torch.tensor([0, 1, 2, 1, 0]))
    torch.testing.assert_close(mixed[1], per_class[1, 1])
    torch.testing.assert_close(mixed[4], per_class[0, 4])


def test_class_conditional_predictor_rejects_unknown_labels(schedule: NoiseSchedule) -> None:
    exact = ClassConditionalNoisePredictor(_two_classes(), schedule)
    with pytest.raises(ValueError, match=r"one class in 0\.\.2 per point"):
        exact(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    # 0.5 lies in 0..2 but is no class: it used to leave its row of the output unwritten.
    with pytest.raises(ValueError, match="integer classes in 0..2, got dtype torch.float32"):
        exact(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="class_weights must be 2 positive numbers"):
        pooled_mixture(_two_classes(), torch.tensor([1.0, 0.0]))
