"""The probability-flow likelihood against closed forms: the divergence against the Jacobian's
trace, Hutchinson's estimate against it on average, and the whole ODE against the exact density
of noised Gaussian data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from diffusion_lib import GaussianMixture, NoiseSchedule
from diffusion_lib.likelihood import (
    divergence_exact,
    divergence_hutchinson,
    ode_bits_per_dim,
    ode_log_likelihood,
)
from diffusion_lib.solvers import ode_timesteps

MEAN, STD = 0.3, 0.5


@pytest.fixture(scope="module")
def gaussian(linear: NoiseSchedule):
    """The exact noise predictor of N(MEAN, STD^2) data, in every dimension."""
    return GaussianMixture(torch.full((1, 3), MEAN), STD).optimal_noise_predictor(linear)


def _noised(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """Mean and variance of N(MEAN, STD^2) data noised to timestep t."""
    alpha_bar = float(schedule.alphas_cumprod[t])
    return math.sqrt(alpha_bar) * MEAN, alpha_bar * STD**2 + 1 - alpha_bar


def _log_normal(x: torch.Tensor, mean: float, variance: float) -> torch.Tensor:
    per_dim = -0.5 * ((x - mean) ** 2 / variance + math.log(2 * math.pi * variance))
    return per_dim.flatten(1).sum(dim=1)


def exact_ode_result(schedule: NoiseSchedule, x: torch.Tensor) -> torch.Tensor:
    """What the ODE computes with the exact denoiser, in closed form.

    The flow keeps z = (x - m_t) / sqrt(v_t) fixed, so x_0 = x lands on x_T = m_T + sqrt(v_T) z,
    and the density changes exactly as q_t does: the result is log q_0(x) with the prior
    N(0, I) in place of q_T at x_T (they differ by alpha_bar_T = 4e-5, about 1e-4 nats).
    """
    (m_0, v_0), (m_T, v_T) = _noised(schedule, 0), _noised(schedule, schedule.timesteps - 1)
    x_T = m_T + math.sqrt(v_T) * (x - m_0) / math.sqrt(v_0)
    return _log_normal(x, m_0, v_0) - _log_normal(x_T, m_T, v_T) + _log_normal(x_T, 0.0, 1.0)


def test_exact_divergence_is_the_trace_of_the_jacobian() -> None:
    weight = torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def function(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ weight) * x

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    value, divergence = divergence_exact(function, x)
    for b in range(5):
        jacobian = torch.autograd.functional.jacobian(function, x[b : b + 1]).reshape(4, 4)
        assert float(divergence[b]) == pytest.approx(float(jacobian.trace()), rel=1e-12)
    torch.testing.assert_close(value, function(x))


def test_hutchinson_estimate_averages_to_the_trace() -> None:
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = torch.zeros(20_000, 6, dtype=torch.float64)
    signs = torch.randint(0, 2, x.shape, generator=torch.Generator().manual_seed(3))
    probe = (2 * signs - 1).double()
    _, estimates = divergence_hutchinson(lambda v: v @ matrix.T, x, probe)
    error = float(estimates.std() / math.sqrt(len(estimates)))
    assert abs(float(estimates.mean()) - float(matrix.trace())) < 4 * error
    # with Rademacher probes a diagonal Jacobian is estimated without any variance
    _, diagonal = divergence_hutchinson(lambda v: 3.0 * v, x[:10], probe[:10])
    torch.testing.assert_close(diagonal, torch.full((10,), 18.0, dtype=torch.float64))


@pytest.mark.parametrize("spacing", ["logsnr", "time"])
def test_ode_likelihood_is_the_exact_density_of_noised_gaussian_data(
    linear: NoiseSchedule, gaussian, spacing: str
) -> None:
    """With the exact denoiser the ODE's density at t = 0 is q_0 itself, up to the prior;
    Heun's error falls about fourfold per doubling of the steps."""
    x = MEAN + STD * torch.randn(
        200, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64
    )
    exact = exact_ode_result(linear, x)

    def error(steps: int) -> float:
        ours = ode_log_likelihood(
            gaussian, linear, x, steps=steps, spacing=spacing, divergence="exact"
        )
        return float((ours - exact).abs().max())

    coarse, fine = error(100), error(400)
    assert fine < 3e-3  # nats, for three dimensions
    assert fine < coarse / 8


def test_hutchinson_likelihood_is_unbiased(linear: NoiseSchedule) -> None:
    # two components, so that the denoiser's Jacobian is not diagonal and the probes matter
    means = torch.tensor([[-0.5, 0.3, 0.1], [0.6, -0.2, 0.4]], dtype=torch.float64)
    mixture = GaussianMixture(means, 0.4).optimal_noise_predictor(linear)
    x = torch.tensor([[0.1, 0.2, 0.0]], dtype=torch.float64).expand(3000, 3)
    exact = ode_log_likelihood(mixture, linear, x[:1], steps=50, divergence="exact")
    estimates = ode_log_likelihood(
        mixture, linear, x, steps=50, generator=torch.Generator().manual_seed(5)
    )
    error = float(estimates.std() / math.sqrt(len(estimates)))
    assert error > 1e-3  # the probes do vary
    assert abs(float(estimates.mean()) - float(exact)) < 4 * error


def test_bits_per_dim_average_the_dequantised_density_and_bound_the_discrete_likelihood(
    linear: NoiseSchedule, gaussian
) -> None:
    """For Gaussian q_0, E_u[-log q_0(x + u)] = log-normaliser + ((x - m)^2 + w^2 / 12) / (2 v)
    per pixel; the bound must average to it and lie above -log P(bin), from the normal CDF."""
    width = 0.2  # wide bins, so that the gap of Jensen's inequality shows
    x = torch.tensor([[0.2, 0.6, -0.2]], dtype=torch.float64).expand(4000, 3)
    bits = ode_bits_per_dim(
        gaussian, linear, x, bin_width=width, steps=400, spacing="time", divergence="exact",
        generator=torch.Generator().manual_seed(6),
    )  # fmt: skip
    alpha_bar = float(linear.alphas_cumprod[0])
    m, v = math.sqrt(alpha_bar) * MEAN, alpha_bar * STD**2 + 1 - alpha_bar
    point = x[0]
    expected_nats = 0.5 * math.log(2 * math.pi * v) + ((point - m) ** 2 + width**2 / 12) / (2 * v)
    expected = float((expected_nats.mean() - math.log(width)) / math.log(2))
    error = float(bits.std() / math.sqrt(len(bits)))
    # + the ODE's own error, about 1e-3 nats over the 3 dimensions at 400 steps
    assert abs(float(bits.mean()) - expected) < 4 * error + 1e-3
    normal = torch.distributions.Normal(m, math.sqrt(v))
    probability = normal.cdf(point + width / 2) - normal.cdf(point - width / 2)
    discrete = float(-probability.log().mean() / math.log(2))
    assert discrete < float(bits.mean()) < discrete + 0.01


def test_likelihood_leaves_the_model_as_it_was(linear: NoiseSchedule) -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * (t[:, None] / 1000)

    model = Tiny().train()
    x = torch.randn(4, 3)
    result = ode_log_likelihood(
        model, linear, x, steps=5, generator=torch.Generator().manual_seed(7)
    )
    assert result.shape == (4,) and bool(torch.isfinite(result).all())
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, s: ode_log_likelihood(m, s, torch.zeros(2, 3), steps=1), "at least 2"),
        (lambda m, s: ode_log_likelihood(m, s, torch.zeros(2, 3), divergence="x"), "divergence"),
        (
            lambda m, s: ode_log_likelihood(
                m,
                NoiseSchedule.from_name("linear", 1000, zero_terminal_snr=True),
                torch.zeros(2, 3),
            ),
            "alpha_bar = 0",
        ),
        (
            lambda m, s: ode_log_likelihood(
                lambda x, t: torch.cat([x, x], 1), s, torch.zeros(2, 3)
            ),
            "as many channels as the data",
        ),
        (lambda m, s: ode_bits_per_dim(m, s, torch.zeros(2, 3), bin_width=0), "bin_width"),
        (lambda m, s: ode_log_likelihood(m, s, torch.full((2, 3), math.nan)), "finite"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(linear, gaussian, call, message) -> None:
    with pytest.raises(ValueError, match=message):
        call(gaussian, linear)


def test_heun_error_estimate_is_second_order(linear: NoiseSchedule, gaussian) -> None:
    x = MEAN + STD * torch.randn(
        50, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64
    )
    exact = exact_ode_result(linear, x)
    errors = [
        float(
            (ode_log_likelihood(gaussian, linear, x, steps=s, divergence="exact") - exact)
            .abs()
            .mean()
        )
        for s in (25, 50, 100)
    ]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])
    assert (ratios > 3).all(), errors


def exact_gaussian_model(schedule: NoiseSchedule):
    """The exact noise predictor of N(MEAN, STD^2) data on ``schedule``, with float64 means."""
    means = torch.full((1, 3), MEAN, dtype=torch.float64)
    return GaussianMixture(means, STD).optimal_noise_predictor(schedule)


def shifted_schedule(linear: NoiseSchedule) -> NoiseSchedule:
    """The linear schedule with beta_0 = 0.19, so alpha_0 = 0.9 rather than 0.99995: terms in
    alpha_0 that the linear schedule makes invisible (1 - alpha_0 = 5e-5) become large."""
    betas = linear.betas.clone().double()
    betas[0] = 0.19
    return NoiseSchedule(betas)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_a_zero_denoiser_gives_the_density_of_the_scaled_prior(
    linear: NoiseSchedule, divergence: str
) -> None:
    """With eps_theta = 0 the flow is the map x_bar = x_0 / alpha_0 held fixed, so
    x_T = (alpha_T / alpha_0) x_0 and, by the change of variables, x_0 ~ N(0, c^2 I) with
    c = alpha_0 / alpha_T: log p_0(x_0) = -|x_0|^2 / (2 c^2) - D/2 log(2 pi) - D log c, to
    rounding, whatever the steps (Heun is exact for a zero slope). Checked on the linear
    schedule and on one with alpha_0 = 0.9, where dropping alpha_0 from the log-determinant
    changes the result by D log(1 / 0.9) = 0.32 nats (dropping it from the starting point moves
    x_T, scaled by alpha_T, so little that the next test is the one to see it)."""
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    for schedule in (linear, shifted_schedule(linear)):
        alpha_bar = schedule.alphas_cumprod
        c = math.sqrt(float(alpha_bar[0]) / float(alpha_bar[-1]))
        expected = -x.square().sum(1) / (2 * c**2) - 1.5 * math.log(2 * math.pi) - 3 * math.log(c)
        got = ode_log_likelihood(
            lambda x_t, t: 0.0 * x_t, schedule, x, steps=7, divergence=divergence,
            generator=torch.Generator().manual_seed(10),
        )  # fmt: skip
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_ode_likelihood_is_exact_where_alpha_0_is_far_from_one(linear: NoiseSchedule) -> None:
    """exact_ode_result holds for any schedule; at alpha_0 = 0.9 the density at t = 0 is that
    of x_0 noised once, N(0.9 MEAN, 0.81 STD^2 + 0.19). Heun's error at 400 steps is about
    1e-3 nats over the three dimensions (as on the linear schedule)."""
    schedule = shifted_schedule(linear)
    model = exact_gaussian_model(schedule)
    x = MEAN + STD * torch.randn(
        100, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64
    )
    got = ode_log_likelihood(model, schedule, x, steps=400, spacing="time", divergence="exact")
    torch.testing.assert_close(got, exact_ode_result(schedule, x), rtol=0, atol=3e-3)


def hand_heun(schedule: NoiseSchedule, grid: list[int], x: torch.Tensor) -> torch.Tensor:
    """Heun's method on d x_bar / d rho = eps(alpha x_bar) for N(MEAN, STD^2) data, written out
    with the closed forms eps = sigma (x - alpha MEAN) / V and div_x eps = D sigma / V,
    V = alpha^2 STD^2 + sigma^2; then log N(x_T; 0, I) + integral + D log(alpha_T / alpha_0)."""
    alpha_bar = [float(schedule.alphas_cumprod[t]) for t in grid]
    dims = x.shape[1]

    def slope(x_bar: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        alpha, sigma = math.sqrt(alpha_bar[k]), math.sqrt(1 - alpha_bar[k])
        v = alpha**2 * STD**2 + sigma**2
        return sigma * (alpha * x_bar - alpha * MEAN) / v, alpha * dims * sigma / v

    rho = [math.sqrt((1 - a) / a) for a in alpha_bar]
    x_bar, integral = x / math.sqrt(alpha_bar[0]), 0.0
    for k in range(len(grid) - 1):
        h = rho[k + 1] - rho[k]
        d_now, div_now = slope(x_bar, k)
        d_next, div_next = slope(x_bar + h * d_now, k + 1)
        x_bar = x_bar + h / 2 * (d_now + d_next)
        integral += h / 2 * (div_now + div_next)
    x_T = math.sqrt(alpha_bar[-1]) * x_bar
    log_ratio = 0.5 * math.log(alpha_bar[-1] / alpha_bar[0])
    return _log_normal(x_T, 0.0, 1.0) + integral + dims * log_ratio


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_ode_likelihood_is_heuns_method_on_the_chosen_grid(
    linear: NoiseSchedule, spacing: str
) -> None:
    """At 6 steps Heun's error is large, so the result depends on the grid: it must be the
    hand-written Heun on the requested one (for "time", 0, 200, 400, ..., 999 written by hand),
    to rounding, and the two spacings must disagree."""
    # float64 means, so that the model and hand_heun use the same MEAN to rounding
    gaussian = exact_gaussian_model(linear)
    x = MEAN + STD * torch.randn(
        20, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64
    )
    if spacing == "time":
        grid = [round(999 * k / 5) for k in range(6)]
    else:
        grid = ode_timesteps(linear, 6, "logsnr").tolist()
    got = ode_log_likelihood(gaussian, linear, x, steps=6, spacing=spacing, divergence="exact")
    torch.testing.assert_close(got, hand_heun(linear, grid, x), rtol=1e-10, atol=1e-10)
    other = "logsnr" if spacing == "time" else "time"
    elsewhere = ode_log_likelihood(gaussian, linear, x, steps=6, spacing=other, divergence="exact")
    assert float((got - elsewhere).abs().min()) > 1e-3
